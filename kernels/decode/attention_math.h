// The float32 arithmetic of the fused attention (attention.cpp): dots (the store's norms too),
// scores, the online softmax's weights and the weighted value sums, with AVX-512 and AVX2 paths
// where the CPU has them.
#pragma once

#include "../csrc/float_rows.h"
#include "../csrc/row_decoder.h"

namespace tq {

constexpr int TILE = 64;    // tokens decoded together
constexpr int LANES = 16;   // independent partial sums per dot: vectorizes without -ffast-math
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

#ifdef TQ_AVX2
inline float hsum(__m256 a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Lane i of the result: the sum of the 8 lanes of a[i].
inline __m256 transpose_sum(const __m256 a[8]) {
  const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20),
                       _mm256_permute2f128_ps(u0, u1, 0x31));
}

// e^x for x <= 0 as exp_nonpositive's AVX-512 form, with 2^k built in the exponent bits: x is
// clamped at -87 (e^-87 ~ 1.6e-38, the smallest normal float), which a weight next to the
// row's maximum (e^0 = 1) cannot notice.
inline __m256 exp_nonpositive(__m256 x) {
  const __m256 t = _mm256_mul_ps(_mm256_max_ps(_mm256_set1_ps(-87.f), x),
                                 _mm256_set1_ps(1.44269504088896341f));
  const __m256 k = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_mul_ps(_mm256_sub_ps(t, k), _mm256_set1_ps(0.693147180559945309f));
  __m256 p = _mm256_set1_ps(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f})
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(c));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k),
                                                       _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

inline float dot(const float* a, const float* b, int n) {
#ifdef TQ_AVX512
  if (n % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int j = 0; j < n; j += 16)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
#ifdef TQ_AVX2
  if (n % 8 == 0) {
    __m256 acc = _mm256_setzero_ps();
    for (int j = 0; j < n; j += 8)
      acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
    return hsum(acc);
  }
#endif
  float lanes[LANES] = {};
  int j = 0;
  for (; j + LANES <= n; j += LANES)
    for (int k = 0; k < LANES; ++k) lanes[k] += a[j + k] * b[j + k];
  float s = 0.f;
  for (; j < n; ++j) s += a[j] * b[j];
  for (int k = 0; k < LANES; ++k) s += lanes[k];
  return s;
}

#ifdef TQ_AVX512
// Lane i of the result: the sum of the 16 lanes of a[i].
inline __m512 transpose_sum(const __m512 a[16]) {
  __m512 b[8], c[4];
  for (int i = 0; i < 8; ++i)  // per 128-bit block: [a2i 0+2, a2i+1 0+2, a2i 1+3, a2i+1 1+3]
    b[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]),
                         _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i) {  // per 128-bit block: the block's sums of a4i .. a4i+3
    const __m512d x = _mm512_castps_pd(b[2 * i]), y = _mm512_castps_pd(b[2 * i + 1]);
    c[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  const __m512 e01 = _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x44),
                                   _mm512_shuffle_f32x4(c[0], c[1], 0xEE));
  const __m512 e23 = _mm512_add_ps(_mm512_shuffle_f32x4(c[2], c[3], 0x44),
                                   _mm512_shuffle_f32x4(c[2], c[3], 0xEE));
  return _mm512_add_ps(_mm512_shuffle_f32x4(e01, e23, 0x88),
                       _mm512_shuffle_f32x4(e01, e23, 0xDD));
}

// e^x for x <= 0 (a NaN stays NaN): 2^round(t) * 2^f, |f| <= 1/2, 2^f by its degree-7 Taylor
// polynomial (relative error < 1e-8 there).
inline __m512 exp_nonpositive(__m512 x) {
  const __m512 t = _mm512_mul_ps(_mm512_max_ps(_mm512_set1_ps(-104.f), x),
                                 _mm512_set1_ps(1.44269504088896341f));
  const __m512 k = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, k), _mm512_set1_ps(0.693147180559945309f));
  __m512 p = _mm512_set1_ps(1.f / 5040);
  for (const float c : {1.f / 720, 1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f})
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, k);
}
#endif

#ifdef TQ_AVX512
// s[u] += scale[u] * (the 16-lane sum of row_dot(u)) for u < n, 16 tokens at a time: their 16
// dots are independent, fully unrolled chains (a runtime-length loop instead left one
// dependent chain per token and spilled the partial sums to the stack), reduced together.
template <class RowDot>
inline void add_dot_groups(RowDot row_dot, const float* scale, int n, float* s) {
  for (int u0 = 0; u0 < n; u0 += 16) {
    const int cnt = std::min(16, n - u0);
    __m512 a[16];
    // Rows past n read the tile's last row again (the buffers hold whole tiles); masked below.
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) a[t] = row_dot(u0 + std::min(t, cnt - 1));
    const __mmask16 keep = static_cast<__mmask16>((1u << cnt) - 1);
    const __m512 dots =
        _mm512_mul_ps(transpose_sum(a), _mm512_maskz_loadu_ps(keep, scale + u0));
    _mm512_mask_storeu_ps(s + u0, keep, _mm512_add_ps(_mm512_maskz_loadu_ps(keep, s + u0), dots));
  }
}

