// Fused float32 CPU kernels for MindSpore's AOT custom ops (ops.Custom(func_type="aot")), each forward and
// backward: LayerNorm and softmax over the last axis, exact (erf) GELU (also with the bias add before it),
// BatchNorm + ReLU on channels-last maps (training and inference), im2col / col2im on channels-last maps,
// the bias add of a Dense (with the residual add after it) and its gradient, transposes (two adjacent axis
// groups swapped; MindSpore's own keeps an index table per output element), self-attention's q, k, v laid
// out from the fused projection, and outlook attention's core (softmax, window weighting, overlap-add) and
// 2 x 2 average pooling.
//
// Why by hand: MindSpore's CPU backend runs every op as its own pass over memory (kernel fusion is for
// GPU/Ascend only), computes GELU as five passes with a slow Erf, runs LayerNorm and LayerNormGrad on one
// thread (LayerNormGrad ~32 ns per element: 12% of a VOLO-D1 training step) and moves data slowly
// (Transpose, Gather). Each kernel here is one or two passes, on every core. Built by
// mindcv_volo/models/cpu_kernels.py on first use.
//
// The same bits on every x86-64 CPU: the results must not depend on the instruction set the compiler
// targets (AVX-512, AVX2 or SSE2 builds) nor on the core count. So
//   * exp and erfc are computed here from + - * / and exact bit operations (glibc's vector erff differs
//     between its instruction-set variants: its AVX-512 form rounds erf(-3.54) to -1, which made GELU 0
//     in the tail), and the library is built with -ffp-contract=off (no FMA in one build, none in another);
//   * every sum runs in a fixed order: over 16 fixed lanes within a row (`fixed_order_sum`), over fixed
//     blocks of rows across threads (`channel_sums`), whatever the vector width or thread count.
//
// The AOT calling convention: params holds the inputs, then the outputs; shapes[i] has ndims[i] sizes
// (`AOT_KERNEL`, `KernelArgs`).
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#define AOT_KERNEL(name) \
  extern "C" int name(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *)

namespace {

constexpr float kLayerNormEps = 1e-5f;  // torch's default, VOLO's LayerNorm
constexpr float kSqrtHalf = 0.70710678118654752f;

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

// A kernel's arguments by position (inputs, then outputs), as float32 tensors.
struct KernelArgs {
  void **params;
  int *ndims;
  int64_t **shapes;

  const float *in(int i) const { return static_cast<const float *>(params[i]); }
  float *out(int i) const { return static_cast<float *>(params[i]); }
  int64_t size(int i) const { return element_count(ndims[i], shapes[i]); }
  int64_t width(int i) const { return shapes[i][ndims[i] - 1]; }  // the last axis
  int64_t rows(int i) const { return size(i) / width(i); }        // everything before it
};

// The geometry input of the window kernels: int32 (kernel, stride, padding)
// What Im2Col and Col2Im share: the window (kernel, stride, padding: the int32 geometry input) and the two
// layouts it maps between, the channels-last map (B, H, W, C) and its columns (B, OH, OW, K * K, C).
struct Window {
  int64_t kernel, stride, padding, batch, height, width, channels, out_h, out_w;
};

Window read_window(const void *geometry, const int64_t *map_shape, const int64_t *cols_shape) {
  const int32_t *g = static_cast<const int32_t *>(geometry);
  return {g[0], g[1], g[2], map_shape[0], map_shape[1], map_shape[2], map_shape[3], cols_shape[1], cols_shape[2]};
}

// op(i) for every element index i of n, vectorised, split over threads
template <typename Op>
void each_element(int64_t n, const Op &op) {
  parallel_for(n, 16384, [&](int64_t begin, int64_t end, int64_t) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) op(i);
  });
}

// The per-channel sums `sums[offset .. offset + width)` as the float32 output `out`
void store_sums(const std::vector<double> &sums, int64_t offset, int64_t width, float *out) {
  for (int64_t i = 0; i < width; ++i) out[i] = static_cast<float>(sums[offset + i]);
}

// Per-column (per-channel) sums over the rows of a (rows, C) map, in double: body(row, sums) adds one row's
// terms into sums[0 .. terms * C). The rows are cut into blocks of a fixed size, each block summed on its
// own and the blocks added in order: the same bits whatever the thread count.
template <typename Body>
std::vector<double> channel_sums(int64_t rows, int64_t width, int terms, const Body &body) {
  constexpr int64_t kBlockRows = 256;
  const int64_t blocks = (rows + kBlockRows - 1) / kBlockRows;
  const int64_t stride = terms * width;
  std::vector<double> partial(static_cast<size_t>(blocks * stride), 0.0);
  parallel_for(blocks, 1, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t block = begin; block < end; ++block)
      for (int64_t r = block * kBlockRows; r < std::min(rows, (block + 1) * kBlockRows); ++r)
        body(r, partial.data() + block * stride);
  });
  std::vector<double> total(static_cast<size_t>(stride), 0.0);
  for (int64_t block = 0; block < blocks; ++block)
    for (int64_t i = 0; i < stride; ++i) total[i] += partial[block * stride + i];
  return total;
}

