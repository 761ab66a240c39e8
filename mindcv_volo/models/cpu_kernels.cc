// Fused float32 CPU kernels for MindSpore's AOT custom ops (ops.Custom(func_type="aot")), each forward and
// backward: LayerNorm and softmax over the last axis, exact (erf) GELU, BatchNorm + ReLU on channels-last
// maps (training and inference), im2col / col2im on channels-last maps, and the bias gradient of a Dense.
//
// Why by hand: MindSpore's CPU backend runs every op as its own pass over memory (kernel fusion is for
// GPU/Ascend only), computes GELU as five passes with a slow Erf, runs LayerNorm and LayerNormGrad on one
// thread (LayerNormGrad ~32 ns per element: 12% of a VOLO-D1 training step) and moves data slowly
// (Transpose, Gather). Each kernel here is one or two passes, on every core. Built by
// mindcv_volo/models/cpu_kernels.py on first use.
//
// The AOT calling convention: params holds the inputs, then the outputs; shapes[i] has ndims[i] sizes.
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

// glibc's libmvec (>= 2.35) has vector forms of erff and expf. Declared SIMD-callable here, instead of
// compiling with -ffast-math, which would also assume that no value is NaN or infinite.
extern "C" {
__attribute__((simd("notinbranch"))) float erff(float);
__attribute__((simd("notinbranch"))) float expf(float);
}

namespace {

constexpr float kLayerNormEps = 1e-5f;  // torch's default, VOLO's LayerNorm
constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;

int cpu_count() {
  static const int count = [] {
    cpu_set_t set;
    return sched_getaffinity(0, sizeof(set), &set) == 0 ? std::max(1, CPU_COUNT(&set)) : 1;
  }();
  return count;
}

// Calls body(begin, end, chunk) on contiguous chunks of [0, n), one chunk per core, each at least
// min_chunk long. Threads are started per call (tens of microseconds, against kernels of milliseconds)
// so that nothing spins between calls and takes cores from MindSpore's own kernels.
template <typename Body>
int parallel_for(int64_t n, int64_t min_chunk, const Body &body) {
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(cpu_count(), n / std::max<int64_t>(min_chunk, 1)));
  const int64_t step = (n + chunks - 1) / chunks;
  std::vector<std::thread> workers;
  for (int64_t c = 1; c < chunks; ++c) {
    const int64_t begin = c * step, end = std::min(n, begin + step);
    if (begin < end) workers.emplace_back([&body, begin, end, c] { body(begin, end, c); });
  }
  body(0, std::min(n, step), 0);
  for (auto &worker : workers) worker.join();
  return static_cast<int>(chunks);
}

int64_t element_count(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < ndim; ++i) n *= shape[i];
  return n;
}

// Per-column (per-channel) sums over the rows of a (rows, C) map, in double: body(row, sums) adds one row's
// terms into sums[0 .. terms * C). Rows are split over threads; the partial sums are added in chunk order,
// so the result is the same on every run.
template <typename Body>
std::vector<double> channel_sums(int64_t rows, int64_t width, int terms, const Body &body) {
  std::vector<double> partial(static_cast<size_t>(cpu_count()) * terms * width, 0.0);
  const int chunks = parallel_for(rows, 256, [&](int64_t begin, int64_t end, int64_t chunk) {
    double *sums = partial.data() + chunk * terms * width;
    for (int64_t r = begin; r < end; ++r) body(r, sums);
  });
  std::vector<double> total(static_cast<size_t>(terms) * width, 0.0);
  for (int c = 0; c < chunks; ++c)
    for (int64_t i = 0; i < terms * width; ++i) total[i] += partial[c * terms * width + i];
  return total;
}

// Mean and 1 / sqrt(var + eps) of one row, two passes (as torch: no E[x^2] - E[x]^2 cancellation).
void row_statistics(const float *x, int64_t width, float *mean_out, float *rstd_out) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < width; ++i) sum += x[i];
  const float mean = sum / static_cast<float>(width);
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < width; ++i) squares += (x[i] - mean) * (x[i] - mean);
  *mean_out = mean;
  *rstd_out = 1.f / std::sqrt(squares / static_cast<float>(width) + kLayerNormEps);
}

}  // namespace

