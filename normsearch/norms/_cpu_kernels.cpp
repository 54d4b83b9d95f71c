// Fused CPU loops for the per-(sample, channel) normalizers on channels_last tensors.
//
// A channels_last (N, C, H, W) tensor is laid out as (N, H*W, C): every reduction over H, W for a
// fixed sample reads one contiguous slab of H*W*C values (16-64 KiB in a CIFAR ResNet, so it stays
// in cache between the two passes of `moments`). Eager PyTorch has no fused kernel for these
// reductions on that layout (it materialises (x - mean)^2 or g * x first); these loops read each
// input once from memory. Built on first use by normsearch/norms/_cpu_ext.py; the Python fallback
// in _per_sample.py computes the same quantities with plain ops.
//
// Accuracy: sums run in the input type over blocks of BLOCK rows and are added up in double, so a
// float32 sum over H*W = 1024 values is as accurate as PyTorch's cascade sum. The variance is the
// two-pass mean of (x - mean)^2, never E[x^2] - E[x]^2.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

namespace {

constexpr int64_t BLOCK = 32;

struct Dims {
  int64_t n, c, hw;
};

Dims check_channels_last(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4, name, " must be a 4-D CPU tensor");
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast), name, " must be channels_last contiguous");
  return {x.size(0), x.size(1), x.size(2) * x.size(3)};
}

void check_small(const at::Tensor& t, const at::Tensor& x, const Dims& d, const char* name) {
  TORCH_CHECK(t.is_contiguous() && t.numel() == d.n * d.c && t.scalar_type() == x.scalar_type(), name,
              " must be a contiguous (N, C) tensor of the input's dtype");
}

// tot[c] += sum over rows of (centre ? (row[c] - centre[c])^2 : row[c]); `part` is scratch of size C.
template <typename T>
void column_sums(const T* __restrict x, int64_t rows, int64_t C, const T* __restrict centre, double* __restrict tot,
                 T* __restrict part) {
  for (int64_t r0 = 0; r0 < rows; r0 += BLOCK) {
    const int64_t r1 = std::min(rows, r0 + BLOCK);
    std::fill(part, part + C, T(0));
    for (int64_t r = r0; r < r1; ++r) {
      const T* __restrict row = x + r * C;
      if (centre != nullptr) {
        for (int64_t c = 0; c < C; ++c) {
          const T d = row[c] - centre[c];
          part[c] += d * d;
        }
      } else {
        for (int64_t c = 0; c < C; ++c) part[c] += row[c];
      }
    }
    for (int64_t c = 0; c < C; ++c) tot[c] += part[c];
  }
}

template <typename T>
void moments_kernel(const T* x, T* var, T* mean, const Dims& d) {
  at::parallel_for(0, d.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> tot(d.c);
    std::vector<T> part(d.c);
    for (int64_t n = begin; n < end; ++n) {
      const T* xn = x + n * d.hw * d.c;
      T* mn = mean + n * d.c;
      std::fill(tot.begin(), tot.end(), 0.0);
      column_sums<T>(xn, d.hw, d.c, nullptr, tot.data(), part.data());
      for (int64_t c = 0; c < d.c; ++c) mn[c] = static_cast<T>(tot[c] / d.hw);
      std::fill(tot.begin(), tot.end(), 0.0);
      column_sums<T>(xn, d.hw, d.c, mn, tot.data(), part.data());
      for (int64_t c = 0; c < d.c; ++c) var[n * d.c + c] = static_cast<T>(tot[c] / d.hw);
    }
  });
}