// combine(...combine(init, term(0))..., term(n - 1)) in float, in an order fixed by the source: 16 lanes, then a
// pairwise fold. (An `omp simd reduction` would let the vector width choose the order, and so the rounding;
// a plain loop over a row is one long dependency chain, which no compiler vectorizes for max.)
template <typename Term, typename Combine>
float fixed_order_fold(int64_t n, float init, const Term &term, const Combine &combine) {
  constexpr int kLanes = 16;
  float lanes[kLanes];
  std::fill(lanes, lanes + kLanes, init);
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) lanes[j] = combine(lanes[j], term(i + j));
  for (int j = 0; i + j < n; ++j) lanes[j] = combine(lanes[j], term(i + j));
  for (int width = kLanes / 2; width > 0; width /= 2)
    for (int j = 0; j < width; ++j) lanes[j] = combine(lanes[j], lanes[j + width]);
  return lanes[0];
}

template <typename Term>
float fixed_order_sum(int64_t n, const Term &term) {
  return fixed_order_fold(n, 0.f, term, [](float a, float b) { return a + b; });
}

// the largest of x[0 .. n); a NaN anywhere may or may not come out, and makes the softmax row NaN either way
float row_max(const float *x, int64_t n) {
  return fixed_order_fold(n, -INFINITY, [x](int64_t i) { return x[i]; },
                          [](float a, float b) { return a < b ? b : a; });
}

// Mean and 1 / sqrt(var + eps) of one row, two passes (as torch: no E[x^2] - E[x]^2 cancellation).
void row_statistics(const float *x, int64_t width, float *mean_out, float *rstd_out) {
  const float mean = fixed_order_sum(width, [x](int64_t i) { return x[i]; }) / static_cast<float>(width);
  const float squares = fixed_order_sum(width, [x, mean](int64_t i) { return (x[i] - mean) * (x[i] - mean); });
  *mean_out = mean;
  *rstd_out = 1.f / std::sqrt(squares / static_cast<float>(width) + kLayerNormEps);
}

// --- float32 exp and GELU from + - * / and exact bit operations: the same bits in every build ---------
// (always inlined: a call inside a loop would keep it from being vectorized)

[[gnu::always_inline]] inline float bits_to_float(uint32_t bits) {
  float value;
  std::memcpy(&value, &bits, sizeof value);
  return value;
}

[[gnu::always_inline]] inline uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  return bits;
}

// exp(high + low) within ~2 ulp, for a `low` small against `high` or both small: 0 below -104, inf above
// 89, NaN stays NaN. Cody-Waite reduction high + low = n ln2 + r (n * kLn2High is exact for |n| < 2^15, and
// so is high - n * kLn2High where exp is large or tiny), Taylor series to r^7 on |r| <= ln2 / 2 (truncation
// < 6e-9), and 2^n applied as two exact powers of two so that a subnormal result rounds once.
[[gnu::always_inline]] inline float exp_sum(float high, float low) {
  constexpr float kLog2e = 1.44269504088896341f, kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;
  constexpr float kRoundToInt = 12582912.f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const float sum = high + low;
  high = sum < -104.f ? -104.f : high;
  low = sum < -104.f ? 0.f : low;
  high = sum > 89.f ? 89.f : high;
  low = sum > 89.f ? 0.f : low;
  const float n = ((high + low) * kLog2e + kRoundToInt) - kRoundToInt;
  const float r = ((high - n * kLn2High) - n * kLn2Low) + low;
  float p = 1.f / 5040.f;
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t k = static_cast<int32_t>(n);
  const int32_t half = k / 2;
  return p * bits_to_float(static_cast<uint32_t>(half + 127) << 23) *
         bits_to_float(static_cast<uint32_t>(k - half + 127) << 23);
}

[[gnu::always_inline]] inline float exp_f(float x) { return exp_sum(x, 0.f); }

// -x * x / 2 as high + low with `high` exact: x = head + tail with a 12-bit head, so head * head is exact and
// x^2 = head^2 + tail * (x + head). In a large exponent (the tails of the normal law) no bit is lost.
struct Split {
  float high, low;
};

[[gnu::always_inline]] inline Split minus_half_square(float x) {
  const float head = bits_to_float(float_to_bits(x) & 0xFFFFF000u);
  return {-0.5f * head * head, -0.5f * (x - head) * (x + head)};
}

// The normal law at x >= 0 (GELU's kernels pass |x|, capped at 20: beyond, every term below is 0 in float32,
// and the cap keeps inf - inf out of the split). Phi(-x) = erfc(x / sqrt 2) / 2 with Numerical Recipes'
// erfc, relative error < 1.2e-7 for every x: erfc(z) = t exp(-z^2 + P(t)), t = 1 / (1 + z / 2).
[[gnu::always_inline]] inline float erfc_polynomial(float t) {
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  return p * t - 1.26551223f;
}

[[gnu::always_inline]] inline float half_erfc_t(float magnitude) {
  return 0.5f / (1.f + 0.5f * kSqrtHalf * magnitude);
}