// inputs x (..., C), gamma (C), beta (C); output y (..., C)
extern "C" int LayerNormForward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const auto *x = static_cast<const float *>(params[0]);
  const auto *gamma = static_cast<const float *>(params[1]);
  const auto *beta = static_cast<const float *>(params[2]);
  auto *y = static_cast<float *>(params[3]);
  const int64_t width = shapes[0][ndims[0] - 1];
  const int64_t rows = element_count(ndims[0], shapes[0]) / width;
  parallel_for(rows, 64, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t r = begin; r < end; ++r) {
      const float *xr = x + r * width;
      float *yr = y + r * width;
      float mean, rstd;
      row_statistics(xr, width, &mean, &rstd);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) yr[i] = (xr[i] - mean) * rstd * gamma[i] + beta[i];
    }
  });
  return 0;
}

// inputs x (..., C), gamma (C), dy (..., C); outputs dx (..., C), dgamma (C), dbeta (C).
// The row statistics are recomputed from x (one pass) instead of being kept from the forward.
extern "C" int LayerNormBackward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const auto *x = static_cast<const float *>(params[0]);
  const auto *gamma = static_cast<const float *>(params[1]);
  const auto *dy = static_cast<const float *>(params[2]);
  auto *dx = static_cast<float *>(params[3]);
  auto *dgamma = static_cast<float *>(params[4]);
  auto *dbeta = static_cast<float *>(params[5]);
  const int64_t width = shapes[0][ndims[0] - 1];
  const int64_t rows = element_count(ndims[0], shapes[0]) / width;
  // per row: dx, and its terms of dgamma (sums[0 .. C)) and dbeta (sums[C .. 2C))
  const std::vector<double> sums = channel_sums(rows, width, 2, [&](int64_t r, double *s) {
    const float *xr = x + r * width;
    const float *dyr = dy + r * width;
    float *dxr = dx + r * width;
    float mean, rstd;
    row_statistics(xr, width, &mean, &rstd);
    float sum_g = 0.f, sum_g_xhat = 0.f;
#pragma omp simd reduction(+ : sum_g, sum_g_xhat)
    for (int64_t i = 0; i < width; ++i) {
      const float xhat = (xr[i] - mean) * rstd;
      const float g = dyr[i] * gamma[i];
      sum_g += g;
      sum_g_xhat += g * xhat;
      s[i] += dyr[i] * xhat;
      s[width + i] += dyr[i];
    }
    const float mean_g = sum_g / static_cast<float>(width);
    const float mean_g_xhat = sum_g_xhat / static_cast<float>(width);
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      const float xhat = (xr[i] - mean) * rstd;
      dxr[i] = rstd * (dyr[i] * gamma[i] - mean_g - xhat * mean_g_xhat);
    }
  });
  for (int64_t i = 0; i < width; ++i) {
    dgamma[i] = static_cast<float>(sums[i]);
    dbeta[i] = static_cast<float>(sums[width + i]);
  }
  return 0;
}

// input x; output x * 0.5 * (1 + erf(x / sqrt 2)), torch's exact GELU
extern "C" int GeluForward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const auto *x = static_cast<const float *>(params[0]);
  auto *y = static_cast<float *>(params[1]);
  parallel_for(element_count(ndims[0], shapes[0]), 16384, [&](int64_t begin, int64_t end, int64_t) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) y[i] = x[i] * 0.5f * (1.f + erff(x[i] * kSqrtHalf));
  });
  return 0;
}

// inputs x, dy; output dx = dy * (Phi(x) + x * phi(x))
extern "C" int GeluBackward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const auto *x = static_cast<const float *>(params[0]);
  const auto *dy = static_cast<const float *>(params[1]);
  auto *dx = static_cast<float *>(params[2]);
  parallel_for(element_count(ndims[0], shapes[0]), 16384, [&](int64_t begin, int64_t end, int64_t) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float cdf = 0.5f * (1.f + erff(x[i] * kSqrtHalf));
      const float pdf = kInvSqrt2Pi * expf(-0.5f * x[i] * x[i]);
      dx[i] = dy[i] * (cdf + x[i] * pdf);
    }
  });
  return 0;
}