// add_scores for a head_dim D known at compile time: q stays in registers.
template <int D>
inline void add_scores_fixed(const float* q, const float* x, const float* scale, int n,
                             float* s) {
  constexpr int V = D / 16;
  __m512 qv[V];
  for (int k = 0; k < V; ++k) qv[k] = _mm512_loadu_ps(q + 16 * k);
  add_dot_groups(
      [&](int u) __attribute__((always_inline)) {
        const float* xu = x + static_cast<size_t>(u) * D;
        __m512 dot = _mm512_mul_ps(qv[0], _mm512_loadu_ps(xu));
#pragma GCC unroll 16
        for (int k = 1; k < V; ++k) dot = _mm512_fmadd_ps(qv[k], _mm512_loadu_ps(xu + 16 * k), dot);
        return dot;
      },
      scale, n, s);
}
#endif

#ifdef TQ_AVX2
// The AVX-512 add_scores_fixed with 8-wide registers: 8 tokens' dots as 8 unrolled,
// independent FMA chains (the runtime-length loop ran one dependent chain per token).
template <int D>
inline void add_scores_fixed(const float* q, const float* x, const float* scale, int n,
                             float* s) {
  constexpr int V = D / 8;
  int u0 = 0;
  for (; u0 + 8 <= n; u0 += 8) {
    __m256 a[8];
#pragma GCC unroll 8
    for (int t = 0; t < 8; ++t) {
      const float* xt = x + static_cast<size_t>(u0 + t) * D;
      __m256 dot = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(xt));
#pragma GCC unroll 32
      for (int k = 1; k < V; ++k)
        dot = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * k), _mm256_loadu_ps(xt + 8 * k), dot);
      a[t] = dot;
    }
    const __m256 dots = _mm256_mul_ps(transpose_sum(a), _mm256_loadu_ps(scale + u0));
    _mm256_storeu_ps(s + u0, _mm256_add_ps(_mm256_loadu_ps(s + u0), dots));
  }
  for (int u = u0; u < n; ++u) s[u] += scale[u] * dot(q, x + static_cast<size_t>(u) * D, D);
}
#endif

// s[u] += scale[u] * <q, x[u]> for the n rows x[u] of d floats.
inline void add_scores(const float* q, const float* x, const float* scale, int n, int d,
                       float* s) {
#ifdef TQ_AVX512
  switch (d) {
    case 64: return add_scores_fixed<64>(q, x, scale, n, s);
    case 128: return add_scores_fixed<128>(q, x, scale, n, s);
    case 256: return add_scores_fixed<256>(q, x, scale, n, s);
    default: break;
  }
  if (d % 16 == 0)  // 16 tokens' dots reduced together, not one horizontal sum each
    return add_dot_groups(
        [&](int u) {
          const float* xu = x + static_cast<size_t>(u) * d;
          __m512 dot = _mm512_setzero_ps();
          for (int j = 0; j < d; j += 16)
            dot = _mm512_fmadd_ps(_mm512_loadu_ps(q + j), _mm512_loadu_ps(xu + j), dot);
          return dot;
        },
        scale, n, s);
#elif defined(TQ_AVX2)
  switch (d) {
    case 64: return add_scores_fixed<64>(q, x, scale, n, s);
    case 128: return add_scores_fixed<128>(q, x, scale, n, s);
    case 256: return add_scores_fixed<256>(q, x, scale, n, s);
    default: break;
  }
  if (d % 8 == 0) {  // 8 tokens' dots reduced together, not one horizontal sum each
    int u0 = 0;
    for (; u0 + 8 <= n; u0 += 8) {
      __m256 a[8];
      for (int k = 0; k < 8; ++k) {  // a register chain per token: tokens overlap
        const float* xk = x + static_cast<size_t>(u0 + k) * d;
        __m256 dot = _mm256_mul_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(xk));
        for (int j = 8; j < d; j += 8)
          dot = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), _mm256_loadu_ps(xk + j), dot);
        a[k] = dot;
      }
      const __m256 dots = _mm256_mul_ps(transpose_sum(a), _mm256_loadu_ps(scale + u0));
      _mm256_storeu_ps(s + u0, _mm256_add_ps(_mm256_loadu_ps(s + u0), dots));
    }
    for (int u = u0; u < n; ++u) s[u] += scale[u] * dot(q, x + static_cast<size_t>(u) * d, d);
    return;
  }
