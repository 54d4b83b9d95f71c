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
// The posteriors of every pixel under the batch's diagonal GMM (Eq. 31) and the sums of the GMM's
// EM iterations over the fitted subsample (the layer's other full passes) run here too, one pass
// each, in the cancellation-free form sum_c (x_c - mu_kc)^2 / sigma_kc^2.
//
// Shift: the layer does not centre its input in a separate pass; the kernels take the (C,) centre
// `shift` and subtract it from every pixel value as they read it (the same float operation the
// separate pass did, so the results are the same).
//
// Accuracy: sums run in the input type over blocks of BLOCK rows (PLANE_BLOCK pixels of a plane), are
// added up in double per chunk of CHUNK rows (per sample), and the chunks (samples) are added in
// order (the result does not depend on the thread count).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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

// exp(x) for float x in [-80, 0] (Cephes expf: Cody-Waite reduction by ln 2, degree-5 polynomial,
// ~1 ulp), written so that the compiler vectorizes it (no libm call; the rounding of x / ln 2 to
// an integer by adding and subtracting 1.5 * 2^23; the loops calling it need -fno-trapping-math).
inline float exp_small(float x) {
  const float fn = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (x - fn * 0.693359375f) - fn * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fn) + 127) << 23;  // 2^fn, fn in [-116, 0]
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline double exp_small(double x) { return std::exp(x); }

// exp(d) for d <= 0 as normsearch.norms._gmm.softmax takes it: exp(max(d, -80)) - 2 exp(-80), clamped
// at 0 (terms below 3.6e-35 of the largest become exactly 0, -inf included; no slow underflow path).
template <typename T>
inline T exp_floor(T d) {
  const T cut = T(2.0 * 1.8048513878454153e-35);  // 2 exp(-80)
  const T e = exp_small(d < T(-80) ? T(-80) : d) - cut;
  return e > T(0) ? e : T(0);
}

// Softmax over K of a block of log-probabilities lp[k * ld + j], j < len (overwritten), written to
// out[k * ostride + j]; mx and sum are scratch of len values.
template <typename T>
void softmax_block(T* lp, int64_t k_count, int64_t len, int64_t ld, T* out, int64_t ostride, T* mx, T* sum) {
  #pragma omp simd
  for (int64_t j = 0; j < len; ++j) mx[j] = lp[j];
  for (int64_t k = 1; k < k_count; ++k) {
    const T* __restrict row = lp + k * ld;
    #pragma omp simd
    for (int64_t j = 0; j < len; ++j) mx[j] = row[j] > mx[j] ? row[j] : mx[j];
  }
  #pragma omp simd
  for (int64_t j = 0; j < len; ++j) sum[j] = T(0);
  for (int64_t k = 0; k < k_count; ++k) {
    T* __restrict row = lp + k * ld;
    #pragma omp simd
    for (int64_t j = 0; j < len; ++j) {
      const T e = exp_floor(row[j] - mx[j]);
      row[j] = e;
      sum[j] += e;
    }
  }
  for (int64_t k = 0; k < k_count; ++k) {
    const T* row = lp + k * ld;
    T* o = out + k * ostride;
    #pragma omp simd
    for (int64_t j = 0; j < len; ++j) o[j] = row[j] / sum[j];
  }
}

// Per component of a diagonal GMM: half precisions hp = 1 / (2 sigma^2) (K, C) and
// bias = log lambda - (sum_c log sigma_c^2 + C log 2 pi) / 2 (K), so that
// log(lambda_k N(x | mu_k, sigma_k^2)) = bias_k - sum_c hp_kc (x_c - mu_kc)^2. Computed in double.
template <typename T>
void gmm_terms(const at::Tensor& log_w, const at::Tensor& var, std::vector<T>* hp, std::vector<T>* bias) {
  const int64_t k_count = var.size(0), c_count = var.size(1);
  const auto v = var.to(at::kDouble).contiguous();
  const auto w = log_w.to(at::kDouble).contiguous();
  const double* vp = v.data_ptr<double>();
  const double* wp = w.data_ptr<double>();
  hp->resize(k_count * c_count);
  bias->resize(k_count);
  for (int64_t k = 0; k < k_count; ++k) {
    double log_det = 0.0;
    for (int64_t c = 0; c < c_count; ++c) {
      (*hp)[k * c_count + c] = T(0.5 / vp[k * c_count + c]);
      log_det += std::log(vp[k * c_count + c]);
    }
    (*bias)[k] = T(wp[k] - 0.5 * (log_det + c_count * std::log(2.0 * M_PI)));
  }
}