// input x (..., N); output softmax over the last axis
extern "C" int SoftmaxForward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const auto *x = static_cast<const float *>(params[0]);
  auto *y = static_cast<float *>(params[1]);
  const int64_t width = shapes[0][ndims[0] - 1];
  const int64_t rows = element_count(ndims[0], shapes[0]) / width;
  parallel_for(rows, std::max<int64_t>(1, 16384 / width), [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t r = begin; r < end; ++r) {
      const float *xr = x + r * width;
      float *yr = y + r * width;
      float top = xr[0];
      for (int64_t i = 1; i < width; ++i) top = std::max(top, xr[i]);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < width; ++i) {
        yr[i] = expf(xr[i] - top);
        sum += yr[i];
      }
      const float inv = 1.f / sum;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) yr[i] *= inv;
    }
  });
  return 0;
}

// inputs y (the forward's output), dy; output dx = y * (dy - sum(dy * y)) per row
extern "C" int SoftmaxBackward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const auto *y = static_cast<const float *>(params[0]);
  const auto *dy = static_cast<const float *>(params[1]);
  auto *dx = static_cast<float *>(params[2]);
  const int64_t width = shapes[0][ndims[0] - 1];
  const int64_t rows = element_count(ndims[0], shapes[0]) / width;
  parallel_for(rows, std::max<int64_t>(1, 16384 / width), [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t r = begin; r < end; ++r) {
      const float *yr = y + r * width;
      const float *dyr = dy + r * width;
      float *dxr = dx + r * width;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < width; ++i) dot += dyr[i] * yr[i];
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) dxr[i] = yr[i] * (dyr[i] - dot);
    }
  });
  return 0;
}

namespace {

constexpr double kBatchNormEps = 1e-5;  // VOLO's BatchNorm2d (layers.batch_norm)

// Batch statistics of a channels-last (rows, C) map (mean and biased variance in two passes, in double)
// and the per-channel affine map that BatchNorm becomes with them: y = x * scale + shift.
struct BatchNormTerms {
  std::vector<double> mean, var;
  std::vector<float> mean_f, rstd, scale, shift;

  BatchNormTerms(const float *x, const float *gamma, const float *beta, int64_t rows, int64_t width)
      : mean_f(width), rstd(width), scale(width), shift(width) {
    mean = channel_sums(rows, width, 1, [&](int64_t r, double *sums) {
      const float *xr = x + r * width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) sums[i] += xr[i];
    });
    for (auto &m : mean) m /= static_cast<double>(rows);
    const double *mu = mean.data();
    var = channel_sums(rows, width, 1, [&](int64_t r, double *sums) {
      const float *xr = x + r * width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) sums[i] += (xr[i] - mu[i]) * (xr[i] - mu[i]);
    });
    for (int64_t i = 0; i < width; ++i) {
      var[i] /= static_cast<double>(rows);
      const double inv_std = 1.0 / std::sqrt(var[i] + kBatchNormEps);
      mean_f[i] = static_cast<float>(mean[i]);
      rstd[i] = static_cast<float>(inv_std);
      scale[i] = static_cast<float>(gamma[i] * inv_std);
      shift[i] = static_cast<float>(beta[i] - mean[i] * gamma[i] * inv_std);
    }
  }
};

// y = max(0, x * scale + shift) on channels-last rows
void affine_relu(const float *x, const float *scale, const float *shift, int64_t rows, int64_t width, float *y) {
  parallel_for(rows, 256, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t r = begin; r < end; ++r) {
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) y[r * width + i] = std::max(0.f, x[r * width + i] * scale[i] + shift[i]);
    }
  });
}

}  // namespace

// Training BatchNorm (batch statistics) + ReLU on a channels-last map.
// inputs x (..., C), gamma (C), beta (C); outputs y (..., C), batch mean (C), biased batch variance (C)
extern "C" int BatchNormReluForward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const auto *x = static_cast<const float *>(params[0]);
  const auto *gamma = static_cast<const float *>(params[1]);
  const auto *beta = static_cast<const float *>(params[2]);
  auto *y = static_cast<float *>(params[3]);
  auto *mean_out = static_cast<float *>(params[4]);
  auto *var_out = static_cast<float *>(params[5]);
  const int64_t width = shapes[0][ndims[0] - 1];
  const int64_t rows = element_count(ndims[0], shapes[0]) / width;
  const BatchNormTerms bn(x, gamma, beta, rows, width);
  for (int64_t i = 0; i < width; ++i) {
    mean_out[i] = bn.mean_f[i];
    var_out[i] = static_cast<float>(bn.var[i]);
  }
  affine_relu(x, bn.scale.data(), bn.shift.data(), rows, width, y);
  return 0;
}

