// bf16 dot products for the fused attention (attention.cpp) on CPUs with AVX512-BF16, used for
// bf16 models, whose queries, keys and values are bf16 numbers anyway.
//
// Why: the float32 path spends most of its time turning indices into floats (a 6-bit lookup
// takes two two-table permutes, a test and a blend per 16 floats) and multiplying them. Here a
// centroid is a bf16 number looked up in byte planes: one vpermb per 64 indices gives the low
// bytes, one the high bytes, and vdpbf16ps multiplies 32 of them per instruction with float32
// sums. The costs: the rotated query, the centroids and the softmax weights are rounded to
// bf16 (relative error 2^-9 each), as a bf16 model's own attention rounds its keys and values.
//
// Word order. For each 64 dimensions, unpacking the two byte planes gives the words of dims
// {0-7, 16-23, 32-39, 48-55} then {8-15, 24-31, 40-47, 56-63}: the query is laid out in that
// order (permuted_dim), so key dots need no shuffles. Values are summed over tokens, so two
// tokens' words are interleaved into (token t, token t + 1) pairs per dimension, and the
// float32 sums come out in pair_dim's order.
#pragma once

#include "attention_math.h"

#if defined(TQ_AVX512) && defined(__AVX512BF16__)
#define TQ_BF16_DOTS 1

namespace tq {

// Dimension of word w (of 64) of a key row in bf16 order.
inline int permuted_dim(int w) { return 16 * (w % 32 / 8) + 8 * (w / 32) + w % 8; }

// Dimension of float lane i (of 64) of a value sum: register k = i / 16, lane i % 16.
inline int pair_dim(int i) {
  const int k = i / 16, lane = i % 16;
  return 16 * (lane / 4) + 4 * k + lane % 4;
}

// A row of b-bit indices (b <= 6, n % 64 == 0) as bf16 centroids in permuted_dim order.
class Bf16RowDecoder {
 public:
  static bool fits(int bits, int n) { return bits >= 1 && bits <= 6 && n % 64 == 0; }

  Bf16RowDecoder(const float* centroids, int bits, int n) : bits_(bits), n_(n) {
    alignas(64) uint8_t perm[64], shift[64], low[64] = {}, high[64] = {};
    for (int g = 0; g < 8; ++g)
      for (int i = 0; i < 8; ++i) {
        perm[8 * g + i] = static_cast<uint8_t>(g * bits + i);
        shift[8 * g + i] = static_cast<uint8_t>(i * bits);
      }
    for (int i = 0; i < (1 << bits); ++i) {
      const uint16_t h = c10::BFloat16(centroids[i]).x;  // round to nearest even
      low[i] = static_cast<uint8_t>(h & 0xFF);
      high[i] = static_cast<uint8_t>(h >> 8);
    }
    perm_ = _mm512_load_si512(perm);
    shift_ = _mm512_load_si512(shift);
    mask_ = _mm512_set1_epi8(static_cast<char>((1 << bits) - 1));
    low_ = _mm512_load_si512(low);
    high_ = _mm512_load_si512(high);
  }

  // Words of 64 indices at p (64 * b / 8 bytes): dims 0-7, 16-23, ... in w[0], the rest in w[1].
  void words(const uint8_t* p, __m512i w[2]) const {
    const __mmask64 keep = (__mmask64{1} << (8 * bits_)) - 1;  // 64 indices: 8b bytes
    const __m512i lanes = _mm512_permutexvar_epi8(perm_, _mm512_maskz_loadu_epi8(keep, p));
    const __m512i idx = _mm512_and_si512(_mm512_multishift_epi64_epi8(shift_, lanes), mask_);
    const __m512i lo = _mm512_permutexvar_epi8(idx, low_), hi = _mm512_permutexvar_epi8(idx, high_);
    w[0] = _mm512_unpacklo_epi8(lo, hi);
    w[1] = _mm512_unpackhi_epi8(lo, hi);
  }

  // Rows recs[u] + offset (u < n) into out + u * n_ words.
  void rows(const uint8_t* const* recs, int offset, int n, uint16_t* out) const {
    for (int u = 0; u < n; ++u) {
      if (u + 2 < n) __builtin_prefetch(recs[u + 2] + offset);
      for (int c = 0; c < n_; c += 64) {
        __m512i w[2];
        words(recs[u] + offset + c * bits_ / 8, w);
        __m512i* o = reinterpret_cast<__m512i*>(out + static_cast<size_t>(u) * n_ + c);
        _mm512_storeu_si512(o, w[0]);
        _mm512_storeu_si512(o + 1, w[1]);
      }
    }
  }