// tot[0:KC] = sum_p nu[k, p] a[p, c]; tot[KC:2KC] = sum_p nu[k, p] a[p, c] * (b ? b : a)[p, c].
// With centres cen (K, C), the operand that holds the pixels is centred on component k's centre
// before the products (b when given, else a): sum_p nu (a - c_k), sum_p nu (a - c_k)^2, or
// sum_p nu a, sum_p nu a (b - c_k). Float sums of values far from 0 would otherwise cancel in
// E[x^2] - E[x]^2 (issue 16). With centres, sh (C) is subtracted from the pixel operand first.
// CT > 0: the channel count as a compile-time constant (fully unrolled channel loops); 0: s.c.
template <typename T, int CT>
void sums_kernel(const T* a, const T* b, const T* nu, const T* cen, const T* sh, const Shape& s, double* tot) {
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
                const T d = (xr[c] - sh[c]) - ck[c];
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

// out[p, c] = a[p, c] * sum_k nu[k, p] sc[k, c] + sum_k nu[k, p] e[k, c] (+ b[p, c] * sum_k nu[k, p] q[k, c]),
// with sh[c] subtracted from the pixel operand (b if given, else a) first.
template <typename T, int CT>
void combine_kernel(const T* a, const T* nu, const T* sc, const T* e, const T* b, const T* q, const T* sh,
                    T* out, const Shape& s) {
  const int64_t C = CT > 0 ? CT : s.c;
  at::parallel_for(0, s.p, CHUNK, [&](int64_t begin, int64_t end) {
    Scratch<T, 3 * CT> mix(3 * C);
    T* __restrict ms = mix.data();
    T* __restrict me = ms + C;
    T* __restrict mq = me + C;
    for (int64_t r = begin; r < end; ++r) {
      // k = 0 assigns (w * s, exactly 0 + w * s): zeroing the 3C sums first compiles to a
      // `rep stos` per pixel, which cost more than the whole mixing.
      for (int64_t k = 0; k < s.k; ++k) {
        const T w = nu[k * s.p + r];
        const T* __restrict sk = sc + k * C;
        const T* __restrict ek = e + k * C;
        const T* __restrict qk = b != nullptr ? q + k * C : sk;
        if (k == 0) {
          #pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            ms[c] = w * sk[c];
            me[c] = w * ek[c];
          }
          if (b != nullptr) {
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) mq[c] = w * qk[c];
          }
          continue;
        }
        #pragma omp simd
        for (int64_t c = 0; c < C; ++c) {
          ms[c] += w * sk[c];
          me[c] += w * ek[c];
        }
        if (b != nullptr) {
          #pragma omp simd
          for (int64_t c = 0; c < C; ++c) mq[c] += w * qk[c];
        }
      }
      const T* __restrict ar = a + r * C;
      T* __restrict o = out + r * C;
      if (b != nullptr) {
        const T* __restrict br = b + r * C;
        #pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = ar[c] * ms[c] + me[c] + (br[c] - sh[c]) * mq[c];
      } else {
        #pragma omp simd
        for (int64_t c = 0; c < C; ++c) o[c] = (ar[c] - sh[c]) * ms[c] + me[c];
      }
    }
  });
}