// Phi(-m) for m >= 0, one exp
[[gnu::always_inline]] inline float lower_tail(float magnitude) {
  const float t2 = half_erfc_t(magnitude);  // t / 2
  const Split square = minus_half_square(magnitude);
  return t2 * exp_sum(square.high, square.low + erfc_polynomial(2.f * t2));
}

[[gnu::always_inline]] inline float gelu_magnitude(float x) {
  const float magnitude = x < 0.f ? -x : x;
  return magnitude > 20.f ? 20.f : magnitude;
}

// Phi(x), GELU's factor, within ~4e-7 relative everywhere, tails included
[[gnu::always_inline]] inline float normal_cdf(float x) {
  const float tail = lower_tail(gelu_magnitude(x));
  return x < 0.f ? tail : 1.f - tail;
}

// Phi(x) + x phi(x), GELU's derivative
[[gnu::always_inline]] inline float gelu_derivative(float x) {
  constexpr float kInvSqrt2Pi = 0.39894228040143268f;
  const float magnitude = gelu_magnitude(x);
  const Split square = minus_half_square(magnitude);
  const float density = kInvSqrt2Pi * exp_sum(square.high, square.low);
  const float t2 = half_erfc_t(magnitude);
  const float tail = t2 * exp_sum(square.high, square.low + erfc_polynomial(2.f * t2));
  return (x < 0.f ? tail : 1.f - tail) + x * density;
}

}  // namespace

// inputs x (..., C), gamma (C), beta (C); output y (..., C)
AOT_KERNEL(LayerNormForward) {
  const KernelArgs args{params, ndims, shapes};
  const float *x = args.in(0), *gamma = args.in(1), *beta = args.in(2);
  float *y = args.out(3);
  const int64_t width = args.width(0), rows = args.rows(0);
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
AOT_KERNEL(LayerNormBackward) {
  const KernelArgs args{params, ndims, shapes};
  const float *x = args.in(0), *gamma = args.in(1), *dy = args.in(2);
  float *dx = args.out(3), *dgamma = args.out(4), *dbeta = args.out(5);
  const int64_t width = args.width(0), rows = args.rows(0);
  // per row: dx, and its terms of dgamma (sums[0 .. C)) and dbeta (sums[C .. 2C))
  const std::vector<double> sums = channel_sums(rows, width, 2, [&](int64_t r, double *s) {
    const float *xr = x + r * width;
    const float *dyr = dy + r * width;
    float *dxr = dx + r * width;
    float mean, rstd;
    row_statistics(xr, width, &mean, &rstd);
    const float sum_g = fixed_order_sum(width, [&](int64_t i) { return dyr[i] * gamma[i]; });
    const float sum_g_xhat =
        fixed_order_sum(width, [&](int64_t i) { return dyr[i] * gamma[i] * ((xr[i] - mean) * rstd); });
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      const float xhat = (xr[i] - mean) * rstd;
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
  store_sums(sums, 0, width, dgamma);
  store_sums(sums, width, width, dbeta);
  return 0;
}

// input x; output x * Phi(x) = x * 0.5 * (1 + erf(x / sqrt 2)), torch's exact GELU
AOT_KERNEL(GeluForward) {
  const KernelArgs args{params, ndims, shapes};
  const float *x = args.in(0);
  float *y = args.out(1);
  each_element(args.size(0), [=](int64_t i) { y[i] = x[i] * normal_cdf(x[i]); });
  return 0;
}

// inputs x, dy; output dx = dy * (Phi(x) + x * phi(x))
AOT_KERNEL(GeluBackward) {
  const KernelArgs args{params, ndims, shapes};
  const float *x = args.in(0), *dy = args.in(1);
  float *dx = args.out(2);
  each_element(args.size(0), [=](int64_t i) { dx[i] = dy[i] * gelu_derivative(x[i]); });
  return 0;
}

// The MLP's first layer and its activation: GELU(h + bias) of the matmul's output h, so that the bias add is
// not a pass of its own, nor its gradient (the column sum of dx comes out of the same pass).
// inputs h (..., C), bias (C); output GELU(h + bias)
AOT_KERNEL(BiasGeluForward) {
  const KernelArgs args{params, ndims, shapes};
  const float *h = args.in(0), *bias = args.in(1);
  float *y = args.out(2);
  const int64_t width = args.width(0);
  parallel_for(args.rows(0), std::max<int64_t>(1, 16384 / width), [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t r = begin; r < end; ++r) {
      const float *hr = h + r * width;
      float *yr = y + r * width;
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) {
        const float x = hr[i] + bias[i];
        yr[i] = x * normal_cdf(x);
      }
    }
  });
  return 0;
}

// inputs h, bias, dy; outputs dh = dy * GELU'(h + bias), dbias = dh summed over every axis but the last
AOT_KERNEL(BiasGeluBackward) {
  const KernelArgs args{params, ndims, shapes};
  const float *h = args.in(0), *bias = args.in(1), *dy = args.in(2);
  float *dh = args.out(3);
  const int64_t width = args.width(0);
  const std::vector<double> sums = channel_sums(args.rows(0), width, 1, [&](int64_t r, double *s) {
    const float *hr = h + r * width;
    const float *dyr = dy + r * width;
    float *dhr = dh + r * width;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      dhr[i] = dyr[i] * gelu_derivative(hr[i] + bias[i]);
      s[i] += dhr[i];
    }
  });
  store_sums(sums, 0, width, args.out(4));
  return 0;
}

