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

// The widest float vector of the build: GCC splits a wider vector type into these itself, and
// on AVX2 it did so through the stack (a 64-byte type cost the store 20x its time).
#if defined(TQ_AVX512)
constexpr int VECTOR_FLOATS = 16;
#elif defined(TQ_AVX2)
constexpr int VECTOR_FLOATS = 8;
#else
constexpr int VECTOR_FLOATS = 4;  // SSE2 (every x86-64), NEON
#endif
typedef float FloatVector __attribute__((vector_size(4 * VECTOR_FLOATS)));

// Outputs i0 .. i0 + 16K - 1 of combine_rows, held in registers over all of M's rows.
template <int K>
inline void combine_pass(const float* __restrict__ M, const float* __restrict__ x, int d,
                         float scale, int i0, float* __restrict__ y) {
  constexpr int V = 16 * K / VECTOR_FLOATS;
  FloatVector acc[V] = {};
  for (int j = 0; j < d; ++j) {
    const float a = scale * x[j];
    const float* __restrict__ row = M + static_cast<size_t>(j) * d + i0;
    for (int v = 0; v < V; ++v) {
      FloatVector r;
      std::memcpy(&r, row + VECTOR_FLOATS * v, sizeof r);
      acc[v] += a * r;
    }
  }
  std::memcpy(y + i0, acc, sizeof acc);
}

// y = scale * M^T x for M [d, d] row-major: a sum of M's rows, so the inner loop runs over
// contiguous floats and vectorizes (a dot per output would be a float reduction, which -O3
// leaves scalar). R q is combine_rows(R^T, q); R^T y is combine_rows(R, y). Outputs go in
// passes of up to 64 held in registers over all of M's rows: summed in memory, every row's
// update loaded and stored y again, and the stores were most of a short decode's time. Each
// output is summed in row order either way (x[j] * M[j, i] added for j = 0, 1, ...), so the
// result does not depend on the pass width.
inline void combine_rows(const float* __restrict__ M, const float* __restrict__ x, int d,
                         float scale, float* __restrict__ y) {
  int i0 = 0;
  for (; i0 + 64 <= d; i0 += 64) combine_pass<4>(M, x, d, scale, i0, y);
  switch ((d - i0) / 16) {  // a split key's parts: 48 and 16 of 64 channels
    case 3: combine_pass<3>(M, x, d, scale, i0, y), i0 += 48; break;
    case 2: combine_pass<2>(M, x, d, scale, i0, y), i0 += 32; break;
    case 1: combine_pass<1>(M, x, d, scale, i0, y), i0 += 16; break;
  }
  for (int i = i0; i < d; ++i) y[i] = 0.f;  // the last d % 16 outputs, summed in y
  for (int j = 0; j < d && i0 < d; ++j) {
    const float a = scale * x[j];
    const float* __restrict__ row = M + static_cast<size_t>(j) * d;
    for (int i = i0; i < d; ++i) y[i] += a * row[i];
  }
}

// The +-1 entries of the n x n Sylvester Hadamard matrix, row-major, for n = 2^k <= 256: built
// once per process (350 KB for all k), so checking a rotation costs a vectorized comparison.
inline const float* hadamard_matrix(int n) {
  static const std::array<std::vector<float>, 9> built = [] {
    std::array<std::vector<float>, 9> h;
    for (int k = 0; k < 9; ++k) {
      const int m = 1 << k;
      h[k].resize(static_cast<size_t>(m) * m);
      for (int j = 0; j < m; ++j)
        for (int i = 0; i < m; ++i)
          h[k][static_cast<size_t>(j) * m + i] = __builtin_parity(i & j) ? -1.f : 1.f;
    }
    return h;
  }();
  return built[__builtin_ctz(n)].data();
}

// The signs s of a randomized Hadamard rotation given as M = R^T = D H c (rotation.py: R = H D
// / sqrt(d), D = diag(s), c = |M[0][0]|), every entry checked; empty where M is any other
// matrix or d is not a power of two in 16..256. Each store call checks its rotations (a decode
// step's store too: about a microsecond for d = 64).
inline std::vector<float> hadamard_signs(const float* M, int d) {
  if (d < 16 || d > 256 || (d & (d - 1))) return {};
  const float c = std::fabs(M[0]);
  const float* H = hadamard_matrix(d);
  std::vector<float> s(d);
  bool same = true;
  for (int j = 0; j < d; ++j) {
    const float* m = M + static_cast<size_t>(j) * d;
    const float* h = H + static_cast<size_t>(j) * d;
    const float sc = (m[0] > 0 ? 1.f : -1.f) * c;
    s[j] = m[0] > 0 ? 1.f : -1.f;
    for (int i = 0; i < d; ++i) same &= m[i] == sc * h[i];
  }
  return same ? s : std::vector<float>{};
}