// Planes: a, b (N, C, L), nu (N, K, L), cen (K, C) or null (then 0). Per (k, c):
// tot[k, c] = sum nu_k (a or a - c_k), tot[KC + k, c] = sum nu_k (a - c_k)^2 (b null) or
// sum nu_k a (b - c_k): the sums of sums_kernel, each plane read K times from cache.
// SQUARE: b is null (the second sum is of (a - c_k)^2).
template <typename T, bool SQUARE>
void plane_sums_kernel(const T* a, const T* b, const T* nu, const T* cen, const T* sh, const Planes& s,
                       double* tot) {
  const int64_t kc = s.k * s.c;
  std::vector<double> partial(s.n * 2 * kc, 0.0);
  at::parallel_for(0, s.n, 1, [&](int64_t begin, int64_t end) {
    alignas(64) T xs[PLANE_BLOCK];  // the block of the pixel operand minus the shift, once for all K
    std::vector<double> s1(s.k), s2(s.k);
    for (int64_t i = begin; i < end; ++i) {
      double* out = partial.data() + i * 2 * kc;
      for (int64_t c = 0; c < s.c; ++c) {
        const T* __restrict ar = a + (i * s.c + c) * s.l;
        const T* __restrict xr = (SQUARE ? a : b) + (i * s.c + c) * s.l;
        const T shc = sh[c];
        std::fill(s1.begin(), s1.end(), 0.0);
        std::fill(s2.begin(), s2.end(), 0.0);
        for (int64_t l0 = 0; l0 < s.l; l0 += PLANE_BLOCK) {  // per k the same block sums, in the same order
          const int64_t len = std::min(s.l - l0, PLANE_BLOCK);
          #pragma omp simd
          for (int64_t j = 0; j < len; ++j) xs[j] = xr[l0 + j] - shc;
          for (int64_t k = 0; k < s.k; ++k) {
            const T* __restrict wk = nu + (i * s.k + k) * s.l + l0;
            const T* __restrict ak = ar + l0;
            const T ck = cen != nullptr ? cen[k * s.c + c] : T(0);
            T t1 = T(0), t2 = T(0);
            #pragma omp simd reduction(+ : t1, t2)
            for (int64_t j = 0; j < len; ++j) {
              const T d = xs[j] - ck;
              const T wf = wk[j] * (SQUARE ? d : ak[j]);
              t1 += wf;
              t2 += wf * d;
            }
            s1[k] += t1;
            s2[k] += t2;
          }
        }
        for (int64_t k = 0; k < s.k; ++k) {
          out[k * s.c + c] += s1[k];
          out[kc + k * s.c + c] += s2[k];
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
void plane_combine_kernel(const T* a, const T* nu, const T* sc, const T* e, const T* b, const T* q, const T* sh,
                          T* out, const Planes& s) {
  at::parallel_for(0, s.n * s.c, 1, [&](int64_t begin, int64_t end) {
    alignas(64) T ms[PLANE_BLOCK];
    alignas(64) T me[PLANE_BLOCK];
    alignas(64) T mq[PLANE_BLOCK];
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t i = plane / s.c, c = plane % s.c;
      const T* w0 = nu + i * s.k * s.l;
      for (int64_t l0 = 0; l0 < s.l; l0 += PLANE_BLOCK) {
        const int64_t len = std::min(s.l - l0, PLANE_BLOCK);
        for (int64_t k = 0; k < s.k; ++k) {  // k = 0 assigns (exactly 0 + w s)
          const T* __restrict wk = w0 + k * s.l + l0;
          const T sk = sc[k * s.c + c], ek = e[k * s.c + c], qk = WITH_B ? q[k * s.c + c] : T(0);
          if (k == 0) {
            #pragma omp simd
            for (int64_t j = 0; j < len; ++j) {
              ms[j] = wk[j] * sk;
              me[j] = wk[j] * ek;
              if (WITH_B) mq[j] = wk[j] * qk;
            }
            continue;
          }
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
        const T shc = sh[c];
        if (WITH_B) {
          #pragma omp simd
          for (int64_t j = 0; j < len; ++j) o[j] = ar[j] * ms[j] + me[j] + (br[j] - shc) * mq[j];
        } else {
          #pragma omp simd
          for (int64_t j = 0; j < len; ++j) o[j] = (ar[j] - shc) * ms[j] + me[j];
        }
      }
    }
  });
}

constexpr int64_t POST_BLOCK = 64;  // rows per block of the posterior and EM loops

// sum_c h[c] (x[c] - m[c])^2 over C channels: the Mahalanobis term of a diagonal Gaussian's log density.
template <typename T>
inline T weighted_sq_dist(const T* __restrict x, const T* __restrict m, const T* __restrict h, int64_t C) {
  T acc = T(0);
  #pragma omp simd reduction(+ : acc)
  for (int64_t c = 0; c < C; ++c) {
    const T d = x[c] - m[c];
    acc += h[c] * d * d;
  }
  return acc;
}

// Rows: nu[k, p] = softmax_k(bias_k - sum_c hp_kc ((a[p, c] - sh[c]) - mu_kc)^2), nu (K, P).
template <typename T, int CT>
void posterior_rows_kernel(const T* a, const T* sh, const T* mu, const T* hp, const T* bias, const Shape& s, T* nu) {
  const int64_t C = CT > 0 ? CT : s.c;
  at::parallel_for(0, s.p, CHUNK, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch((s.k + 2) * POST_BLOCK);
    T* lp = scratch.data();
    T* mx = lp + s.k * POST_BLOCK;
    T* sum = mx + POST_BLOCK;
    Scratch<T, CT> xbuf(C);
    T* __restrict xc = xbuf.data();
    for (int64_t r0 = begin; r0 < end; r0 += POST_BLOCK) {
      const int64_t len = std::min(end - r0, POST_BLOCK);
      for (int64_t r = 0; r < len; ++r) {
        const T* __restrict ar = a + (r0 + r) * C;
        #pragma omp simd
        for (int64_t c = 0; c < C; ++c) xc[c] = ar[c] - sh[c];
        for (int64_t k = 0; k < s.k; ++k) lp[k * POST_BLOCK + r] = bias[k] - weighted_sq_dist(xc, mu + k * C, hp + k * C, C);
      }
      softmax_block(lp, s.k, len, POST_BLOCK, nu + r0, s.p, mx, sum);
    }
  });
}

// Planes: nu[n, k, l] = softmax_k(bias_k - sum_c hp_kc ((a[n, c, l] - sh[c]) - mu_kc)^2), nu (N, K, L).
template <typename T>
void posterior_planes_kernel(const T* a, const T* sh, const T* mu, const T* hp, const T* bias, const Planes& s,
                             T* nu) {
  const int64_t blocks = (s.l + PLANE_BLOCK - 1) / PLANE_BLOCK;
  at::parallel_for(0, s.n * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch((s.k + 2) * PLANE_BLOCK);
    T* lp = scratch.data();
    T* mx = lp + s.k * PLANE_BLOCK;
    T* sum = mx + PLANE_BLOCK;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / blocks, l0 = (item % blocks) * PLANE_BLOCK;
      const int64_t len = std::min(s.l - l0, PLANE_BLOCK);
      for (int64_t k = 0; k < s.k; ++k) {
        T* __restrict row = lp + k * PLANE_BLOCK;
        #pragma omp simd
        for (int64_t j = 0; j < len; ++j) row[j] = bias[k];
      }
      for (int64_t c = 0; c < s.c; ++c) {
        const T* __restrict xr = a + (i * s.c + c) * s.l + l0;
        const T shc = sh[c];
        for (int64_t k = 0; k < s.k; ++k) {
          const T m = mu[k * s.c + c], h = hp[k * s.c + c];
          T* __restrict row = lp + k * PLANE_BLOCK;
          #pragma omp simd
          for (int64_t j = 0; j < len; ++j) {
            const T d = (xr[j] - shc) - m;
            row[j] -= h * d * d;
          }
        }
      }
      softmax_block(lp, s.k, len, PLANE_BLOCK, nu + i * s.k * s.l + l0, s.l, mx, sum);
    }
  });
}

// One pass of the GMM fit over points x (M, C) with seeds (K, C): every point i is assigned to its
// nearest seed a_i (first on ties) and shifted to z_i = x_i - seed_{a_i}; its responsibilities r_ik
// are one-hot(a_i) (mu == nullptr) or the posteriors under the mixture (mu, hp, bias). Per pair
// (k, j = a_i): tot[k K + j] += r_ik, tot[KK + (k K + j) C + c] += r_ik z_ic and
// tot[KK + KKC + (k K + j) C + c] += r_ik z_ic^2 (the sums normsearch.norms._gmm.recentre takes).
template <typename T, int CT>
void gmm_sums_kernel(const T* x, const T* seeds, const T* mu, const T* hp, const T* bias, int64_t m, int64_t c_count,
                     int64_t k_count, int64_t* assign_all, bool assigned, double* tot) {
  const int64_t C = CT > 0 ? CT : c_count;
  const int64_t kk = k_count * k_count, size = kk * (1 + 2 * C);
  const int64_t chunks = (m + CHUNK - 1) / CHUNK;
  std::vector<double> partial(chunks * size, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> scratch((k_count + 2) * POST_BLOCK + size);
    T* lp = scratch.data();
    T* mx = lp + k_count * POST_BLOCK;
    T* sum = mx + POST_BLOCK;
    T* acc = sum + POST_BLOCK;  // the block's sums, laid out as tot
    Scratch<T, 2 * CT> zbuf(2 * C);
    T* __restrict z = zbuf.data();
    T* __restrict zz = z + C;
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      double* out = partial.data() + chunk * size;
      const int64_t stop = std::min(m, (chunk + 1) * CHUNK);
      for (int64_t r0 = chunk * CHUNK; r0 < stop; r0 += POST_BLOCK) {
        const int64_t len = std::min(stop - r0, POST_BLOCK);
        for (int64_t r = 0; r < len; ++r) {
          const T* __restrict xr = x + (r0 + r) * C;
          if (!assigned) {
            int64_t best = 0;
            T best_d = T(0);
            for (int64_t k = 0; k < k_count; ++k) {
              const T* __restrict sk = seeds + k * C;
              T d2 = T(0);
              #pragma omp simd reduction(+ : d2)
              for (int64_t c = 0; c < C; ++c) {
                const T d = xr[c] - sk[c];
                d2 += d * d;
              }
              if (k == 0 || d2 < best_d) {
                best = k;
                best_d = d2;
              }
            }
            assign_all[r0 + r] = best;
          }
          for (int64_t k = 0; k < k_count && mu != nullptr; ++k)
            lp[k * POST_BLOCK + r] = bias[k] - weighted_sq_dist(xr, mu + k * C, hp + k * C, C);
        }
        if (mu != nullptr) softmax_block(lp, k_count, len, POST_BLOCK, lp, POST_BLOCK, mx, sum);
        for (int64_t i = 0; i < size; ++i) acc[i] = T(0);
        for (int64_t r = 0; r < len; ++r) {
          const int64_t j = assign_all[r0 + r];
          const T* __restrict xr = x + (r0 + r) * C;
          const T* __restrict sj = seeds + j * C;
          #pragma omp simd
          for (int64_t c = 0; c < C; ++c) {
            z[c] = xr[c] - sj[c];
            zz[c] = z[c] * z[c];
          }
          for (int64_t k = 0; k < k_count; ++k) {
            const T w = mu != nullptr ? lp[k * POST_BLOCK + r] : T(k == j ? 1 : 0);
            if (w == T(0)) continue;
            const int64_t pair = k * k_count + j;
            acc[pair] += w;
            T* __restrict f1 = acc + kk + pair * C;
            T* __restrict f2 = f1 + kk * C;
            #pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
              f1[c] += w * z[c];
              f2[c] += w * zz[c];
            }
          }
        }
        for (int64_t i = 0; i < size; ++i) out[i] += acc[i];
      }
    }
  });
  for (int64_t chunk = 0; chunk < chunks; ++chunk)
    for (int64_t i = 0; i < size; ++i) tot[i] += partial[chunk * size + i];
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

// The (C,) shift as a pointer: its data, or zeros.
template <typename T>
const T* shift_data(const c10::optional<at::Tensor>& shift, int64_t c, std::vector<T>* zeros) {
  if (shift.has_value()) return shift->data_ptr<T>();
  zeros->assign(c, T(0));
  return zeros->data();
}

void check_shift(const c10::optional<at::Tensor>& shift, int64_t c, const at::Tensor& a) {
  if (!shift.has_value()) return;
  TORCH_CHECK(shift->dim() == 1 && shift->size(0) == c && shift->is_contiguous() &&
                  shift->scalar_type() == a.scalar_type(),
              "shift must be a contiguous (C,) tensor of the pixels' dtype");
}

}  // namespace

