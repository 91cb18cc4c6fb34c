// Rows of floats for the C++ ops: loading a row of the model's dtype, and a row's product with a
// small square matrix (rotations: the store's, the attention's queries and outputs).
#pragma once

#include "records.h"

namespace tq {

// n values of a float32/bf16/fp16 row as floats.
inline void load_floats(const void* src, at::ScalarType type, int n, float* dst) {
  switch (type) {
    case at::kFloat: std::memcpy(dst, src, sizeof(float) * n); break;
    case at::kBFloat16: {
      const auto* s = static_cast<const c10::BFloat16*>(src);
      for (int j = 0; j < n; ++j) dst[j] = static_cast<float>(s[j]);
      break;
    }
    default: {
      const auto* s = static_cast<const c10::Half*>(src);
      for (int j = 0; j < n; ++j) dst[j] = static_cast<float>(s[j]);
    }
  }
}

// y = scale * M^T x for M [d, d] row-major: a sum of M's rows, so the inner loop runs over
// contiguous floats and vectorizes (a dot per output would be a float reduction, which -O3
// leaves scalar). R q is combine_rows(R^T, q); R^T y is combine_rows(R, y). Outputs go in
// passes of COLS held in registers over all of M's rows: summed in memory, every row's update
// loaded and stored y again, and the stores were most of a short decode's time. Each output
// is summed in row order either way (x[j] * M[j, i] added for j = 0, 1, ...), so the result
// does not depend on the pass width.
inline void combine_rows(const float* __restrict__ M, const float* __restrict__ x, int d,
                         float scale, float* __restrict__ y) {
  typedef float lanes __attribute__((vector_size(64)));  // one AVX-512 register, two AVX2 ones
  constexpr int W = 16, K = 4;                            // a pass: 64 outputs in 4 x 16 lanes
  int i0 = 0;
  for (; i0 + W * K <= d; i0 += W * K) {
    lanes acc[K] = {};
    for (int j = 0; j < d; ++j) {
      const float a = scale * x[j];
      const float* __restrict__ row = M + static_cast<size_t>(j) * d + i0;
      for (int k = 0; k < K; ++k) {
        lanes r;
        std::memcpy(&r, row + W * k, sizeof r);
        acc[k] += a * r;
      }
    }
    std::memcpy(y + i0, acc, sizeof acc);
  }
  for (int i = i0; i < d; ++i) y[i] = 0.f;  // the last d % 64 outputs, summed in y
  for (int j = 0; j < d && i0 < d; ++j) {
    const float a = scale * x[j];
    const float* __restrict__ row = M + static_cast<size_t>(j) * d;
    for (int i = i0; i < d; ++i) y[i] += a * row[i];
  }
}

}  // namespace tq