#endif
  for (int u = 0; u < n; ++u) s[u] += scale[u] * dot(q, x + static_cast<size_t>(u) * d, d);
}

// max_u s[u] over u < n, skipping NaNs (a NaN score still poisons the softmax sum).
inline float max_score(const float* s, int n) {
#ifdef TQ_AVX512
  __m512 top = _mm512_set1_ps(NEG_INF);
  for (int u = 0; u < n; u += 16) {
    const __mmask16 keep = static_cast<__mmask16>((1u << std::min(16, n - u)) - 1);
    top = _mm512_max_ps(_mm512_mask_loadu_ps(_mm512_set1_ps(NEG_INF), keep, s + u), top);
  }
  return _mm512_reduce_max_ps(top);
#else
  float top = NEG_INF;
  int u = 0;
#ifdef TQ_AVX2
  __m256 tops = _mm256_set1_ps(NEG_INF);
  for (; u + 8 <= n; u += 8) tops = _mm256_max_ps(_mm256_loadu_ps(s + u), tops);  // NaN: skipped
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(tops), _mm256_extractf128_ps(tops, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  top = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
#endif
  for (; u < n; ++u) top = s[u] > top ? s[u] : top;
  return top;
#endif
}

// w[u] = e^(s[u] - m) * vnorm[u] for u < n; returns sum_u e^(s[u] - m).
inline float softmax_weights(const float* s, const float* vnorm, float m, int n, float* w) {
#ifdef TQ_AVX512
  __m512 sum = _mm512_setzero_ps();
  for (int u = 0; u < n; u += 16) {
    const __mmask16 keep = static_cast<__mmask16>((1u << std::min(16, n - u)) - 1);
    const __m512 x = _mm512_sub_ps(_mm512_maskz_loadu_ps(keep, s + u), _mm512_set1_ps(m));
    const __m512 p = _mm512_maskz_mov_ps(keep, exp_nonpositive(x));
    sum = _mm512_add_ps(sum, p);
    _mm512_mask_storeu_ps(w + u, keep, _mm512_mul_ps(p, _mm512_maskz_loadu_ps(keep, vnorm + u)));
  }
  return _mm512_reduce_add_ps(sum);
#else
  float total = 0.f;
  int u = 0;
#ifdef TQ_AVX2
  __m256 sum = _mm256_setzero_ps();
  for (; u + 8 <= n; u += 8) {
    const __m256 p = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + u), _mm256_set1_ps(m)));
    sum = _mm256_add_ps(sum, p);
    _mm256_storeu_ps(w + u, _mm256_mul_ps(p, _mm256_loadu_ps(vnorm + u)));
  }
  total = hsum(sum);
#endif
  for (; u < n; ++u) {
    const float p = std::exp(s[u] - m);
    total += p;
    w[u] = p * vnorm[u];
  }
  return total;
#endif
}

// For the rows r < rows (at most ROW_BLOCK): acc[r][:d] = alpha[r] * acc[r] +
// sum_u w[r][u] * v[u, :d] over n rows v of d floats, n even on every build (the AVX2 path
// takes tokens in pairs; a caller with an odd count adds a row of weight 0). Rows share each
// loaded v.
constexpr int ROW_BLOCK = 4;
#ifdef TQ_AVX512
// accumulate over the 64 columns [j0, j0 + 64) for a row count known at compile time: the
// ROWS x 4 partial sums stay in registers (runtime bounds left them on the stack).
template <int ROWS>
inline void accumulate_columns(float* const* acc, const float* alpha, const float* const* w,
                               const float* v, int n, int d, int j0) {
  __m512 a[ROWS][4];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k)
      a[r][k] = _mm512_mul_ps(_mm512_loadu_ps(acc[r] + j0 + 16 * k), _mm512_set1_ps(alpha[r]));
  for (int u = 0; u < n; ++u) {
    const float* vu = v + static_cast<size_t>(u) * d + j0;
    __m512 x[4];
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) x[k] = _mm512_loadu_ps(vu + 16 * k);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const __m512 wr = _mm512_set1_ps(w[r][u]);
#pragma GCC unroll 4
      for (int k = 0; k < 4; ++k) a[r][k] = _mm512_fmadd_ps(wr, x[k], a[r][k]);
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 4
    for (int k = 0; k < 4; ++k) _mm512_storeu_ps(acc[r] + j0 + 16 * k, a[r][k]);
}
#endif