// input x (..., N); output softmax over the last axis
AOT_KERNEL(SoftmaxForward) {
  const KernelArgs args{params, ndims, shapes};
  const float *x = args.in(0);
  float *y = args.out(1);
  const int64_t width = args.width(0), rows = args.rows(0);
  parallel_for(rows, std::max<int64_t>(1, 16384 / width), [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t r = begin; r < end; ++r) {
      const float *xr = x + r * width;
      float *yr = y + r * width;
      const float top = row_max(xr, width);
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) yr[i] = exp_f(xr[i] - top);
      const float inv = 1.f / fixed_order_sum(width, [yr](int64_t i) { return yr[i]; });
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) yr[i] *= inv;
    }
  });
  return 0;
}

// inputs y (the forward's output), dy; output dx = y * (dy - sum(dy * y)) per row
AOT_KERNEL(SoftmaxBackward) {
  const KernelArgs args{params, ndims, shapes};
  const float *y = args.in(0), *dy = args.in(1);
  float *dx = args.out(2);
  const int64_t width = args.width(0), rows = args.rows(0);
  parallel_for(rows, std::max<int64_t>(1, 16384 / width), [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t r = begin; r < end; ++r) {
      const float *yr = y + r * width;
      const float *dyr = dy + r * width;
      float *dxr = dx + r * width;
      const float dot = fixed_order_sum(width, [&](int64_t i) { return dyr[i] * yr[i]; });
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
AOT_KERNEL(BatchNormReluForward) {
  const KernelArgs args{params, ndims, shapes};
  const float *x = args.in(0), *gamma = args.in(1), *beta = args.in(2);
  float *y = args.out(3), *mean_out = args.out(4), *var_out = args.out(5);
  const int64_t width = args.width(0), rows = args.rows(0);
  const BatchNormTerms bn(x, gamma, beta, rows, width);
  for (int64_t i = 0; i < width; ++i) {
    mean_out[i] = bn.mean_f[i];
    var_out[i] = static_cast<float>(bn.var[i]);
  }
  affine_relu(x, bn.scale.data(), bn.shift.data(), rows, width, y);
  return 0;
}

// inputs x, gamma, beta, dy; outputs dx, dgamma, dbeta. The statistics are recomputed from x.
AOT_KERNEL(BatchNormReluBackward) {
  const KernelArgs args{params, ndims, shapes};
  const float *x = args.in(0), *gamma = args.in(1), *beta = args.in(2), *dy = args.in(3);
  float *dx = args.out(4), *dgamma = args.out(5), *dbeta = args.out(6);
  const int64_t width = args.width(0), rows = args.rows(0);
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
AOT_KERNEL(AffineReluForward) {
  const KernelArgs args{params, ndims, shapes};
  const int64_t width = args.width(0);
  affine_relu(args.in(0), args.in(1), args.in(2), args.rows(0), width, args.out(3));
  return 0;
}

// inputs x, scale, shift, dy; outputs dx, dscale, dshift
AOT_KERNEL(AffineReluBackward) {
  const KernelArgs args{params, ndims, shapes};
  const float *x = args.in(0), *scale = args.in(1), *shift = args.in(2), *dy = args.in(3);
  float *dx = args.out(4);
  const int64_t width = args.width(0), rows = args.rows(0);
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
  store_sums(sums, 0, width, args.out(5));
  store_sums(sums, width, width, args.out(6));
  return 0;
}

// Sliding windows on channels-last maps: what ops.unfold / ops.fold compute (torch's nn.Unfold / F.fold),
// with the window tap as its own axis and the channels last. geometry = (kernel, stride, padding), int32.

// inputs x (B, H, W, C), geometry; output cols (B, OH, OW, K * K, C), zero where a tap is in the padding
AOT_KERNEL(Im2ColForward) {
  const KernelArgs args{params, ndims, shapes};
  const float *x = args.in(0);
  float *cols = args.out(2);
  const auto [k, stride, padding, batch, height, width, channels, out_h, out_w] =
      read_window(params[1], shapes[0], shapes[2]);
  parallel_for(batch * out_h, 1, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t b = row / out_h, oy = row % out_h;
      float *dst = cols + row * out_w * k * k * channels;
      for (int64_t ox = 0; ox < out_w; ++ox) {
        // the k taps of one window row are k neighbouring pixels, contiguous in both layouts: one copy of the
        // taps inside the map (k * C values; for the 7x7 stem convolution's 3 channels, 7 copies of 12 bytes
        // became one), zeros for those in the padding
        const int64_t x0 = ox * stride - padding;
        const int64_t first = std::clamp<int64_t>(-x0, 0, k), last = std::clamp<int64_t>(width - x0, first, k);
        for (int64_t ky = 0; ky < k; ++ky, dst += k * channels) {
          const int64_t y = oy * stride - padding + ky;
          if (y < 0 || y >= height) {
            std::fill(dst, dst + k * channels, 0.f);
            continue;
          }
          std::fill(dst, dst + first * channels, 0.f);
          std::copy_n(x + ((b * height + y) * width + x0 + first) * channels, (last - first) * channels,
                      dst + first * channels);
          std::fill(dst + last * channels, dst + k * channels, 0.f);
        }
      }
    }
  });
  return 0;
}

// inputs cols (B, OH, OW, K * K, C), geometry; output x (B, OH * stride, OW * stride, C): each pixel the
// sum of the window taps that cover it (the adjoint of Im2ColForward). Written per output pixel, so the
// threads never write to the same place.
AOT_KERNEL(Col2ImForward) {
  const KernelArgs args{params, ndims, shapes};
  const float *cols = args.in(0);
  float *x = args.out(2);
  const auto [k, stride, padding, batch, height, width, channels, out_h, out_w] =
      read_window(params[1], shapes[2], shapes[0]);
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

// Transposes. MindSpore's CPU Transpose, when its permutation is a constant (always, in a graph), builds in
// Resize a table of one 8-byte source index per output element and keeps it with the kernel for the graph's
// lifetime: twice the size of the float32 output, for every Transpose node of the graph (the attention's
// q/k/v/output and outlook attention's transposes come to ~57 MB per image in VOLO-D1 inference, more than the
// activations themselves). Every transpose of the CPU path, reshaped, has one form: two adjacent axis groups
// swapped, (A, P, Q, D) -> (A, Q, P, D); the same kernel swapped back is its gradient. Only copies: the same
// bits as Transpose.

// input x (A, P, Q, D); output y (A, Q, P, D), y[a, j, i, :] = x[a, i, j, :]
AOT_KERNEL(SwapAxesForward) {
  const KernelArgs args{params, ndims, shapes};
  const float *x = args.in(0);
  float *y = args.out(1);
  const int64_t outer = shapes[0][0], p = shapes[0][1], q = shapes[0][2], inner = shapes[0][3];
  if (inner >= 8) {
    // runs of `inner` contiguous values: one output row (a, j) gathers its P runs
    parallel_for(outer * q, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p * inner)),
                 [&](int64_t begin, int64_t end, int64_t) {
                   for (int64_t row = begin; row < end; ++row) {
                     const int64_t a = row / q, j = row % q;
                     const float *src = x + (a * p * q + j) * inner;
                     float *dst = y + row * p * inner;
                     for (int64_t i = 0; i < p; ++i) std::copy_n(src + i * q * inner, inner, dst + i * inner);
                   }
                 });
    return 0;
  }
  // short runs: a 2-D transpose of each (P, Q) plane, in tiles that stay in the cache
  constexpr int64_t kTile = 32;
  const int64_t tiles_p = (p + kTile - 1) / kTile, tiles_q = (q + kTile - 1) / kTile;
  parallel_for(outer * tiles_q * tiles_p, std::max<int64_t>(1, 16384 / (kTile * kTile * inner)),
               [&](int64_t begin, int64_t end, int64_t) {
                 for (int64_t t = begin; t < end; ++t) {
                   const int64_t a = t / (tiles_q * tiles_p), tq = t / tiles_p % tiles_q, tp = t % tiles_p;
                   const float *xa = x + a * p * q * inner;
                   float *ya = y + a * p * q * inner;
                   const int64_t j_end = std::min(q, (tq + 1) * kTile), i_end = std::min(p, (tp + 1) * kTile);
                   for (int64_t j = tq * kTile; j < j_end; ++j)
                     for (int64_t i = tp * kTile; i < i_end; ++i)
                       for (int64_t c = 0; c < inner; ++c) ya[(j * p + i) * inner + c] = xa[(i * q + j) * inner + c];
                 }
               });
  return 0;
}

// Self-attention's operands from the fused qkv projection in one pass, instead of a Split, a Mul by the scale
// and three transposes (five passes): q * scale and v head-major, k head-major and transposed for q @ k^T.
// inputs qkv (B, N, 3, H, D), scale (1); outputs q (B, H, N, D), k_t (B, H, D, N), v (B, H, N, D)
AOT_KERNEL(QkvHeadsForward) {
  const KernelArgs args{params, ndims, shapes};
  const float *qkv = args.in(0);
  const float scale = args.in(1)[0];
  float *q = args.out(2), *k_t = args.out(3), *v = args.out(4);
  const int64_t batch = shapes[0][0], tokens = shapes[0][1], heads = shapes[0][3], depth = shapes[0][4];
  const int64_t dim = heads * depth;
  // one (image, head) plane per task: each writes its own slices
  parallel_for(batch * heads, 1, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / heads, h = plane % heads;
      float *qp = q + plane * tokens * depth, *kp = k_t + plane * depth * tokens, *vp = v + plane * tokens * depth;
      for (int64_t n = 0; n < tokens; ++n) {
        const float *row = qkv + (b * tokens + n) * 3 * dim + h * depth;
#pragma omp simd
        for (int64_t c = 0; c < depth; ++c) qp[n * depth + c] = row[c] * scale;
        for (int64_t c = 0; c < depth; ++c) kp[c * tokens + n] = row[dim + c];
        std::copy_n(row + 2 * dim, depth, vp + n * depth);
      }
    }
  });
  return 0;
}

