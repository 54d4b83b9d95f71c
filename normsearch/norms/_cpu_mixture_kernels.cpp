// Fused CPU loops for Mixture Normalization on channels_last tensors (Kalayeh & Shah, Eq. 34-37).
//
// The pixels of a channels_last (N, C, H, W) tensor are the rows of a (P, C) matrix, P = N*H*W; the
// posteriors nu are stored component-major, (K, P). Eager PyTorch computes the per-component
// moments and the Eq. 34 transform with skinny (K, P) x (P, C) matrix products and full-size
// temporaries (x^2, g * x, nu @ s); these loops read each full-size input once per pass and keep
// the per-row K-mixtures in registers. Built with _cpu_kernels.cpp (see normsearch/norms/_cpu_ext.py);
// normsearch/norms/_mixture_kernels.py holds the plain-op path computing the same quantities.
//
// Accuracy: sums run in the input type over blocks of BLOCK rows, are added up in double per chunk
// of CHUNK rows, and the chunks are added in order (the result does not depend on the thread count).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t BLOCK = 32;
constexpr int64_t CHUNK = 1024;

struct Shape {
  int64_t p, c, k;
};

Shape check_rows(const at::Tensor& a, const at::Tensor& nu) {
  TORCH_CHECK(a.device().is_cpu() && a.dim() == 2 && a.is_contiguous(),
              "pixels must be a contiguous (P, C) CPU tensor");
  TORCH_CHECK(nu.dim() == 2 && nu.is_contiguous() && nu.size(1) == a.size(0) && nu.scalar_type() == a.scalar_type(),
              "posteriors must be a contiguous (K, P) tensor of the pixels' dtype");
  return {a.size(0), a.size(1), nu.size(0)};
}

void check_same(const at::Tensor& t, const at::Tensor& a, const char* name) {
  TORCH_CHECK(t.sizes() == a.sizes() && t.is_contiguous() && t.scalar_type() == a.scalar_type(), name,
              " must be contiguous and match the pixels' shape and dtype");
}

void check_kc(const at::Tensor& t, const Shape& s, const at::Tensor& a, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == s.k && t.size(1) == s.c && t.is_contiguous() &&
                  t.scalar_type() == a.scalar_type(),
              name, " must be a contiguous (K, C) tensor of the pixels' dtype");
}

// Scratch of n values: a stack array when the size is a compile-time constant (registers after
// unrolling), else heap storage.
template <typename T, int N>
struct Scratch {
  alignas(64) T fixed[N > 0 ? N : 1];
  std::vector<T> heap;
  explicit Scratch(int64_t n) : heap(N > 0 ? 0 : n) {}
  T* data() { return N > 0 ? fixed : heap.data(); }
};

// tot[0:KC] = sum_p nu[k, p] a[p, c]; tot[KC:2KC] = sum_p nu[k, p] a[p, c] * (b ? b : a)[p, c].
// With centres cen (K, C), the operand that holds the pixels is centred on component k's centre
// before the products (b when given, else a): sum_p nu (a - c_k), sum_p nu (a - c_k)^2, or
// sum_p nu a, sum_p nu a (b - c_k). Float sums of values far from 0 would otherwise cancel in
// E[x^2] - E[x]^2 (issue 16).
// CT > 0: the channel count as a compile-time constant (fully unrolled channel loops); 0: s.c.
template <typename T, int CT>
void sums_kernel(const T* a, const T* b, const T* nu, const T* cen, const Shape& s, double* tot) {
  const int64_t C = CT > 0 ? CT : s.c;
  const int64_t kc = s.k * C;
  const int64_t chunks = (s.p + CHUNK - 1) / CHUNK;
  std::vector<double> partial(chunks * 2 * kc, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> prod(cen == nullptr ? BLOCK * C : 0);
    Scratch<T, 2 * CT> acc(2 * C);
    T* __restrict a1 = acc.data();
    T* __restrict a2 = a1 + C;
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      double* out = partial.data() + chunk * 2 * kc;
      const int64_t stop = std::min(s.p, (chunk + 1) * CHUNK);
      for (int64_t r0 = chunk * CHUNK; r0 < stop; r0 += BLOCK) {
        const int64_t rows = std::min(stop - r0, BLOCK);
        T* __restrict ab = prod.data();  // a * (b or a) for the block's rows, once for all K components
        const T* __restrict ar0 = a + r0 * C;
        const T* __restrict br0 = (b != nullptr ? b : a) + r0 * C;
        if (cen == nullptr) {
          #pragma omp simd
          for (int64_t i = 0; i < rows * C; ++i) ab[i] = ar0[i] * br0[i];
        }
        for (int64_t k = 0; k < s.k; ++k) {
          const T* __restrict wk = nu + k * s.p + r0;
          for (int64_t c = 0; c < 2 * C; ++c) a1[c] = T(0);
          if (cen == nullptr) {
            for (int64_t r = 0; r < rows; ++r) {
              const T w = wk[r];
              const T* __restrict ar = ar0 + r * C;
              const T* __restrict abr = ab + r * C;
              #pragma omp simd
              for (int64_t c = 0; c < C; ++c) {
                a1[c] += w * ar[c];
                a2[c] += w * abr[c];
              }
            }
          } else {  // centred on c_k: d = pixel operand (b, else a) - c_k; f = a, or d itself
            const T* __restrict ck = cen + k * C;
            const bool square = b == nullptr;
            for (int64_t r = 0; r < rows; ++r) {
              const T w = wk[r];
              const T* __restrict ar = ar0 + r * C;
              const T* __restrict xr = br0 + r * C;
              #pragma omp simd
              for (int64_t c = 0; c < C; ++c) {
                const T d = xr[c] - ck[c];
                const T wf = w * (square ? d : ar[c]);
                a1[c] += wf;
                a2[c] += wf * d;
              }
            }
          }
          double* o1 = out + k * C;
          double* o2 = out + kc + k * C;
          #pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            o1[c] += a1[c];
            o2[c] += a2[c];
          }
        }
      }
    }
  });
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t i = 0; i < 2 * kc; ++i) tot[i] += partial[chunk * 2 * kc + i];
}