template <typename T>
void sums_kernel(const T* g, const T* x, T* sum_gx, T* sum_g, const Dims& d) {
  at::parallel_for(0, d.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> tot(2 * d.c);
    std::vector<T> part(2 * d.c);
    T* __restrict part_gx = part.data();
    T* __restrict part_g = part_gx + d.c;
    for (int64_t n = begin; n < end; ++n) {
      const T* gn = g + n * d.hw * d.c;
      const T* xn = x + n * d.hw * d.c;
      std::fill(tot.begin(), tot.end(), 0.0);
      for (int64_t r0 = 0; r0 < d.hw; r0 += BLOCK) {
        const int64_t r1 = std::min(d.hw, r0 + BLOCK);
        std::fill(part.begin(), part.end(), T(0));
        for (int64_t r = r0; r < r1; ++r) {
          const T* __restrict gr = gn + r * d.c;
          const T* __restrict xr = xn + r * d.c;
          for (int64_t c = 0; c < d.c; ++c) {
            part_gx[c] += gr[c] * xr[c];
            part_g[c] += gr[c];
          }
        }
        for (int64_t c = 0; c < 2 * d.c; ++c) tot[c] += part[c];
      }
      for (int64_t c = 0; c < d.c; ++c) {
        sum_gx[n * d.c + c] = static_cast<T>(tot[c]);
        sum_g[n * d.c + c] = static_cast<T>(tot[d.c + c]);
      }
    }
  });
}

template <typename T>
void grad_input_kernel(const T* g, const T* x, const T* scale, const T* p, const T* q, T* out, const Dims& d) {
  at::parallel_for(0, d.n, 1, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const T* __restrict s = scale + n * d.c;
      const T* __restrict pn = p + n * d.c;
      const T* __restrict qn = q + n * d.c;
      const int64_t offset = n * d.hw * d.c;
      for (int64_t r = 0; r < d.hw; ++r) {
        const T* __restrict gr = g + offset + r * d.c;
        const T* __restrict xr = x + offset + r * d.c;
        T* __restrict o = out + offset + r * d.c;
        for (int64_t c = 0; c < d.c; ++c) o[c] = gr[c] * s[c] + xr[c] * pn[c] + qn[c];
      }
    }
  });
}

}  // namespace

// (var, mean): biased per-(sample, channel) variance and mean over H, W, each (N, C).
std::vector<at::Tensor> channels_last_moments(const at::Tensor& x) {
  const Dims d = check_channels_last(x, "x");
  auto var = at::empty({d.n, d.c}, x.options());
  auto mean = at::empty({d.n, d.c}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channels_last_moments", [&] {
    moments_kernel<scalar_t>(x.data_ptr<scalar_t>(), var.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), d);
  });
  return {var, mean};
}

// (sum_hw(g * x), sum_hw(g)), each (N, C).
std::vector<at::Tensor> channels_last_sums(const at::Tensor& g, const at::Tensor& x) {
  const Dims d = check_channels_last(x, "x");
  check_channels_last(g, "grad");
  TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(), "grad must match x");
  auto sum_gx = at::empty({d.n, d.c}, x.options());
  auto sum_g = at::empty({d.n, d.c}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channels_last_sums", [&] {
    sums_kernel<scalar_t>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), sum_gx.data_ptr<scalar_t>(),
                          sum_g.data_ptr<scalar_t>(), d);
  });
  return {sum_gx, sum_g};
}

// g * scale + x * p + q with (N, C) scale, p, q; channels_last like x.
at::Tensor channels_last_grad_input(const at::Tensor& g, const at::Tensor& x, const at::Tensor& scale,
                                    const at::Tensor& p, const at::Tensor& q) {
  const Dims d = check_channels_last(x, "x");
  check_channels_last(g, "grad");
  TORCH_CHECK(g.sizes() == x.sizes() && g.scalar_type() == x.scalar_type(), "grad must match x");
  check_small(scale, x, d, "scale");
  check_small(p, x, d, "p");
  check_small(q, x, d, "q");
  auto out = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "channels_last_grad_input", [&] {
    grad_input_kernel<scalar_t>(g.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), scale.data_ptr<scalar_t>(),
                                p.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), d);
  });
  return out;
}

// Mixture Normalization loops, in _cpu_mixture_kernels.cpp.
std::vector<at::Tensor> mixture_sums(const at::Tensor& a, const at::Tensor& nu, const c10::optional<at::Tensor>& b,
                                     const c10::optional<at::Tensor>& centre, const c10::optional<at::Tensor>& shift);
at::Tensor mixture_combine(const at::Tensor& a, const at::Tensor& nu, const at::Tensor& sc, const at::Tensor& e,
                           const c10::optional<at::Tensor>& b, const c10::optional<at::Tensor>& q,
                           const c10::optional<at::Tensor>& shift);