// The adjoint: inputs dq, dk_t, dv (as QkvHeadsForward's outputs), scale; output dqkv (B, N, 3, H, D)
AOT_KERNEL(QkvHeadsBackward) {
  const KernelArgs args{params, ndims, shapes};
  const float *dq = args.in(0), *dk_t = args.in(1), *dv = args.in(2);
  const float scale = args.in(3)[0];
  float *dqkv = args.out(4);
  const int64_t batch = shapes[4][0], tokens = shapes[4][1], heads = shapes[4][3], depth = shapes[4][4];
  const int64_t dim = heads * depth;
  parallel_for(batch * heads, 1, [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / heads, h = plane % heads;
      const float *qp = dq + plane * tokens * depth, *kp = dk_t + plane * depth * tokens;
      const float *vp = dv + plane * tokens * depth;
      for (int64_t n = 0; n < tokens; ++n) {
        float *row = dqkv + (b * tokens + n) * 3 * dim + h * depth;
#pragma omp simd
        for (int64_t c = 0; c < depth; ++c) row[c] = qp[n * depth + c] * scale;
        for (int64_t c = 0; c < depth; ++c) row[dim + c] = kp[c * tokens + n];
        std::copy_n(vp + n * depth, depth, row + 2 * dim);
      }
    }
  });
  return 0;
}