#ifdef TQ_AVX2
// The AVX2 counterpart of accumulate_columns over 16 columns [j0, j0 + 16), two tokens a step
// (n even): their weighted rows are summed first (mul, fma) and then added to the ROWS x 2
// partial sums, so each sum waits on one add per two tokens, not on an FMA per token. For 3
// rows (the embedded model's GQA group) the FMA's latency bound that loop on Zen 3: 4 cycles a
// token where its two FMA pipes need 3.
template <int ROWS>
inline void accumulate_columns(float* const* acc, const float* alpha, const float* const* w,
                               const float* v, int n, int d, int j0) {
  __m256 a[ROWS][2];
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 2
    for (int k = 0; k < 2; ++k)
      a[r][k] = _mm256_mul_ps(_mm256_loadu_ps(acc[r] + j0 + 8 * k), _mm256_set1_ps(alpha[r]));
  for (int u = 0; u < n; u += 2) {
    const float* vu = v + static_cast<size_t>(u) * d + j0;
    const __m256 x0 = _mm256_loadu_ps(vu), x1 = _mm256_loadu_ps(vu + 8);
    const __m256 y0 = _mm256_loadu_ps(vu + d), y1 = _mm256_loadu_ps(vu + d + 8);
#pragma GCC unroll 8
    for (int r = 0; r < ROWS; ++r) {
      const __m256 wx = _mm256_set1_ps(w[r][u]), wy = _mm256_set1_ps(w[r][u + 1]);
      a[r][0] = _mm256_add_ps(a[r][0], _mm256_fmadd_ps(wy, y0, _mm256_mul_ps(wx, x0)));
      a[r][1] = _mm256_add_ps(a[r][1], _mm256_fmadd_ps(wy, y1, _mm256_mul_ps(wx, x1)));
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < ROWS; ++r)
#pragma GCC unroll 2
    for (int k = 0; k < 2; ++k) _mm256_storeu_ps(acc[r] + j0 + 8 * k, a[r][k]);
}
#endif

inline void accumulate(float* const* acc, const float* alpha, const float* const* w, int rows,
                       const float* v, int n, int d) {
#ifdef TQ_AVX512
  if (d % 64 == 0) {
    for (int j0 = 0; j0 < d; j0 += 64) switch (rows) {
        case 1: accumulate_columns<1>(acc, alpha, w, v, n, d, j0); break;
        case 2: accumulate_columns<2>(acc, alpha, w, v, n, d, j0); break;
        case 3: accumulate_columns<3>(acc, alpha, w, v, n, d, j0); break;
        default: accumulate_columns<4>(acc, alpha, w, v, n, d, j0); break;
      }
    return;
  }
  if (d % 16 == 0) {
    for (int j0 = 0; j0 < d; j0 += 64) {  // 4 vectors x 4 rows: 16 independent FMA chains
      const int nv = std::min(4, (d - j0) / 16);
      __m512 a[ROW_BLOCK][4];
      for (int r = 0; r < rows; ++r)
        for (int k = 0; k < nv; ++k)
          a[r][k] = _mm512_mul_ps(_mm512_loadu_ps(acc[r] + j0 + 16 * k),
                                  _mm512_set1_ps(alpha[r]));
      for (int u = 0; u < n; ++u) {
        const float* vu = v + static_cast<size_t>(u) * d + j0;
        __m512 x[4];
        for (int k = 0; k < nv; ++k) x[k] = _mm512_loadu_ps(vu + 16 * k);
        for (int r = 0; r < rows; ++r) {
          const __m512 wr = _mm512_set1_ps(w[r][u]);
          for (int k = 0; k < nv; ++k) a[r][k] = _mm512_fmadd_ps(wr, x[k], a[r][k]);
        }
      }
      for (int r = 0; r < rows; ++r)
        for (int k = 0; k < nv; ++k) _mm512_storeu_ps(acc[r] + j0 + 16 * k, a[r][k]);
    }
    return;
  }
#elif defined(TQ_AVX2)
  if (d % 16 == 0) {
    for (int j0 = 0; j0 < d; j0 += 16) switch (rows) {
        case 1: accumulate_columns<1>(acc, alpha, w, v, n, d, j0); break;
        case 2: accumulate_columns<2>(acc, alpha, w, v, n, d, j0); break;
        case 3: accumulate_columns<3>(acc, alpha, w, v, n, d, j0); break;
        default: accumulate_columns<4>(acc, alpha, w, v, n, d, j0); break;
      }
    return;
  }
#endif
  for (int r = 0; r < rows; ++r) {
    for (int j = 0; j < d; ++j) acc[r][j] *= alpha[r];
    for (int u = 0; u < n; ++u)
      for (int j = 0; j < d; ++j) acc[r][j] += w[r][u] * v[static_cast<size_t>(u) * d + j];
  }
}


}  // namespace tq
