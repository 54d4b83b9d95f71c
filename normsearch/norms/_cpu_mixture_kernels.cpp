// Fused CPU loops for Mixture Normalization (Kalayeh & Shah, Eq. 34-37), in two pixel layouts.
//
// Rows (channels_last): the pixels of a channels_last (N, C, H, W) tensor are the rows of a (P, C)
// matrix, P = N*H*W; the posteriors nu are stored component-major, (K, P). Planes (NCHW): the
// pixels are (N, C, L) and the posteriors (N, K, L), L = H*W contiguous per (sample, channel) or
// (sample, component). Eager PyTorch computes the per-component
// moments and the Eq. 34 transform with skinny (K, P) x (P, C) matrix products and full-size
// temporaries (x^2, g * x, nu @ s); these loops read each full-size input once per pass and keep
// the per-row K-mixtures in registers. Built with _cpu_kernels.cpp (see normsearch/norms/_cpu_ext.py);
// normsearch/norms/_mixture_kernels.py holds the plain-op path computing the same quantities.
//
// Accuracy: sums run in the input type over blocks of BLOCK rows (PLANE_BLOCK pixels of a plane), are
// added up in double per chunk of CHUNK rows (per sample), and the chunks (samples) are added in
// order (the result does not depend on the thread count).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t BLOCK = 32;
constexpr int64_t CHUNK = 1024;
constexpr int64_t PLANE_BLOCK = 256;

struct Shape {
  int64_t p, c, k;
};

struct Planes {
  int64_t n, c, k, l;
};

Shape check_rows(const at::Tensor& a, const at::Tensor& nu) {
  TORCH_CHECK(a.device().is_cpu() && a.dim() == 2 && a.is_contiguous(),
              "pixels must be a contiguous (P, C) CPU tensor");
  TORCH_CHECK(nu.dim() == 2 && nu.is_contiguous() && nu.size(1) == a.size(0) && nu.scalar_type() == a.scalar_type(),
              "posteriors must be a contiguous (K, P) tensor of the pixels' dtype");
  return {a.size(0), a.size(1), nu.size(0)};
}

// Plane layout when a is 3-D: a (N, C, L), nu (N, K, L), both contiguous.
bool is_planes(const at::Tensor& a, const at::Tensor& nu, Planes* out) {
  if (a.dim() != 3) return false;
  TORCH_CHECK(a.device().is_cpu() && a.is_contiguous(), "pixels must be a contiguous (N, C, L) CPU tensor");
  TORCH_CHECK(nu.dim() == 3 && nu.is_contiguous() && nu.size(0) == a.size(0) && nu.size(2) == a.size(2) &&
                  nu.scalar_type() == a.scalar_type(),
              "posteriors must be a contiguous (N, K, L) tensor of the pixels' dtype");
  *out = {a.size(0), a.size(1), nu.size(1), a.size(2)};
  return true;
}

// Either layout: the (P, C, K) sizes the (K, C) checks need; planes filled when 3-D.
Shape check_pixels(const at::Tensor& a, const at::Tensor& nu, Planes* planes, bool* plane_layout) {
  *plane_layout = is_planes(a, nu, planes);
  return *plane_layout ? Shape{planes->n * planes->l, planes->c, planes->k} : check_rows(a, nu);
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

// Planes: a, b (N, C, L), nu (N, K, L), cen (K, C) or null (then 0). Per (k, c):
// tot[k, c] = sum nu_k (a or a - c_k), tot[KC + k, c] = sum nu_k (a - c_k)^2 (b null) or
// sum nu_k a (b - c_k): the sums of sums_kernel, each plane read K times from cache.
// SQUARE: b is null (the second sum is of (a - c_k)^2).
template <typename T, bool SQUARE>
void plane_sums_kernel(const T* a, const T* b, const T* nu, const T* cen, const Planes& s, double* tot) {
  const int64_t kc = s.k * s.c;
  std::vector<double> partial(s.n * 2 * kc, 0.0);
  at::parallel_for(0, s.n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      double* out = partial.data() + i * 2 * kc;
      for (int64_t c = 0; c < s.c; ++c) {
        const T* __restrict ar = a + (i * s.c + c) * s.l;
        const T* __restrict xr = (SQUARE ? a : b) + (i * s.c + c) * s.l;
        for (int64_t k = 0; k < s.k; ++k) {
          const T* __restrict wk = nu + (i * s.k + k) * s.l;
          const T ck = cen != nullptr ? cen[k * s.c + c] : T(0);
          double s1 = 0.0, s2 = 0.0;
          for (int64_t l0 = 0; l0 < s.l; l0 += PLANE_BLOCK) {
            const int64_t stop = std::min(s.l, l0 + PLANE_BLOCK);
            T t1 = T(0), t2 = T(0);
            #pragma omp simd reduction(+ : t1, t2)
            for (int64_t j = l0; j < stop; ++j) {
              const T d = xr[j] - ck;
              const T wf = wk[j] * (SQUARE ? d : ar[j]);
              t1 += wf;
              t2 += wf * d;
            }
            s1 += t1;
            s2 += t2;
          }
          out[k * s.c + c] += s1;
          out[kc + k * s.c + c] += s2;
        }
      }
    }
  });
  for (int64_t i = 0; i < s.n; ++i)
    for (int64_t j = 0; j < 2 * kc; ++j) tot[j] += partial[i * 2 * kc + j];
}