// (sum_p nu a, sum_p nu a * b), each (K, C); b defaults to a (then the second is sum_p nu a^2).
// With (K, C) centres, the pixel operand is centred per component first (see sums_kernel), after
// subtracting the (C,) shift when given (which needs the centres).
// Rows (a (P, C), nu (K, P)) or planes (a (N, C, L), nu (N, K, L)).
std::vector<at::Tensor> mixture_sums(const at::Tensor& a, const at::Tensor& nu, const c10::optional<at::Tensor>& b,
                                     const c10::optional<at::Tensor>& centre,
                                     const c10::optional<at::Tensor>& shift) {
  Planes planes{};
  bool plane_layout = false;
  const Shape s = check_pixels(a, nu, &planes, &plane_layout);
  if (b.has_value()) check_same(*b, a, "b");
  if (centre.has_value()) check_kc(*centre, s, a, "centre");
  check_shift(shift, s.c, a);
  TORCH_CHECK(!shift.has_value() || centre.has_value(), "a shift needs the centres");
  std::vector<double> tot(2 * s.k * s.c, 0.0);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "mixture_sums", [&] {
    std::vector<scalar_t> zeros;
    const scalar_t* sh = shift_data<scalar_t>(shift, s.c, &zeros);
    const scalar_t* cen = centre.has_value() ? centre->data_ptr<scalar_t>() : nullptr;
    if (plane_layout) {
      if (b.has_value())
        plane_sums_kernel<scalar_t, false>(a.data_ptr<scalar_t>(), b->data_ptr<scalar_t>(), nu.data_ptr<scalar_t>(),
                                           cen, sh, planes, tot.data());
      else
        plane_sums_kernel<scalar_t, true>(a.data_ptr<scalar_t>(), nullptr, nu.data_ptr<scalar_t>(), cen, sh, planes,
                                          tot.data());
      return;
    }
    by_width<scalar_t>(s.c, [&](auto width) {
      sums_kernel<scalar_t, decltype(width)::value>(a.data_ptr<scalar_t>(),
                                                     b.has_value() ? b->data_ptr<scalar_t>() : nullptr,
                                                     nu.data_ptr<scalar_t>(), cen, sh, s, tot.data());
    });
  });
  auto both = torch::tensor(tot, torch::kFloat64).view({2, s.k, s.c}).to(a.scalar_type());
  return {both[0], both[1]};
}