// A block's residual branch ends in a Dense: residual + (h + bias) in one pass, where BiasAdd and Add take two.
// Its gradient needs no kernel of its own (dy for h and the residual, BiasAddBackward for the bias).
// inputs h (..., C), bias (C), residual (..., C); output residual + (h + bias), the unfused order
AOT_KERNEL(ResidualBiasAddForward) {
  const KernelArgs args{params, ndims, shapes};
  const float *h = args.in(0), *bias = args.in(1), *residual = args.in(2);
  float *y = args.out(3);
  const int64_t width = args.width(0);
  parallel_for(args.rows(0), std::max<int64_t>(1, 16384 / width), [&](int64_t begin, int64_t end, int64_t) {
    for (int64_t r = begin; r < end; ++r) {
#pragma omp simd
      for (int64_t i = 0; i < width; ++i) y[r * width + i] = residual[r * width + i] + (h[r * width + i] + bias[i]);
    }
  });
  return 0;
}

// MindSpore's CPU BiasAddGrad is slower than a pass over memory.
// input dy (..., C); output the bias gradient: dy summed over every axis but the last
AOT_KERNEL(BiasAddBackward) {
  const KernelArgs args{params, ndims, shapes};
  const float *dy = args.in(0);
  float *dbias = args.out(1);
  const int64_t width = args.width(0);
  const std::vector<double> sums = channel_sums(args.rows(0), width, 1,
                                                [&](int64_t r, double *s) {
#pragma omp simd
                                                  for (int64_t i = 0; i < width; ++i) s[i] += dy[r * width + i];
                                                });
  store_sums(sums, 0, width, dbias);
  return 0;
}

// Outlook attention (VOLO): each window's K * K taps are mixed, per head, by a (K * K, K * K) softmax map
// predicted from the pooled token, and the mixed taps are added back onto the map. One kernel each way instead
// of im2col, two transposes, a batched matmul of 9 x 9 maps, the scale, the softmax and col2im (~7 passes over
// maps 2.25x the input, forward and backward). The threads split the (batch, head) pairs: a head owns its
// channels, so no two threads write one place, and each visits its windows in raster order, so every sum that
// gathers several windows has one order.
namespace {

// One window and head as each_window hands it over, in one thread's buffers
struct OutlookWindow {
  std::vector<float> a;           // the softmax map, (taps, taps)
  std::vector<int64_t> inside;    // the taps inside the map, in order (padding taps neither give nor take)
  std::vector<int64_t> offset;    // each inside tap's pixel in the map, batch and head included
  int64_t logits;                 // where the window's map starts in the logits
  std::vector<float> scratch;     // (taps, taps): the softmax's row maxima, then the backward's dA
  std::vector<float> mixed;       // (taps, head_dim): mix_taps' sums
  std::vector<float> transposed;  // (head_dim, taps): the backward's window of v
};

// The operands of OutlookForward / OutlookBackward: v (B, H, W, C) and its windows (the geometry input: int32
// kernel, stride, padding, heads), the logits (B, OH, OW, heads * K^4) and the scale (float32, one value).
// Logit [head * K^4 + i * K^2 + j] weighs key tap j for query tap i, taps in (ky, kx) order.
struct Outlook {
  Window window;
  int64_t heads, head_dim, taps;
  float scale;