// inputs x, gamma, beta, dy; outputs dx, dgamma, dbeta. The statistics are recomputed from x.
extern "C" int BatchNormReluBackward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const auto *x = static_cast<const float *>(params[0]);
  const auto *gamma = static_cast<const float *>(params[1]);
  const auto *beta = static_cast<const float *>(params[2]);
  const auto *dy = static_cast<const float *>(params[3]);
  auto *dx = static_cast<float *>(params[4]);
  auto *dgamma = static_cast<float *>(params[5]);
  auto *dbeta = static_cast<float *>(params[6]);
  const int64_t width = shapes[0][ndims[0] - 1];
  const int64_t rows = element_count(ndims[0], shapes[0]) / width;
  const BatchNormTerms bn(x, gamma, beta, rows, width);
  const float *mu = bn.mean_f.data(), *rstd = bn.rstd.data(), *scale = bn.scale.data(), *shift = bn.shift.data();
  // g = dy where the ReLU passed; sums of g and of g * xhat per channel: dbeta and dgamma
  const std::vector<double> sums = channel_sums(rows, width, 2, [&](int64_t r, double *s) {
    const float *xr = x + r * width;
    const float *dyr = dy + r * width;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      const float g = xr[i] * scale[i] + shift[i] > 0.f ? dyr[i] : 0.f;
      s[i] += g;
      s[width + i] += g * (xr[i] - mu[i]) * rstd[i];
    }
  });
  std::vector<float> mean_g(width), mean_g_xhat(width);
  for (int64_t i = 0; i < width; ++i) {
    dbeta[i] = static_cast<float>(sums[i]);
    dgamma[i] = static_cast<float>(sums[width + i]);
    mean_g[i] = static_cast<float>(sums[i] / rows);
    mean_g_xhat[i] = static_cast<float>(sums[width + i] / rows);
  }
  parallel_for(rows, 256, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t r = begin; r < end; ++r) {
      const float *xr = x + r * width;
      const float *dyr = dy + r * width;
      float *dxr = dx + r * width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) {
        const float g = xr[i] * scale[i] + shift[i] > 0.f ? dyr[i] : 0.f;
        const float xhat = (xr[i] - mu[i]) * rstd[i];
        dxr[i] = scale[i] * (g - mean_g[i] - xhat * mean_g_xhat[i]);
      }
    }
  });
  return 0;
}

// Inference BatchNorm (a per-channel affine map) + ReLU on a channels-last map.
// inputs x (..., C), scale (C), shift (C); output y
extern "C" int AffineReluForward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const int64_t width = shapes[0][ndims[0] - 1];
  affine_relu(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]),
              static_cast<const float *>(params[2]), element_count(ndims[0], shapes[0]) / width, width,
              static_cast<float *>(params[3]));
  return 0;
}

// inputs x, scale, shift, dy; outputs dx, dscale, dshift
extern "C" int AffineReluBackward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const auto *x = static_cast<const float *>(params[0]);
  const auto *scale = static_cast<const float *>(params[1]);
  const auto *shift = static_cast<const float *>(params[2]);
  const auto *dy = static_cast<const float *>(params[3]);
  auto *dx = static_cast<float *>(params[4]);
  const int64_t width = shapes[0][ndims[0] - 1];
  const int64_t rows = element_count(ndims[0], shapes[0]) / width;
  const std::vector<double> sums = channel_sums(rows, width, 2, [&](int64_t r, double *s) {
    const float *xr = x + r * width;
    const float *dyr = dy + r * width;
    float *dxr = dx + r * width;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      const float g = xr[i] * scale[i] + shift[i] > 0.f ? dyr[i] : 0.f;
      dxr[i] = g * scale[i];
      s[i] += g * xr[i];
      s[width + i] += g;
    }
  });
  for (int64_t i = 0; i < width; ++i) {
    static_cast<float *>(params[5])[i] = static_cast<float>(sums[i]);
    static_cast<float *>(params[6])[i] = static_cast<float>(sums[width + i]);
  }
  return 0;
}