at::Tensor mixture_posteriors(const at::Tensor& a, const at::Tensor& shift, const at::Tensor& log_weights,
                              const at::Tensor& means, const at::Tensor& variances);
std::vector<at::Tensor> gmm_step(const at::Tensor& points, const at::Tensor& seeds, const c10::optional<at::Tensor>& assign,
                                 const c10::optional<at::Tensor>& weights, const c10::optional<at::Tensor>& means,
                                 const c10::optional<at::Tensor>& variances, double reg_covar, double prune);
std::vector<at::Tensor> mixture_fit_points(const at::Tensor& a, const at::Tensor& idx);
std::vector<at::Tensor> kmeans_pp(const at::Tensor& x, const at::Tensor& first, const at::Tensor& draws);
std::vector<at::Tensor> mixture_norm_forward(const at::Tensor& a, const at::Tensor& nu, const at::Tensor& mass,
                                             const at::Tensor& centre, const c10::optional<at::Tensor>& weight,
                                             const c10::optional<at::Tensor>& bias, double eps,
                                             const c10::optional<at::Tensor>& shift);
std::vector<at::Tensor> mixture_norm_backward(const at::Tensor& g, const at::Tensor& nu, const at::Tensor& a,
                                              const at::Tensor& mass, const at::Tensor& centre,
                                              const c10::optional<at::Tensor>& weight, const at::Tensor& offset,
                                              const at::Tensor& scale, const at::Tensor& var,
                                              const at::Tensor& unclamped, double eps,
                                              const c10::optional<at::Tensor>& shift);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("channels_last_moments", &channels_last_moments, "per-(sample, channel) (var, mean) of a channels_last x");
  m.def("channels_last_sums", &channels_last_sums, "per-(sample, channel) (sum(g * x), sum(g))");
  m.def("channels_last_grad_input", &channels_last_grad_input, "g * scale + x * p + q per (sample, channel)");
  m.def("mixture_sums", &mixture_sums,
        "(nu^T a, nu^T (a * b)) per (component, channel), optionally centred (after a shift); rows or planes",
        py::arg("a"), py::arg("nu"), py::arg("b") = py::none(), py::arg("centre") = py::none(),
        py::arg("shift") = py::none());
  m.def("mixture_combine", &mixture_combine,
        "a * (nu sc) + nu e (+ b * (nu q)) per pixel, the pixel operand shifted first; rows or planes",
        py::arg("a"), py::arg("nu"), py::arg("sc"), py::arg("e"), py::arg("b") = py::none(),
        py::arg("q") = py::none(), py::arg("shift") = py::none());
  m.def("mixture_posteriors", &mixture_posteriors, "posteriors of every (shifted) pixel under a diagonal GMM",
        py::arg("a"), py::arg("shift"), py::arg("log_weights"), py::arg("means"), py::arg("variances"));
  m.def("gmm_step", &gmm_step, "one M-step of the GMM fit (hard on the nearest seed, or after an E-step)",
        py::arg("points"), py::arg("seeds"), py::arg("assign") = py::none(), py::arg("weights") = py::none(), py::arg("means") = py::none(),
        py::arg("variances") = py::none(), py::arg("reg_covar") = 1e-6, py::arg("prune") = -1.0);
  m.def("kmeans_pp", &kmeans_pp, "K-means++ seeding with the given random draws", py::arg("x"), py::arg("first"),
        py::arg("draws"));
  m.def("mixture_norm_forward", &mixture_norm_forward, "MixtureNorm's Eq. 34-37 transform, forward",
        py::arg("a"), py::arg("nu"), py::arg("mass"), py::arg("centre"), py::arg("weight"), py::arg("bias"),
        py::arg("eps"), py::arg("shift"));
  m.def("mixture_norm_backward", &mixture_norm_backward, "MixtureNorm's Eq. 34-37 transform, backward",
        py::arg("g"), py::arg("nu"), py::arg("a"), py::arg("mass"), py::arg("centre"), py::arg("weight"),
        py::arg("offset"), py::arg("scale"), py::arg("var"), py::arg("unclamped"), py::arg("eps"), py::arg("shift"));
  m.def("mixture_fit_points", &mixture_fit_points, "the fit's subsample of pixels, centred, and its mean",
        py::arg("a"), py::arg("idx"));
}