  Outlook(const KernelArgs &args, int geometry, int scale_index)
      : window(read_window(args.params[geometry], args.shapes[0], args.shapes[1])),
        heads(static_cast<const int32_t *>(args.params[geometry])[3]),
        head_dim(window.channels / heads),
        taps(window.kernel * window.kernel),
        scale(args.in(scale_index)[0]) {}

  // term(0) + ... + term(taps - 1) in order: fixed_order_sum's 16 lanes and their fold cost more than a row of 9
  // (a quarter of the forward's time)
  template <typename Term>
  float row_sum(const Term &term) const {
    float sum = 0.f;
    for (int64_t j = 0; j < taps; ++j) sum += term(j);
    return sum;
  }

  // softmax(scale * logits) of one window and head, row by row, the exps of the whole map in one vector loop.
  // tops: scratch, taps^2. The short rows are summed in order, one add after another (`row_sum`).
  void softmax(const float *logits, float *a, float *tops) const {
    const int64_t n = taps * taps;
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) a[k] = logits[k] * scale;
    for (int64_t i = 0; i < taps; ++i) {
      float top = a[i * taps];
      for (int64_t j = 1; j < taps; ++j) top = std::max(top, a[i * taps + j]);
      std::fill_n(tops + i * taps, taps, top);
    }
#pragma omp simd
    for (int64_t k = 0; k < n; ++k) a[k] = exp_f(a[k] - tops[k]);
    for (int64_t i = 0; i < taps; ++i) {
      float *ar = a + i * taps;
      const float inv = 1.f / row_sum([ar](int64_t j) { return ar[j]; });
      for (int64_t j = 0; j < taps; ++j) ar[j] *= inv;
    }
  }

  // body(w) for every window and head (a, inside, offset and logits filled); the (batch, head) pairs are split
  // over threads, each pair's windows in raster order. First the map output `zeroed` is set to 0 on the pair's
  // channels.
  template <typename Body>
  void each_window(const float *logits, float *zeroed, const Body &body) const {
    const int64_t pixels = window.height * window.width, channels = window.channels;
    parallel_for(window.batch * heads, 1, [&](int64_t begin, int64_t end, int64_t) {
      OutlookWindow w{std::vector<float>(taps * taps), {}, std::vector<int64_t>(taps), 0,
                      std::vector<float>(taps * taps), std::vector<float>(taps * head_dim),
                      std::vector<float>(head_dim * taps)};
      for (int64_t pair = begin; pair < end; ++pair) {
        const int64_t b = pair / heads, head = pair % heads;
        const int64_t base = b * pixels * channels + head * head_dim;
        for (int64_t p = 0; p < pixels; ++p) std::fill_n(zeroed + base + p * channels, head_dim, 0.f);
        for (int64_t oy = 0; oy < window.out_h; ++oy)
          for (int64_t ox = 0; ox < window.out_w; ++ox) {
            w.logits = (((b * window.out_h + oy) * window.out_w + ox) * heads + head) * taps * taps;
            softmax(logits + w.logits, w.a.data(), w.scratch.data());
            w.inside.clear();
            for (int64_t t = 0; t < taps; ++t) {
              const int64_t y = oy * window.stride - window.padding + t / window.kernel;
              const int64_t x = ox * window.stride - window.padding + t % window.kernel;
              if (y < 0 || y >= window.height || x < 0 || x >= window.width) continue;
              w.inside.push_back(t);
              w.offset[t] = base + (y * window.width + x) * channels;
            }
            body(w);
          }
      }
    });
  }

  // For each inside tap t: map[t's pixel] += sum over the inside taps s, in order, of weight(t, s) * rows[s's
  // pixel], on the head's channels (the sums first, then onto the map: a matmul, then the overlap-add). A row of
  // `rows` is read once and added to every sum: each sum's next add comes taps adds later, not waiting on the
  // last one's store.
  template <typename Weight>
  void mix_taps(OutlookWindow &w, const float *rows, const Weight &weight, float *map) const {
    for (const int64_t t : w.inside) std::fill_n(w.mixed.data() + t * head_dim, head_dim, 0.f);
    for (const int64_t s : w.inside) {
      const float *row = rows + w.offset[s];
      for (const int64_t t : w.inside) {
        const float weight_ts = weight(t, s);
        float *sum = w.mixed.data() + t * head_dim;
#pragma omp simd
        for (int64_t c = 0; c < head_dim; ++c) sum[c] += weight_ts * row[c];
      }
    }
    for (const int64_t t : w.inside) {
      const float *sum = w.mixed.data() + t * head_dim;
      float *to = map + w.offset[t];
#pragma omp simd
      for (int64_t c = 0; c < head_dim; ++c) to[c] += sum[c];
    }
  }
};

}  // namespace

// inputs v (B, H, W, C), logits (B, OH, OW, heads * K^4), geometry, scale; output out (B, H, W, C): for every
// window and head, query tap i's pixel gets sum_j A[i][j] v[key tap j's pixel], A = softmax(scale * logits)
AOT_KERNEL(OutlookForward) {
  const KernelArgs args{params, ndims, shapes};
  const float *v = args.in(0);
  float *out = args.out(4);
  const Outlook outlook(args, 2, 3);
  const int64_t taps = outlook.taps;
  outlook.each_window(args.in(1), out, [&](OutlookWindow &w) {
    const float *a = w.a.data();
    outlook.mix_taps(w, v, [a, taps](int64_t i, int64_t j) { return a[i * taps + j]; }, out);
  });
  return 0;
}