// a * (nu^T sc) + nu^T e (+ b * (nu^T q)) per pixel, with (K, C) sc, e, q; the shape of a, in
// either layout (see mixture_sums). The (C,) shift, when given, is subtracted from the pixel operand
// (b if given, else a) first.
at::Tensor mixture_combine(const at::Tensor& a, const at::Tensor& nu, const at::Tensor& sc, const at::Tensor& e,
                           const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& q,
                           const c10::optional<at::Tensor>& shift) {
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
  check_shift(shift, s.c, a);
  auto out = at::empty_like(a);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "mixture_combine", [&] {
    std::vector<scalar_t> zeros;
    const scalar_t* sh = shift_data<scalar_t>(shift, s.c, &zeros);
    const scalar_t* bp = b.has_value() ? b->data_ptr<scalar_t>() : nullptr;
    const scalar_t* qp = q.has_value() ? q->data_ptr<scalar_t>() : nullptr;
    if (plane_layout) {
      auto kernel = b.has_value() ? plane_combine_kernel<scalar_t, true> : plane_combine_kernel<scalar_t, false>;
      kernel(a.data_ptr<scalar_t>(), nu.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(), bp, qp,
             sh, out.data_ptr<scalar_t>(), planes);
      return;
    }
    by_width<scalar_t>(s.c, [&](auto width) {
      combine_kernel<scalar_t, decltype(width)::value>(a.data_ptr<scalar_t>(), nu.data_ptr<scalar_t>(),
                                                        sc.data_ptr<scalar_t>(), e.data_ptr<scalar_t>(), bp, qp, sh,
                                                        out.data_ptr<scalar_t>(), s);
    });
  });
  return out;
}

namespace {

void check_gmm(const at::Tensor& a, int64_t c, const at::Tensor& log_w, const at::Tensor& means,
               const at::Tensor& variances) {
  const int64_t k = means.size(0);
  TORCH_CHECK(means.dim() == 2 && means.size(1) == c && means.is_contiguous() && means.scalar_type() == a.scalar_type(),
              "means must be a contiguous (K, C) tensor of the pixels' dtype");
  TORCH_CHECK(variances.sizes() == means.sizes(), "variances must be (K, C) like the means");
  TORCH_CHECK(log_w.dim() == 1 && log_w.size(0) == k, "log_weights must be (K,)");
}

}  // namespace

// Posteriors nu_k(x) of every pixel under the diagonal GMM (log_weights (K,), means, variances
// (K, C)), evaluated at x - shift: rows (a (P, C)) give nu (K, P), planes (a (N, C, L)) nu (N, K, L).
// The softmax over K is normsearch.norms._gmm.softmax's (-inf log-weights give exactly 0).
at::Tensor mixture_posteriors(const at::Tensor& a, const at::Tensor& shift, const at::Tensor& log_weights,
                              const at::Tensor& means, const at::Tensor& variances) {
  TORCH_CHECK(a.device().is_cpu() && a.is_contiguous() && (a.dim() == 2 || a.dim() == 3),
              "pixels must be a contiguous (P, C) or (N, C, L) CPU tensor");
  const bool plane_layout = a.dim() == 3;
  const int64_t c = plane_layout ? a.size(1) : a.size(1);
  check_gmm(a, c, log_weights, means, variances);
  check_shift(shift, c, a);
  const int64_t k = means.size(0);
  at::Tensor nu = plane_layout ? at::empty({a.size(0), k, a.size(2)}, a.options()) : at::empty({k, a.size(0)}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "mixture_posteriors", [&] {
    std::vector<scalar_t> hp, bias;
    gmm_terms<scalar_t>(log_weights, variances, &hp, &bias);
    const scalar_t* mu = means.data_ptr<scalar_t>();
    if (plane_layout) {
      const Planes planes{a.size(0), c, k, a.size(2)};
      posterior_planes_kernel<scalar_t>(a.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(), mu, hp.data(), bias.data(),
                                        planes, nu.data_ptr<scalar_t>());
      return;
    }
    const Shape rows{a.size(0), c, k};
    by_width<scalar_t>(c, [&](auto width) {
      posterior_rows_kernel<scalar_t, decltype(width)::value>(a.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(), mu,
                                                               hp.data(), bias.data(), rows, nu.data_ptr<scalar_t>());
    });
  });
  return nu;
}