// y = combine_rows(M, x) for M = D H c (hadamard_signs): c H (s x) by the fast Walsh-Hadamard
// transform, d log d additions instead of d^2 multiply-adds. It sums the terms s_j x_j (exact)
// in a butterfly order and scales once by c, where the dense product sums the rounded products
// x_j (+-c) in row order (the same terms where c is a power of two: d = 16, 64, 256), so y can
// differ from it by rounding (the store's bucket and norm bounds hold it). Every build adds in
// the same order: the vector stages below do per lane what the scalar loop does.
inline void hadamard_rows(const float* s, float c, const float* __restrict__ x, int d,
                          float* __restrict__ y) {
  for (int j = 0; j < d; ++j) y[j] = s[j] * x[j];
  int h = 1;
#if defined(TQ_AVX512)
  // Butterflies within a register, distance k: lane i takes y[i] + y[i ^ k], or y[i ^ k] - y[i]
  // where bit k of i is set.
  for (int v = 0; v < d; v += 16) {
    __m512 a = _mm512_loadu_ps(y + v);
    for (int k = 1; k < 16; k *= 2) {
      const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
      const __m512 t = _mm512_permutexvar_ps(_mm512_xor_si512(lane, _mm512_set1_epi32(k)), a);
      const __mmask16 upper = _mm512_test_epi32_mask(lane, _mm512_set1_epi32(k));
      a = _mm512_mask_sub_ps(_mm512_add_ps(a, t), upper, t, a);
    }
    _mm512_storeu_ps(y + v, a);
  }
  h = 16;
#elif defined(TQ_AVX2)
  for (int v = 0; v < d; v += 8) {
    __m256 a = _mm256_loadu_ps(y + v);
    for (int k = 1; k < 8; k *= 2) {
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256 t = _mm256_permutevar8x32_ps(a, _mm256_xor_si256(lane, _mm256_set1_epi32(k)));
      const __m256 upper = _mm256_castsi256_ps(
          _mm256_cmpeq_epi32(_mm256_and_si256(lane, _mm256_set1_epi32(k)), _mm256_set1_epi32(k)));
      a = _mm256_blendv_ps(_mm256_add_ps(a, t), _mm256_sub_ps(t, a), upper);
    }
    _mm256_storeu_ps(y + v, a);
  }
  h = 8;
#endif
  for (; h < d; h *= 2)  // between registers: whole runs of h lanes
    for (int i0 = 0; i0 < d; i0 += 2 * h)
      for (int i = i0; i < i0 + h; ++i) {
        const float a = y[i], b = y[i + h];
        y[i] = a + b;
        y[i + h] = a - b;
      }
  for (int j = 0; j < d; ++j) y[j] *= c;
}

// combine_rows of two rows at once (y1 = M1^T x1, y2 = M2^T x2, both [d, d]), the same bits as
// two calls. One row's 64-output pass is 4 chains of d dependent FMAs, which wait on the FMA's
// latency (4 cycles) where the two AVX-512 FMA ports could take two a cycle; the two rows'
// chains interleaved keep 8 in flight (the store's key and value rotations in about half the
// time). On AVX2 a row's pass is already 8 chains (64 outputs in 8-lane registers), and two
// rows' 16 accumulators would not fit its 16 registers.
inline void combine_rows_pair(const float* __restrict__ M1, const float* __restrict__ x1,
                              const float* __restrict__ M2, const float* __restrict__ x2, int d,
                              float* __restrict__ y1, float* __restrict__ y2) {
#ifdef TQ_AVX512
  if (d % 64 == 0) {
    for (int i0 = 0; i0 < d; i0 += 64) {
      __m512 a1[4], a2[4];
      for (int k = 0; k < 4; ++k) a1[k] = a2[k] = _mm512_setzero_ps();
      for (int j = 0; j < d; ++j) {
        const __m512 b1 = _mm512_set1_ps(x1[j]), b2 = _mm512_set1_ps(x2[j]);
        const float* r1 = M1 + static_cast<size_t>(j) * d + i0;
        const float* r2 = M2 + static_cast<size_t>(j) * d + i0;
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) {
          a1[k] = _mm512_fmadd_ps(b1, _mm512_loadu_ps(r1 + 16 * k), a1[k]);
          a2[k] = _mm512_fmadd_ps(b2, _mm512_loadu_ps(r2 + 16 * k), a2[k]);
        }
      }
      for (int k = 0; k < 4; ++k) {
        _mm512_storeu_ps(y1 + i0 + 16 * k, a1[k]);
        _mm512_storeu_ps(y2 + i0 + 16 * k, a2[k]);
      }
    }
    return;
  }
#endif
  combine_rows(M1, x1, d, 1.f, y1);
  combine_rows(M2, x2, d, 1.f, y2);
}

}  // namespace tq