  // Tokens 2i and 2i + 1 (i < pairs) interleaved: per 64 dims, four registers of 16 (t, t + 1)
  // pairs in pair_dim order, at out + i * 2 * n_ words.
  void pairs(const uint8_t* const* recs, int offset, int pairs, uint16_t* out) const {
    for (int i = 0; i < pairs; ++i) {
      if (i + 1 < pairs) __builtin_prefetch(recs[2 * i + 2] + offset);
      for (int c = 0; c < n_; c += 64) {
        __m512i a[2], b[2];
        words(recs[2 * i] + offset + c * bits_ / 8, a);
        words(recs[2 * i + 1] + offset + c * bits_ / 8, b);
        __m512i* o = reinterpret_cast<__m512i*>(out + static_cast<size_t>(i) * 2 * n_ + 2 * c);
        _mm512_storeu_si512(o, _mm512_unpacklo_epi16(a[0], b[0]));
        _mm512_storeu_si512(o + 1, _mm512_unpackhi_epi16(a[0], b[0]));
        _mm512_storeu_si512(o + 2, _mm512_unpacklo_epi16(a[1], b[1]));
        _mm512_storeu_si512(o + 3, _mm512_unpackhi_epi16(a[1], b[1]));
      }
    }
  }

 private:
  int bits_, n_;
  __m512i perm_, shift_, mask_, low_, high_;
};

// x[:n] (n % 16 == 0) rounded to bf16 into out.
inline void to_bf16(const float* x, int n, uint16_t* out) {
  for (int j = 0; j < n; j += 16) {
    const __m256bh h = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + j));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j), reinterpret_cast<const __m256i&>(h));
  }
}

inline __m512 dot_bf16(__m512 acc, __m512i a, __m512i b) {
  return _mm512_dpbf16_ps(acc, reinterpret_cast<const __m512bh&>(a),
                          reinterpret_cast<const __m512bh&>(b));
}

// add_scores over bf16 rows: s[u] += scale[u] * <q, x[u]>, q and x[u] D words in the same order.
template <int D>
inline void add_scores_bf16(const uint16_t* q, const uint16_t* x, const float* scale, int n,
                            float* s) {
  constexpr int V = D / 32;
  __m512i qv[V];
  for (int k = 0; k < V; ++k) qv[k] = _mm512_loadu_si512(q + 32 * k);
  add_dot_groups(
      [&](int u) __attribute__((always_inline)) {
        const uint16_t* xu = x + static_cast<size_t>(u) * D;
        __m512 dot = _mm512_setzero_ps();
#pragma GCC unroll 8
        for (int k = 0; k < V; ++k) dot = dot_bf16(dot, qv[k], _mm512_loadu_si512(xu + 32 * k));
        return dot;
      },
      scale, n, s);
}

inline void add_scores_bf16(const uint16_t* q, const uint16_t* x, const float* scale, int n,
                            int d, float* s) {
  switch (d) {
    case 64: return add_scores_bf16<64>(q, x, scale, n, s);
    case 128: return add_scores_bf16<128>(q, x, scale, n, s);
    default: return add_scores_bf16<256>(q, x, scale, n, s);
  }
}

// accumulate over token pairs: acc[r] (d floats in pair_dim order per 64) = alpha[r] * acc[r] +
// sum_u w[r][u] * v[u] for u < 2 * pairs, v as Bf16RowDecoder::pairs wrote it, w in bf16.
template <int ROWS>
inline void accumulate_bf16_rows(float* const* acc, const float* alpha, const uint16_t* const* w,
                                 const uint16_t* v, int pairs, int d) {
  for (int c = 0; c < d; c += 64) {
    __m512 a[ROWS][4];
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k)
        a[r][k] = _mm512_mul_ps(_mm512_loadu_ps(acc[r] + c + 16 * k), _mm512_set1_ps(alpha[r]));
    for (int i = 0; i < pairs; ++i) {
      const uint16_t* vi = v + static_cast<size_t>(i) * 2 * d + 2 * c;
      __m512i x[4];
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) x[k] = _mm512_loadu_si512(vi + 32 * k);
#pragma GCC unroll 4
      for (int r = 0; r < ROWS; ++r) {
        int32_t pair;
        std::memcpy(&pair, w[r] + 2 * i, 4);
        const __m512i wr = _mm512_set1_epi32(pair);
#pragma GCC unroll 4
        for (int k = 0; k < 4; ++k) a[r][k] = dot_bf16(a[r][k], x[k], wr);
      }
    }
#pragma GCC unroll 4
    for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) _mm512_storeu_ps(acc[r] + c + 16 * k, a[r][k]);
  }
}

inline void accumulate_bf16(float* const* acc, const float* alpha, const uint16_t* const* w,
                            int rows, const uint16_t* v, int pairs, int d) {
  switch (rows) {
    case 1: return accumulate_bf16_rows<1>(acc, alpha, w, v, pairs, d);
    case 2: return accumulate_bf16_rows<2>(acc, alpha, w, v, pairs, d);
    case 3: return accumulate_bf16_rows<3>(acc, alpha, w, v, pairs, d);
    default: return accumulate_bf16_rows<4>(acc, alpha, w, v, pairs, d);
  }
}

}  // namespace tq
#endif