// One M-step of the GMM fit over points (M, C) centred on the seeds (see gmm_sums_kernel):
// responsibilities one-hot on the nearest seed without a mixture, else the posteriors under
// (weights, means, variances). From the per-(component, assigned seed) sums, in double:
// recentre (normsearch.norms._gmm.recentre), nk = sum of responsibilities + 10 eps,
// means = seed + E[x - seed], variances = max(E[(x - seed)^2] - E[x - seed]^2, 0) + reg_covar,
// weights = nk / sum nk (normsearch.norms._gmm._m_step_from_sums). `assign`: the (M,) nearest
// seeds a previous call returned (the seeds unchanged), or None to compute them. prune >= 0: then
// normsearch.norms._gmm.prune_components(., prune) of the result (the fit's last step). Returns
// (weights (K,), means (K, C), variances (K, C)) in the points' dtype and the (M,) int64 nearest seeds.
std::vector<at::Tensor> gmm_step(const at::Tensor& points, const at::Tensor& seeds, const c10::optional<at::Tensor>& assign,
                                 const c10::optional<at::Tensor>& weights, const c10::optional<at::Tensor>& means,
                                 const c10::optional<at::Tensor>& variances, double reg_covar, double prune) {
  TORCH_CHECK(points.device().is_cpu() && points.dim() == 2 && points.is_contiguous(),
              "points must be a contiguous (M, C) CPU tensor");
  const int64_t m = points.size(0), c = points.size(1), k = seeds.size(0);
  TORCH_CHECK(seeds.dim() == 2 && seeds.size(1) == c && seeds.is_contiguous() && seeds.scalar_type() == points.scalar_type(),
              "seeds must be a contiguous (K, C) tensor of the points' dtype");
  const bool soft = means.has_value();
  TORCH_CHECK(soft == weights.has_value() && soft == variances.has_value(), "weights, means and variances go together");
  if (soft) {
    check_gmm(points, c, *weights, *means, *variances);
    TORCH_CHECK(means->size(0) == k, "means must have one row per seed");
  }
  if (assign.has_value())
    TORCH_CHECK(assign->dim() == 1 && assign->size(0) == m && assign->is_contiguous() &&
                    assign->scalar_type() == at::kLong,
                "assign must be the contiguous (M,) int64 tensor a previous gmm_step returned");
  at::Tensor nearest = assign.has_value() ? *assign : at::empty({m}, points.options().dtype(at::kLong));
  if (assign.has_value()) {
    const int64_t* a = nearest.data_ptr<int64_t>();
    for (int64_t i = 0; i < m; ++i) TORCH_CHECK(a[i] >= 0 && a[i] < k, "assign out of range");
  }
  const int64_t kk = k * k;
  std::vector<double> tot(kk * (1 + 2 * c), 0.0);
  std::vector<double> nk(k), w_out(k), mu_out(k * c), var_out(k * c), cen(k * c);
  AT_DISPATCH_FLOATING_TYPES(points.scalar_type(), "gmm_step", [&] {
    std::vector<scalar_t> hp, bias;
    if (soft) gmm_terms<scalar_t>(weights->log(), *variances, &hp, &bias);
    const scalar_t* mu = soft ? means->data_ptr<scalar_t>() : nullptr;
    by_width<scalar_t>(c, [&](auto width) {
      gmm_sums_kernel<scalar_t, decltype(width)::value>(points.data_ptr<scalar_t>(), seeds.data_ptr<scalar_t>(), mu,
                                                         hp.data(), bias.data(), m, c, k, nearest.data_ptr<int64_t>(),
                                                         assign.has_value(), tot.data());
    });
    const scalar_t* sd = seeds.data_ptr<scalar_t>();
    for (int64_t i = 0; i < k * c; ++i) cen[i] = static_cast<double>(sd[i]);
    const double tiny = 10.0 * std::numeric_limits<scalar_t>::epsilon();
    const double* w = tot.data();
    const double* first = w + kk;
    const double* second = first + kk * c;
    double total = 0.0;
    for (int64_t a = 0; a < k; ++a) {
      double n = 0.0;
      for (int64_t j = 0; j < k; ++j) n += w[a * k + j];
      nk[a] = n + tiny;
      total += nk[a];
      for (int64_t ch = 0; ch < c; ++ch) {
        double o1 = 0.0, o2 = 0.0;
        for (int64_t j = 0; j < k; ++j) {  // x - c_a = z + (c_j - c_a) for the points assigned to seed j
          const double delta = cen[j * c + ch] - cen[a * c + ch];
          const double f = first[(a * k + j) * c + ch], wj = w[a * k + j];
          o1 += f + wj * delta;
          o2 += second[(a * k + j) * c + ch] + delta * (2.0 * f + wj * delta);
        }
        const double offset = o1 / nk[a];
        mu_out[a * c + ch] = cen[a * c + ch] + offset;
        var_out[a * c + ch] = std::max(o2 / nk[a] - offset * offset, 0.0) + reg_covar;
      }
    }
    for (int64_t a = 0; a < k; ++a) w_out[a] = nk[a] / total;
    if (prune >= 0.0) {  // normsearch.norms._gmm.prune_components: drop weights < prune, keep the heaviest
      const int64_t heaviest = std::max_element(w_out.begin(), w_out.end()) - w_out.begin();
      double kept = 0.0;
      for (int64_t a = 0; a < k; ++a) {
        if (!(a == heaviest || (w_out[a] >= prune && w_out[a] > 0.0))) w_out[a] = 0.0;
        kept += w_out[a];
      }
      for (int64_t a = 0; a < k; ++a) w_out[a] /= kept;
    }
  });
  const auto dtype = points.scalar_type();
  return {torch::tensor(w_out, torch::kFloat64).to(dtype), torch::tensor(mu_out, torch::kFloat64).view({k, c}).to(dtype),
          torch::tensor(var_out, torch::kFloat64).view({k, c}).to(dtype), nearest};
}

// The subsample the GMM is fitted to, centred: points[i * per + j, c] = pixel idx[i, j] of image i,
// minus the points' per-channel mean (also returned). Rows: a (P, C) with idx the row index; planes:
// a (N, C, L) with idx (N, per) the position in the image. The mean is summed in double.
std::vector<at::Tensor> mixture_fit_points(const at::Tensor& a, const at::Tensor& idx) {
  TORCH_CHECK(a.device().is_cpu() && a.is_contiguous() && (a.dim() == 2 || a.dim() == 3),
              "pixels must be a contiguous (P, C) or (N, C, L) CPU tensor");
  TORCH_CHECK(idx.dim() == 2 && idx.is_contiguous() && idx.scalar_type() == at::kLong, "idx must be a contiguous (N, per) int64 tensor");
  const bool planes = a.dim() == 3;
  const int64_t c = a.size(1), n = idx.size(0), per = idx.size(1), m = n * per;
  TORCH_CHECK(!planes || a.size(0) == n, "idx must have one row per image");
  const int64_t bound = planes ? a.size(2) : a.size(0);
  auto out = at::empty({m, c}, a.options());
  auto mean = at::empty({c}, a.options());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "mixture_fit_points", [&] {
    const scalar_t* src = a.data_ptr<scalar_t>();
    const int64_t* ix = idx.data_ptr<int64_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    for (int64_t i = 0; i < m; ++i) TORCH_CHECK(ix[i] >= 0 && ix[i] < bound, "idx out of range");
    at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t* ixi = ix + i * per;
        scalar_t* oi = dst + i * per * c;
        // The random reads do not trigger the hardware prefetcher: prefetch ahead by hand.
        constexpr int64_t line = 64 / sizeof(scalar_t);
        if (planes) {  // plane by plane: each (sample, channel) plane is read from cache, not per point
          for (int64_t ch = 0; ch < c; ++ch) {
            const scalar_t* plane = src + (i * c + ch) * bound;
            if (ch + 1 < c || i + 1 < end) {
              const scalar_t* next = ch + 1 < c ? plane + bound : src + (i + 1) * c * bound;
              for (int64_t l = 0; l < bound; l += line) __builtin_prefetch(next + l);
            }
            for (int64_t j = 0; j < per; ++j) oi[j * c + ch] = plane[ixi[j]];
          }
        } else {
          for (int64_t j = 0; j < per; ++j) {
            if (j + 8 < per) __builtin_prefetch(src + ixi[j + 8] * c);
            std::memcpy(oi + j * c, src + ixi[j] * c, c * sizeof(scalar_t));
          }
        }
      }
    });
    std::vector<double> sum(c, 0.0);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t ch = 0; ch < c; ++ch) sum[ch] += dst[i * c + ch];
    scalar_t* mp = mean.data_ptr<scalar_t>();
    for (int64_t ch = 0; ch < c; ++ch) mp[ch] = static_cast<scalar_t>(sum[ch] / static_cast<double>(m));
    at::parallel_for(0, m, 4096, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* o = dst + i * c;
        for (int64_t ch = 0; ch < c; ++ch) o[ch] -= mp[ch];
      }
    });
  });
  return {out, mean};
}