// out[p, c] = a[p, c] * sum_k nu[k, p] sc[k, c] + sum_k nu[k, p] e[k, c] (+ b[p, c] * sum_k nu[k, p] q[k, c]).
template <typename T, int CT>
void combine_kernel(const T* a, const T* nu, const T* sc, const T* e, const T* b, const T* q, T* out,
                    const Shape& s) {
  const int64_t C = CT > 0 ? CT : s.c;
  at::parallel_for(0, s.p, CHUNK, [&](int64_t begin, int64_t end) {
    Scratch<T, 3 * CT> mix(3 * C);
    T* __restrict ms = mix.data();
    T* __restrict me = ms + C;
    T* __restrict mq = me + C;
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t c = 0; c < 3 * C; ++c) ms[c] = T(0);
      for (int64_t k = 0; k < s.k; ++k) {
        const T w = nu[k * s.p + r];
        const T* __restrict sk = sc + k * C;
        const T* __restrict ek = e + k * C;
        #pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          ms[c] += w * sk[c];
          me[c] += w * ek[c];
        }
        if (b != nullptr) {
          const T* __restrict qk = q + k * C;
          #pragma omp simd
          for (int64_t c = 0; c < C; ++c) mq[c] += w * qk[c];
        }
      }
      const T* __restrict ar = a + r * C;
      T* __restrict o = out + r * C;
      if (b != nullptr) {
        const T* __restrict br = b + r * C;
        #pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = ar[c] * ms[c] + me[c] + br[c] * mq[c];
      } else {
        #pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = ar[c] * ms[c] + me[c];
      }
    }
  });
}

// Runs kernel<T, C> with the channel count as a compile-time constant for the common widths.
template <typename T, typename F>
void by_width(int64_t c, F&& kernel) {
  switch (c) {
    case 16: kernel(std::integral_constant<int, 16>()); break;
    case 32: kernel(std::integral_constant<int, 32>()); break;
    case 64: kernel(std::integral_constant<int, 64>()); break;
    default: kernel(std::integral_constant<int, 0>());
  }
}

}  // namespace

// (sum_p nu a, sum_p nu a * b), each (K, C); b defaults to a (then the second is sum_p nu a^2).
// With (K, C) centres, the pixel operand is centred per component first (see sums_kernel).
std::vector<at::Tensor> mixture_sums(const at::Tensor& a, const at::Tensor& nu, const c10::optional<at::Tensor>& b,
                                     const c10::optional<at::Tensor>& centre) {
  const Shape s = check_rows(a, nu);
  if (b.has_value()) check_same(*b, a, "b");
  if (centre.has_value()) check_kc(*centre, s, a, "centre");
  std::vector<double> tot(2 * s.k * s.c, 0.0);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "mixture_sums", [&] {
    by_width<scalar_t>(s.c, [&](auto width) {
      sums_kernel<scalar_t, decltype(width)::value>(a.data_ptr<scalar_t>(),
                                                     b.has_value() ? b->data_ptr<scalar_t>() : nullptr,
                                                     nu.data_ptr<scalar_t>(),
                                                     centre.has_value() ? centre->data_ptr<scalar_t>() : nullptr,
                                                     s, tot.data());
    });
  });
  auto both = torch::tensor(tot, torch::kFloat64).view({2, s.k, s.c}).to(a.scalar_type());
  return {both[0], both[1]};
}

// a * (nu^T sc) + nu^T e (+ b * (nu^T q)) per pixel row: (P, C), with (K, C) sc, e, q.
at::Tensor mixture_combine(const at::Tensor& a, const at::Tensor& nu, const at::Tensor& sc, const at::Tensor& e,
                           const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& q) {
  const Shape s = check_rows(a, nu);
  check_kc(sc, s, a, "scale");
  check_kc(e, s, a, "offset");
  TORCH_CHECK(b.has_value() == q.has_value(), "b and q go together");
  if (b.has_value()) {
    check_same(*b, a, "b");
    check_kc(*q, s, a, "q");
  }
  auto out = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "mixture_combine", [&] {
    by_width<scalar_t>(s.c, [&](auto width) {
      combine_kernel<scalar_t, decltype(width)::value>(
          a.data_ptr<scalar_t>(), nu.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(),
          b.has_value() ? b->data_ptr<scalar_t>() : nullptr, q.has_value() ? q->data_ptr<scalar_t>() : nullptr,
          out.data_ptr<scalar_t>(), s);
    });
  });
  return out;
}