// inputs v, logits, dout (B, H, W, C), geometry, scale; outputs dv (B, H, W, C), dlogits. The softmax is
// recomputed from the logits. Per window and head, with dy_i = dout at query tap i's pixel:
// dv[key tap j's pixel] += sum_i A[i][j] dy_i; dA[i][j] = dy_i . v_j; dlogits = A (dA - sum_j dA A) * scale.
AOT_KERNEL(OutlookBackward) {
  const KernelArgs args{params, ndims, shapes};
  const float *v = args.in(0), *dout = args.in(2);
  float *dv = args.out(5), *dlogits = args.out(6);
  const Outlook outlook(args, 3, 4);
  const int64_t taps = outlook.taps, head_dim = outlook.head_dim;
  outlook.each_window(args.in(1), dv, [&](OutlookWindow &w) {
    const float *a = w.a.data();
    outlook.mix_taps(w, dout, [a, taps](int64_t j, int64_t i) { return a[i * taps + j]; }, dv);
    // dA[i][j] = dy_i . v_j, each a sum over the channels in order, for every j at once: v's window transposed
    // to (head_dim, taps) first, zero on the padding taps (one fixed_order_sum per dot took 40% of the time)
    float *grad = w.scratch.data(), *vt = w.transposed.data();
    std::fill_n(vt, head_dim * taps, 0.f);
    for (const int64_t j : w.inside)
      for (int64_t c = 0; c < head_dim; ++c) vt[c * taps + j] = v[w.offset[j] + c];
    std::fill_n(grad, taps * taps, 0.f);
    for (int64_t c = 0; c < head_dim; ++c)
      for (const int64_t i : w.inside) {
        const float dy = dout[w.offset[i] + c], *vc = vt + c * taps;
        float *gr = grad + i * taps;
#pragma omp simd
        for (int64_t j = 0; j < taps; ++j) gr[j] += dy * vc[j];
      }
    float *dl = dlogits + w.logits;
    for (int64_t i = 0; i < taps; ++i) {
      const float *ar = a + i * taps, *gr = grad + i * taps;
      const float dot = outlook.row_sum([ar, gr](int64_t j) { return gr[j] * ar[j]; });
      for (int64_t j = 0; j < taps; ++j) dl[i * taps + j] = ar[j] * (gr[j] - dot) * outlook.scale;
    }
  });
  return 0;
}

// VOLO's 2 x 2 average pooling on channels-last maps (MindSpore's ReduceMean over a reshape: ~5 ms on
// (8, 28, 28, 192), this kernel 0.3 ms).
namespace {

// body(block, pixel) for every 2 x 2 block of a (B, H, W, C) map pooled to `pooled` (B, H / 2, W / 2, C): block,
// the block's offset in the pooled map; pixel, its top-left pixel's in the map. Split over threads by rows.
template <typename Body>
void each_2x2_block(const int64_t *pooled, const Body &body) {
  const int64_t out_h = pooled[1], out_w = pooled[2], channels = pooled[3];
  parallel_for(pooled[0] * out_h, std::max<int64_t>(1, 16384 / (out_w * channels)),
               [&](int64_t begin, int64_t end, int64_t) {
                 for (int64_t row = begin; row < end; ++row)
                   for (int64_t ox = 0; ox < out_w; ++ox)
                     body((row * out_w + ox) * channels, (2 * row * out_w + ox) * 2 * channels);
               });
}

}  // namespace

// input x (B, H, W, C), H and W even; output y (B, H / 2, W / 2, C), each 2 x 2 block's mean
AOT_KERNEL(AvgPool2x2Forward) {
  const KernelArgs args{params, ndims, shapes};
  const float *x = args.in(0);
  float *y = args.out(1);
  const int64_t channels = args.width(1), line = 2 * shapes[1][2] * channels;  // a row of x
  each_2x2_block(shapes[1], [&](int64_t block, int64_t pixel) {
    const float *top = x + pixel, *bottom = top + line;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c)
      y[block + c] = ((top[c] + top[channels + c]) + (bottom[c] + bottom[channels + c])) * 0.25f;
  });
  return 0;
}

// input dy (B, OH, OW, C); output dx (B, 2 OH, 2 OW, C), dy / 4 on each pixel of its block
AOT_KERNEL(AvgPool2x2Backward) {
  const KernelArgs args{params, ndims, shapes};
  const float *dy = args.in(0);
  float *dx = args.out(1);
  const int64_t channels = args.width(0), line = 2 * shapes[0][2] * channels;
  each_2x2_block(shapes[0], [&](int64_t block, int64_t pixel) {
    float *top = dx + pixel, *bottom = top + line;
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c)
      top[c] = top[channels + c] = bottom[c] = bottom[channels + c] = dy[block + c] * 0.25f;
  });
  return 0;
}