namespace {
template <typename T, int CT>
void kmeans_pp_kernel(const T* xp, const float* dp, int64_t m, int64_t c_count, int64_t steps, int64_t trials,
                      std::vector<int64_t>* rows);
}  // namespace

// K-means++ seeding of normsearch.norms._gmm.kmeans_pp_init with torch's random draws given:
// `first` (1,) the first centre's row, `draws` (K - 1, trials) the U[0, 1) numbers of the later
// steps (torch.rand, in order). Each step draws `trials` candidates with probability proportional
// to the squared distance to the nearest centre (cumulative sums accumulated in double and stored
// in the points' dtype, searchsorted right, clamped to the last row) and keeps the one that lowers
// the summed distances most (first on ties). Distances in the form sum_c (x_c - y_c)^2: a point equal
// to a chosen centre is at distance exactly 0 and never drawn. Returns (centres (K, C), rows (K,)).
std::vector<at::Tensor> kmeans_pp(const at::Tensor& x, const at::Tensor& first, const at::Tensor& draws) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous() && x.size(0) >= 1,
              "points must be a contiguous (M, C) CPU tensor with M >= 1");
  TORCH_CHECK(first.numel() == 1 && first.scalar_type() == at::kLong, "first must be one int64 row index");
  TORCH_CHECK(draws.dim() == 2 && draws.is_contiguous() && draws.scalar_type() == at::kFloat,
              "draws must be a contiguous (K - 1, trials) float32 tensor");
  const int64_t m = x.size(0), c = x.size(1), steps = draws.size(0), trials = draws.size(1);
  const int64_t first_row = first.item<int64_t>();
  TORCH_CHECK(first_row >= 0 && first_row < m, "first out of range");
  std::vector<int64_t> rows{first_row};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "kmeans_pp", [&] {
    by_width<scalar_t>(c, [&](auto width) {
      kmeans_pp_kernel<scalar_t, decltype(width)::value>(x.data_ptr<scalar_t>(), draws.data_ptr<float>(), m, c, steps,
                                                          trials, &rows);
    });
  });
  auto idx = torch::tensor(rows, torch::kLong);
  return {x.index_select(0, idx), idx};
}

namespace {

template <typename T, int CT>
void kmeans_pp_kernel(const T* xp, const float* dp, int64_t m, int64_t c_count, int64_t steps, int64_t trials,
                      std::vector<int64_t>* rows) {
    const int64_t c = CT > 0 ? CT : c_count;
    using scalar_t = T;
    const int64_t first_row = (*rows)[0];
    std::vector<scalar_t> closest(m), cumulative(m), cand_dist(trials * m);
    auto sq_dist = [&](int64_t i, int64_t j) {
      const scalar_t* __restrict a = xp + i * c;
      const scalar_t* __restrict b = xp + j * c;
      scalar_t d2 = scalar_t(0);
      #pragma omp simd reduction(+ : d2)
      for (int64_t ch = 0; ch < c; ++ch) {
        const scalar_t d = a[ch] - b[ch];
        d2 += d * d;
      }
      return d2;
    };
    at::parallel_for(0, m, 2048, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) closest[i] = sq_dist(i, first_row);
    });
    std::vector<int64_t> cand(trials);
    const int64_t chunks = (m + CHUNK - 1) / CHUNK;
    std::vector<double> partial(chunks * trials);
    for (int64_t step = 0; step < steps; ++step) {
      double acc = 0.0;
      for (int64_t i = 0; i < m; ++i) {
        acc += static_cast<double>(closest[i]);
        cumulative[i] = static_cast<scalar_t>(acc);
      }
      for (int64_t t = 0; t < trials; ++t) {
        const scalar_t value = static_cast<scalar_t>(dp[step * trials + t]) * cumulative[m - 1];
        const int64_t pos = std::upper_bound(cumulative.begin(), cumulative.end(), value) - cumulative.begin();
        cand[t] = std::min(pos, m - 1);
      }
      std::fill(partial.begin(), partial.end(), 0.0);
      at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
        for (int64_t chunk = begin; chunk < end; ++chunk) {
          const int64_t stop = std::min(m, (chunk + 1) * CHUNK);
          for (int64_t t = 0; t < trials; ++t) {
            double sum = 0.0;
            scalar_t* dt = cand_dist.data() + t * m;
            for (int64_t i = chunk * CHUNK; i < stop; ++i) {
              const scalar_t d = std::min(sq_dist(i, cand[t]), closest[i]);
              dt[i] = d;
              sum += static_cast<double>(d);
            }
            partial[chunk * trials + t] = sum;
          }
        }
      });
      int64_t best = 0;
      double best_sum = 0.0;
      for (int64_t t = 0; t < trials; ++t) {
        double sum = 0.0;
        for (int64_t chunk = 0; chunk < chunks; ++chunk) sum += partial[chunk * trials + t];
        if (t == 0 || sum < best_sum) {
          best = t;
          best_sum = sum;
        }
      }
      std::copy(cand_dist.begin() + best * m, cand_dist.begin() + (best + 1) * m, closest.begin());
      rows->push_back(cand[best]);
    }
}

}  // namespace