// Sliding windows on channels-last maps: what ops.unfold / ops.fold compute (torch's nn.Unfold / F.fold),
// with the window tap as its own axis and the channels last. geometry = (kernel, stride, padding), int32.

// inputs x (B, H, W, C), geometry; output cols (B, OH, OW, K * K, C), zero where a tap is in the padding
extern "C" int Im2ColForward(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const auto *x = static_cast<const float *>(params[0]);
  const auto *geometry = static_cast<const int32_t *>(params[1]);
  auto *cols = static_cast<float *>(params[2]);
  const int64_t batch = shapes[0][0], height = shapes[0][1], width = shapes[0][2], channels = shapes[0][3];
  const int64_t out_h = shapes[2][1], out_w = shapes[2][2];
  const int64_t k = geometry[0], stride = geometry[1], padding = geometry[2];
  parallel_for(batch * out_h, 1, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / out_h, oy = row % out_h;
      float *dst = cols + row * out_w * k * k * channels;
      for (int64_t ox = 0; ox < out_w; ++ox) {
        for (int64_t ky = 0; ky < k; ++ky) {
          const int64_t y = oy * stride - padding + ky;
          for (int64_t kx = 0; kx < k; ++kx, dst += channels) {
            const int64_t xx = ox * stride - padding + kx;
            if (y < 0 || y >= height || xx < 0 || xx >= width) {
              std::fill(dst, dst + channels, 0.f);
            } else {
              std::copy_n(x + ((b * height + y) * width + xx) * channels, channels, dst);
            }
          }
        }
      }
    }
  });
  return 0;
}

// inputs cols (B, OH, OW, K * K, C), geometry; output x (B, OH * stride, OW * stride, C): each pixel the
// sum of the window taps that cover it (the adjoint of Im2ColForward). Written per output pixel, so the
// threads never write to the same place.
extern "C" int Col2ImForward(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const auto *cols = static_cast<const float *>(params[0]);
  const auto *geometry = static_cast<const int32_t *>(params[1]);
  auto *x = static_cast<float *>(params[2]);
  const int64_t out_h = shapes[0][1], out_w = shapes[0][2], channels = shapes[0][4];
  const int64_t batch = shapes[2][0], height = shapes[2][1], width = shapes[2][2];
  const int64_t k = geometry[0], stride = geometry[1], padding = geometry[2];
  parallel_for(batch * height, 1, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / height, y = row % height;
      for (int64_t xx = 0; xx < width; ++xx) {
        float *dst = x + (row * width + xx) * channels;
        std::fill(dst, dst + channels, 0.f);
        for (int64_t ky = 0; ky < k; ++ky) {
          const int64_t ny = y + padding - ky;
          if (ny < 0 || ny % stride != 0 || ny / stride >= out_h) continue;
          for (int64_t kx = 0; kx < k; ++kx) {
            const int64_t nx = xx + padding - kx;
            if (nx < 0 || nx % stride != 0 || nx / stride >= out_w) continue;
            const float *src = cols + ((((b * out_h + ny / stride) * out_w + nx / stride) * k + ky) * k + kx) * channels;
#pragma omp simd
            for (int64_t c = 0; c < channels; ++c) dst[c] += src[c];
          }
        }
      }
    }
  });
  return 0;
}

// MindSpore's CPU BiasAddGrad is slower than a pass over memory.
// input dy (..., C); output the bias gradient: dy summed over every axis but the last
extern "C" int BiasAddBackward(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const auto *dy = static_cast<const float *>(params[0]);
  auto *dbias = static_cast<float *>(params[1]);
  const int64_t width = shapes[0][ndims[0] - 1];
  const std::vector<double> sums = channel_sums(element_count(ndims[0], shapes[0]) / width, width, 1,
                                                [&](int64_t r, double *s) {
#pragma omp simd
                                                  for (int64_t i = 0; i < width; ++i) s[i] += dy[r * width + i];
                                                });
  for (int64_t i = 0; i < width; ++i) dbias[i] = static_cast<float>(sums[i]);
  return 0;
}