// Planes: out[n, c, l] = a * sum_k nu[n, k, l] sc[k, c] + sum_k nu e[k, c] (+ b * sum_k nu q[k, c] when
// WITH_B).
template <typename T, bool WITH_B>
void plane_combine_kernel(const T* a, const T* nu, const T* sc, const T* e, const T* b, const T* q, T* out,
                          const Planes& s) {
  at::parallel_for(0, s.n * s.c, 1, [&](int64_t begin, int64_t end) {
    alignas(64) T ms[PLANE_BLOCK];
    alignas(64) T me[PLANE_BLOCK];
    alignas(64) T mq[PLANE_BLOCK];
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t i = plane / s.c, c = plane % s.c;
      const T* w0 = nu + i * s.k * s.l;
      for (int64_t l0 = 0; l0 < s.l; l0 += PLANE_BLOCK) {
        const int64_t len = std::min(s.l - l0, PLANE_BLOCK);
        #pragma omp simd
        for (int64_t j = 0; j < len; ++j) ms[j] = me[j] = mq[j] = T(0);
        for (int64_t k = 0; k < s.k; ++k) {
          const T* __restrict wk = w0 + k * s.l + l0;
          const T sk = sc[k * s.c + c], ek = e[k * s.c + c], qk = WITH_B ? q[k * s.c + c] : T(0);
          #pragma omp simd
          for (int64_t j = 0; j < len; ++j) {
            ms[j] += wk[j] * sk;
            me[j] += wk[j] * ek;
            if (WITH_B) mq[j] += wk[j] * qk;
          }
        }
        const int64_t off = plane * s.l + l0;
        const T* __restrict ar = a + off;
        const T* __restrict br = WITH_B ? b + off : a;
        T* __restrict o = out + off;
        #pragma omp simd
        for (int64_t j = 0; j < len; ++j) o[j] = ar[j] * ms[j] + me[j] + (WITH_B ? br[j] * mq[j] : T(0));
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
// Rows (a (P, C), nu (K, P)) or planes (a (N, C, L), nu (N, K, L)).
std::vector<at::Tensor> mixture_sums(const at::Tensor& a, const at::Tensor& nu, const c10::optional<at::Tensor>& b,
                                     const c10::optional<at::Tensor>& centre) {
  Planes planes{};
  bool plane_layout = false;
  const Shape s = check_pixels(a, nu, &planes, &plane_layout);
  if (b.has_value()) check_same(*b, a, "b");
  if (centre.has_value()) check_kc(*centre, s, a, "centre");
  std::vector<double> tot(2 * s.k * s.c, 0.0);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "mixture_sums", [&] {
    if (plane_layout) {
      const scalar_t* cen = centre.has_value() ? centre->data_ptr<scalar_t>() : nullptr;
      if (b.has_value())
        plane_sums_kernel<scalar_t, false>(a.data_ptr<scalar_t>(), b->data_ptr<scalar_t>(), nu.data_ptr<scalar_t>(),
                                           cen, planes, tot.data());
      else
        plane_sums_kernel<scalar_t, true>(a.data_ptr<scalar_t>(), nullptr, nu.data_ptr<scalar_t>(), cen, planes,
                                          tot.data());
      return;
    }
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

// a * (nu^T sc) + nu^T e (+ b * (nu^T q)) per pixel, with (K, C) sc, e, q; the shape of a, in
// either layout (see mixture_sums).
at::Tensor mixture_combine(const at::Tensor& a, const at::Tensor& nu, const at::Tensor& sc, const at::Tensor& e,
                           const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& q) {
  Planes planes{};
  bool plane_layout = false;
  const Shape s = check_pixels(a, nu, &planes, &plane_layout);
  check_kc(sc, s, a, "scale");
  check_kc(e, s, a, "offset");
  TORCH_CHECK(b.has_value() == q.has_value(), "b and q go together");
  if (b.has_value()) {
    check_same(*b, a, "b");
    check_kc(*q, s, a, "q");
  }
  auto out = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "mixture_combine", [&] {
    if (plane_layout) {
      auto kernel = b.has_value() ? plane_combine_kernel<scalar_t, true> : plane_combine_kernel<scalar_t, false>;
      kernel(a.data_ptr<scalar_t>(), nu.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(),
             b.has_value() ? b->data_ptr<scalar_t>() : nullptr, q.has_value() ? q->data_ptr<scalar_t>() : nullptr,
             out.data_ptr<scalar_t>(), planes);
      return;
    }
    by_width<scalar_t>(s.c, [&](auto width) {
      combine_kernel<scalar_t, decltype(width)::value>(
          a.data_ptr<scalar_t>(), nu.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(),
          b.has_value() ? b->data_ptr<scalar_t>() : nullptr, q.has_value() ? q->data_ptr<scalar_t>() : nullptr,
          out.data_ptr<scalar_t>(), s);
    });
  });
  return out;
}