namespace {

// (K, C) tensor -> doubles.
std::vector<double> doubles(const at::Tensor& t) {
  const auto d = t.to(at::kDouble).contiguous();
  return std::vector<double>(d.data_ptr<double>(), d.data_ptr<double>() + d.numel());
}

at::Tensor from_doubles(const std::vector<double>& v, at::IntArrayRef shape, const at::Tensor& like) {
  return torch::tensor(v, torch::kFloat64).view(shape).to(like.scalar_type());
}

}  // namespace

// Forward of normsearch.norms._mixture_kernels._MixtureNormalize in the compiled loops: the centred
// moments of the (shifted) pixels (one pass), the (K, C) statistics in double, and
// y = x (nu s) - nu (s E1 - beta) (one pass). Returns (y, mean, var, offset = E1 - centre,
// scale = 1 / (sqrt(lambda) sqrt(var + eps)), unclamped (var before the clamp at 0 was >= 0)).
std::vector<at::Tensor> mixture_norm_forward(const at::Tensor& a, const at::Tensor& nu, const at::Tensor& mass,
                                             const at::Tensor& centre, const c10::optional<at::Tensor>& weight,
                                             const c10::optional<at::Tensor>& bias, double eps,
                                             const c10::optional<at::Tensor>& shift) {
  auto sums = mixture_sums(a, nu, c10::nullopt, centre, shift);
  const int64_t k = centre.size(0), c = centre.size(1);
  const int64_t points = nu.numel() / k;
  const auto s1 = doubles(sums[0]), s2 = doubles(sums[1]), ms = doubles(mass), cen = doubles(centre);
  std::vector<double> w(c, 1.0), b(c, 0.0);
  if (weight.has_value()) w = doubles(*weight);
  if (bias.has_value()) b = doubles(*bias);
  std::vector<double> mean(k * c), var(k * c), offset(k * c), scale(k * c), s(k * c), off(k * c), unclamped(k * c);
  for (int64_t q = 0; q < k; ++q) {
    const double lam = 1.0 / std::sqrt(ms[q] / static_cast<double>(points));
    for (int64_t ch = 0; ch < c; ++ch) {
      const int64_t i = q * c + ch;
      offset[i] = s1[i] / ms[q];
      mean[i] = cen[i] + offset[i];
      const double pre = s2[i] / ms[q] - offset[i] * offset[i];
      unclamped[i] = pre >= 0.0 ? 1.0 : 0.0;
      var[i] = std::max(pre, 0.0);
      scale[i] = lam / std::sqrt(var[i] + eps);
      s[i] = scale[i] * w[ch];
      off[i] = b[ch] - s[i] * mean[i];  // -(s E1 - beta)
    }
  }
  const std::vector<int64_t> kc{k, c};
  auto y = mixture_combine(a, nu, from_doubles(s, kc, a), from_doubles(off, kc, a), c10::nullopt, c10::nullopt, shift);
  return {y, from_doubles(mean, kc, a), from_doubles(var, kc, a), from_doubles(offset, kc, a), from_doubles(scale, kc, a),
          from_doubles(unclamped, kc, a).to(at::kBool)};
}

// Backward of the same: G = nu^T g, H = nu^T (g (x - c)) (one pass), the (K, C) coefficients in
// double, dx = g (nu s) + nu dE1 + (x - shift) (nu q) (one pass). Returns (dx, dweight, dbias);
// dweight is empty without a weight.
std::vector<at::Tensor> mixture_norm_backward(const at::Tensor& g, const at::Tensor& nu, const at::Tensor& a,
                                              const at::Tensor& mass, const at::Tensor& centre,
                                              const c10::optional<at::Tensor>& weight, const at::Tensor& offset,
                                              const at::Tensor& scale, const at::Tensor& var,
                                              const at::Tensor& unclamped, double eps,
                                              const c10::optional<at::Tensor>& shift) {
  auto sums = mixture_sums(g, nu, a, centre, shift);  // G, H
  const int64_t k = centre.size(0), c = centre.size(1);
  const auto gs = doubles(sums[0]), hs = doubles(sums[1]), ms = doubles(mass), cen = doubles(centre);
  const auto off = doubles(offset), sc = doubles(scale), vr = doubles(var), un = doubles(unclamped);
  std::vector<double> w(c, 1.0);
  if (weight.has_value()) w = doubles(*weight);
  std::vector<double> s(k * c), d_e1(k * c), q(k * c), dw(c, 0.0), db(c, 0.0);
  for (int64_t r = 0; r < k; ++r) {
    for (int64_t ch = 0; ch < c; ++ch) {
      const int64_t i = r * c + ch;
      const double centred = hs[i] - off[i] * gs[i];  // sum nu g (x - E1)
      dw[ch] += sc[i] * centred;
      db[ch] += gs[i];
      s[i] = sc[i] * w[ch];
      const double d_var = un[i] != 0.0 ? -0.5 * s[i] * centred / (vr[i] + eps) : 0.0;
      d_e1[i] = (-s[i] * gs[i] - 2.0 * (cen[i] + off[i]) * d_var) / ms[r];
      q[i] = 2.0 * d_var / ms[r];
    }
  }
  const std::vector<int64_t> kc{k, c};
  auto dx = mixture_combine(g, nu, from_doubles(s, kc, a), from_doubles(d_e1, kc, a), a, from_doubles(q, kc, a), shift);
  return {dx, weight.has_value() ? from_doubles(dw, {c}, a) : at::Tensor(), from_doubles(db, {c}, a)};
}
