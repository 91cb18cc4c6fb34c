// Fused CPU attention over the TurboQuant paged cache (decode and chunked prefill).
//
// Contract: tq_vllm/kernels/cpu_attention.py (it rotates queries before and outputs after).
// One work item is (sequence, query-row tile, KV head, context split). It walks the
// sequence's records through the block table in tiles of TILE tokens, unpacks the b-bit
// indices straight from the record bytes (LSB-first, 8 indices of b bits = b bytes, see
// tq_vllm/packing.py), looks up centroids, scores every query row of the GQA group against
// norm * c[idx] (+ the QJL term in prod mode), and accumulates norm * c_v[vidx] under an
// online softmax, all in the rotated domain. Splits of one row tile are merged by their
// log-sum-exp. Everything is float32.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#include <immintrin.h>
#define TQ_AVX512 1
#endif

namespace {

constexpr int TILE = 64;    // tokens decoded together
constexpr int LANES = 16;   // independent partial sums per dot: vectorizes without -ffast-math
constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

inline float load_half(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);  // records have any length: the field may be unaligned
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

template <int B>
void unpack_bits(const uint8_t* p, int n, uint8_t* out) {
  constexpr uint64_t mask = (uint64_t{1} << B) - 1;
  int j = 0;
  for (; j + 8 <= n; j += 8, p += B) {  // 8 indices fill exactly B bytes
    uint64_t w = 0;
    std::memcpy(&w, p, B);
    for (int k = 0; k < 8; ++k) out[j + k] = static_cast<uint8_t>((w >> (k * B)) & mask);
  }
  if (j < n) {  // a head_dim that is not a multiple of 8: the row's last, partial group
    const int rest = n - j;
    uint64_t w = 0;
    std::memcpy(&w, p, (rest * B + 7) / 8);
    for (int k = 0; k < rest; ++k) out[j + k] = static_cast<uint8_t>((w >> (k * B)) & mask);
  }
}

using UnpackFn = void (*)(const uint8_t*, int, uint8_t*);
constexpr UnpackFn UNPACK[9] = {nullptr,         unpack_bits<1>, unpack_bits<2>,
                                unpack_bits<3>, unpack_bits<4>, unpack_bits<5>,
                                unpack_bits<6>, unpack_bits<7>, unpack_bits<8>};

inline float dot(const float* a, const float* b, int n) {
#ifdef TQ_AVX512
  if (n % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int j = 0; j < n; j += 16)
      acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + j), _mm512_loadu_ps(b + j), acc);
    return _mm512_reduce_add_ps(acc);
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

// Centroid values of one row of b-bit indices: c[idx] for each of the n indices at p.
class RowDecoder {
 public:
  RowDecoder(const float* centroids, int bits, int n) : c_(centroids), bits_(bits), n_(n) {
#ifdef TQ_AVX512
    fast_ = n % 16 == 0;
    if (!fast_) return;
    // 64 indices at a time: byte-permute each group of 8 indices (b bytes) into its own
    // 64-bit lane, pull every index's bits out with one multishift, mask them.
    alignas(64) uint8_t perm[64], shift[64];
    for (int g = 0; g < 8; ++g)
      for (int i = 0; i < 8; ++i) {
        perm[8 * g + i] = static_cast<uint8_t>(g * bits + i);
        shift[8 * g + i] = static_cast<uint8_t>(i * bits);
      }
    perm_ = _mm512_load_si512(perm);
    shift_ = _mm512_load_si512(shift);
    mask_ = _mm512_set1_epi8(static_cast<char>((1 << bits) - 1));
    alignas(64) float table[64] = {};  // up to 6 bits the table sits in four registers
    for (int i = 0; i < std::min(64, 1 << bits); ++i) table[i] = centroids[i];
    for (int i = 0; i < 4; ++i) t_[i] = _mm512_load_ps(table + 16 * i);
#endif
  }

  void operator()(const uint8_t* p, float* out) const {
    const uint8_t* rows[1] = {p};
    this->rows(rows, 0, 1, 0, out);
  }

  // Rows recs[u] + offset for u < n into out + u * stride: one dispatch on the bit width per
  // call, the per-row work then inlined with the width known at compile time.
  void rows(const uint8_t* const* recs, int offset, int n, int stride, float* out) const {
#ifdef TQ_AVX512
    if (fast_) switch (bits_) {
        case 1: return rows_fixed<1>(recs, offset, n, stride, out);
        case 2: return rows_fixed<2>(recs, offset, n, stride, out);
        case 3: return rows_fixed<3>(recs, offset, n, stride, out);
        case 4: return rows_fixed<4>(recs, offset, n, stride, out);
        case 5: return rows_fixed<5>(recs, offset, n, stride, out);
        case 6: return rows_fixed<6>(recs, offset, n, stride, out);
        case 7: return rows_fixed<7>(recs, offset, n, stride, out);
        default: return rows_fixed<8>(recs, offset, n, stride, out);
      }
#endif
    alignas(64) uint8_t idx[256];
    for (int u = 0; u < n; ++u) {
      const uint8_t* p = recs[u] + offset;
      for (int c = 0; c < n_; c += 256) {  // chunks of whole groups of 8 indices
        const int m = std::min(256, n_ - c);
        UNPACK[bits_](p + c * bits_ / 8, m, idx);
        for (int i = 0; i < m; ++i) out[u * stride + c + i] = c_[idx[i]];
      }
    }
  }

 private:
#ifdef TQ_AVX512
  template <int B>
  void rows_fixed(const uint8_t* const* recs, int offset, int n, int stride, float* out) const {
    for (int u = 0; u < n; ++u) {
      if (u + 2 < n) __builtin_prefetch(recs[u + 2] + offset);  // the next rows' bytes to L1
      const uint8_t* p = recs[u] + offset;
      float* o = out + static_cast<size_t>(u) * stride;
      alignas(64) uint8_t idx[64];
      for (int c = 0; c < n_; c += 64) {
        const int m = std::min(64, n_ - c), bytes = m * B / 8;
        const __mmask64 keep = bytes == 64 ? ~__mmask64{0} : (__mmask64{1} << bytes) - 1;
        const __m512i data = _mm512_maskz_loadu_epi8(keep, p + c * B / 8);
        const __m512i lanes = _mm512_permutexvar_epi8(perm_, data);
        _mm512_store_si512(idx, _mm512_and_si512(_mm512_multishift_epi64_epi8(shift_, lanes),
                                                 mask_));
        for (int v = 0; v < m; v += 16) {
          const __m512i i = _mm512_cvtepu8_epi32(_mm_load_si128(
              reinterpret_cast<const __m128i*>(idx + v)));
          _mm512_storeu_ps(o + c + v, lookup<B>(i));
        }
      }
    }
  }

  template <int B>
  __m512 lookup(__m512i i) const {
    if constexpr (B <= 4) {
      return _mm512_permutexvar_ps(i, t_[0]);
    } else if constexpr (B == 5) {
      return _mm512_permutex2var_ps(t_[0], i, t_[1]);
    } else if constexpr (B == 6) {
      const __mmask16 high = _mm512_test_epi32_mask(i, _mm512_set1_epi32(32));
      return _mm512_mask_blend_ps(high, _mm512_permutex2var_ps(t_[0], i, t_[1]),
                                  _mm512_permutex2var_ps(t_[2], i, t_[3]));
    } else {
      return _mm512_i32gather_ps(i, c_, 4);
    }
  }
  bool fast_ = false;
  __m512i perm_, shift_, mask_;
  __m512 t_[4];
#endif
  const float* c_;
  int bits_, n_;
};

// QJL sign bits of one row as +-1.
inline void decode_signs(const uint8_t* p, int n, float* out) {
  int j = 0;
#ifdef TQ_AVX512
  const __m512 pos = _mm512_set1_ps(1.f), neg = _mm512_set1_ps(-1.f);
  for (; j + 16 <= n; j += 16) {
    uint16_t bits;
    std::memcpy(&bits, p + j / 8, 2);
    _mm512_storeu_ps(out + j, _mm512_mask_blend_ps(bits, neg, pos));
  }
#endif
  for (; j < n; ++j) out[j] = ((p[j >> 3] >> (j & 7)) & 1) ? 1.f : -1.f;
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
// add_scores for a head_dim D known at compile time: q stays in registers and the 16 dots of a
// token group are 16 independent, fully unrolled FMA chains (a runtime-length loop instead
// left one dependent chain per token and spilled the partial sums to the stack).
template <int D>
inline void add_scores_fixed(const float* q, const float* x, const float* scale, int n,
                             float* s) {
  constexpr int V = D / 16;
  __m512 qv[V];
  for (int k = 0; k < V; ++k) qv[k] = _mm512_loadu_ps(q + 16 * k);
  for (int u0 = 0; u0 < n; u0 += 16) {
    const int cnt = std::min(16, n - u0);
    __m512 a[16];
#pragma GCC unroll 16
    for (int t = 0; t < 16; ++t) {
      // Rows past n read the tile's next rows (the buffers hold whole tiles); masked below.
      const float* xt = x + static_cast<size_t>(u0 + std::min(t, cnt - 1)) * D;
      __m512 dot = _mm512_mul_ps(qv[0], _mm512_loadu_ps(xt));
#pragma GCC unroll 16
      for (int k = 1; k < V; ++k) dot = _mm512_fmadd_ps(qv[k], _mm512_loadu_ps(xt + 16 * k), dot);
      a[t] = dot;
    }
    const __mmask16 keep = static_cast<__mmask16>((1u << cnt) - 1);
    const __m512 dots =
        _mm512_mul_ps(transpose_sum(a), _mm512_maskz_loadu_ps(keep, scale + u0));
    _mm512_mask_storeu_ps(s + u0, keep, _mm512_add_ps(_mm512_maskz_loadu_ps(keep, s + u0), dots));
  }
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
  if (d % 16 == 0) {  // 16 tokens' dots reduced together, not one horizontal sum each
    for (int u0 = 0; u0 < n; u0 += 16) {
      const int cnt = std::min(16, n - u0);
      __m512 a[16];
      for (int k = 0; k < 16; ++k) a[k] = _mm512_setzero_ps();
      for (int k = 0; k < cnt; ++k) {  // a register chain per token: tokens overlap
        const float* xk = x + static_cast<size_t>(u0 + k) * d;
        __m512 dot = _mm512_setzero_ps();
        for (int j = 0; j < d; j += 16)
          dot = _mm512_fmadd_ps(_mm512_loadu_ps(q + j), _mm512_loadu_ps(xk + j), dot);
        a[k] = dot;
      }
      const __mmask16 keep = static_cast<__mmask16>((1u << cnt) - 1);
      const __m512 dots =
          _mm512_mul_ps(transpose_sum(a), _mm512_maskz_loadu_ps(keep, scale + u0));
      _mm512_mask_storeu_ps(s + u0, keep,
                            _mm512_add_ps(_mm512_maskz_loadu_ps(keep, s + u0), dots));
    }
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
  for (int u = 0; u < n; ++u) top = s[u] > top ? s[u] : top;
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
  for (int u = 0; u < n; ++u) {
    const float p = std::exp(s[u] - m);
    total += p;
    w[u] = p * vnorm[u];
  }
  return total;
#endif
}

// For the rows r < rows (at most ROW_BLOCK): acc[r][:d] = alpha[r] * acc[r] +
// sum_u w[r][u] * v[u, :d] over n rows v of d floats. Rows share each loaded v.
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
#endif
  for (int r = 0; r < rows; ++r) {
    for (int j = 0; j < d; ++j) acc[r][j] *= alpha[r];
    for (int u = 0; u < n; ++u)
      for (int j = 0; j < d; ++j) acc[r][j] += w[r][u] * v[static_cast<size_t>(u) * d + j];
  }
}

struct Layout {
  int key_bits;  // mse index bits, 0 for 1-bit prod (no mse part)
  bool prod;
  int value_bits;
  int value_norm, key_indices, key_signs, value_indices;  // byte offsets in a record
  float qjl_coef;
};

// The outlier part of split keys (outliers.py): count channels at bits, its fp16 norm and packed
// indices at these byte offsets of a record; the regular part is the layout's key fields over
// the first d - count rotated coordinates. count 0: plain keys.
struct OutlierPart {
  int count = 0, bits = 0, norm = 0, indices = 0;
  const float* centroids = nullptr;
};

// outliers: [] (plain keys) or [count, bits, norm offset, indices offset].
OutlierPart outlier_part(at::IntArrayRef outliers, const std::optional<at::Tensor>& centroids,
                         int64_t head_dim, int64_t record) {
  if (outliers.empty()) return {};
  TORCH_CHECK(outliers.size() == 4 && outliers[0] > 0 && outliers[0] < head_dim &&
                  outliers[1] >= 1 && outliers[1] <= 8 && outliers[2] >= 0 &&
                  outliers[2] + 2 <= record && outliers[3] >= 0 &&
                  outliers[3] + (outliers[0] * outliers[1] + 7) / 8 <= record,
              "outliers must be [count, bits 1..8, norm offset, indices offset] inside the "
              "record");
  TORCH_CHECK(centroids.has_value() && centroids->scalar_type() == at::kFloat &&
                  centroids->is_contiguous() && centroids->numel() >= (int64_t{1} << outliers[1]),
              "split keys need contiguous float32 outlier_centroids with 2^bits entries");
  return OutlierPart{static_cast<int>(outliers[0]), static_cast<int>(outliers[1]),
                     static_cast<int>(outliers[2]), static_cast<int>(outliers[3]),
                     centroids->data_ptr<float>()};
}

// x[:n] *= scale
inline void scale_row(float* x, float scale, int n) {
  for (int j = 0; j < n; ++j) x[j] *= scale;
}

struct Problem {
  const float* q;   // [T, Hq, d] rotated, scaled queries
  const float* qs;  // [T, Hq, d] S q' (prod mode)
  const uint8_t* cache;
  int64_t num_blocks, hk, block_size, record;
  const int32_t* table;
  int64_t table_stride;
  const float* kc;
  const float* vc;
  int d, g, hq;
  Layout lay;
  OutlierPart outliers;
};

// One (sequence, rows [row0, row0 + rows), KV head) over tokens [t0, t1). Row r of the item
// is query row row0 + r / g, head h * g + r % g, and sees tokens t <= lim0 + r / g.
// Writes acc[r] / l[r] to out (row stride out_stride) and log(l[r]) + m[r] to lse if given.
void attend_item(const Problem& P, int64_t b, int64_t row0, int rows, int64_t lim0, int64_t h,
                 int64_t t0, int64_t t1, float* out, int64_t out_stride, float* lse) {
  const int d = P.d, g = P.g, R = rows * g;
  const Layout& L = P.lay;
  std::vector<float> Q(static_cast<size_t>(R) * d), QS(L.prod ? static_cast<size_t>(R) * d : 0);
  std::vector<float> acc(static_cast<size_t>(R) * d, 0.f), m(R, NEG_INF), l(R, 0.f);
  std::vector<int64_t> lim(R);
  for (int r = 0; r < R; ++r) {
    const int64_t src = ((row0 + r / g) * P.hq + h * g + r % g) * d;
    std::memcpy(&Q[static_cast<size_t>(r) * d], P.q + src, sizeof(float) * d);
    if (L.prod) std::memcpy(&QS[static_cast<size_t>(r) * d], P.qs + src, sizeof(float) * d);
    lim[r] = lim0 + r / g;
  }
  std::vector<float> kf(L.key_bits ? TILE * d : 0), sg(L.prod ? TILE * d : 0), vf(TILE * d);
  float knorm[TILE], rnorm[TILE], vnorm[TILE];
  const uint8_t* recs[TILE];
  std::vector<float> S(static_cast<size_t>(R) * TILE), alpha(R);  // scores, then weights
  const bool has_k = L.key_bits > 0;  // 1-bit prod keys are all QJL
  const OutlierPart& O = P.outliers;
  const int regular = d - O.count;
  std::optional<RowDecoder> decode_k, decode_o;
  if (has_k) decode_k.emplace(P.kc, L.key_bits, regular);
  if (O.count) decode_o.emplace(O.centroids, O.bits, O.count);
  const RowDecoder decode_v(P.vc, L.value_bits, d);
  const int32_t* row_table = P.table + b * P.table_stride;

  // The walk through the block table: token t sits in row_table[t / block_size] at offset
  // t % block_size, advanced one token at a time (a division per token cost as much as the
  // decode). A head's records of one block are contiguous, so on entering a block the next
  // one is prefetched whole.
  const int64_t head_bytes = P.block_size * P.record;
  auto block_records = [&](int64_t i) -> const uint8_t* {
    const int64_t block = row_table[i];
    TORCH_CHECK(block >= 0 && block < P.num_blocks, "block_table entry ", block,
                " out of range for a cache of ", P.num_blocks, " blocks");
    return P.cache + (block * P.hk + h) * head_bytes;
  };
  const int64_t last_block = (t1 - 1) / P.block_size;
  int64_t block_i = t0 / P.block_size, offset = t0 % P.block_size;
  const uint8_t* records = t1 > t0 ? block_records(block_i) : nullptr;
  auto prefetch_block = [&](int64_t i) {
    if (i > last_block) return;
    const int64_t block = row_table[i];
    if (block < 0 || block >= P.num_blocks) return;  // checked when it is read
    const uint8_t* next = P.cache + (block * P.hk + h) * head_bytes;
    for (int64_t line = 0; line < head_bytes; line += 64) __builtin_prefetch(next + line);
  };
  prefetch_block(block_i + 1);

  for (int64_t ts = t0; ts < t1; ts += TILE) {
    const int n = static_cast<int>(std::min<int64_t>(TILE, t1 - ts));
    for (int u = 0; u < n; ++u) {
      if (offset == P.block_size) {
        offset = 0;
        records = block_records(++block_i);
        prefetch_block(block_i + 1);
      }
      const uint8_t* rec = recs[u] = records + (offset++) * P.record;
      knorm[u] = load_half(rec);
      vnorm[u] = load_half(rec + L.value_norm);
      if (L.prod) {
        rnorm[u] = load_half(rec + 2) * L.qjl_coef;
        decode_signs(rec + L.key_signs, d, &sg[u * d]);
      }
    }
    if (has_k) decode_k->rows(recs, L.key_indices, n, d, kf.data());
    if (O.count) {  // each part scaled by its own norm here, the score's scale is then 1
      decode_o->rows(recs, O.indices, n, d, kf.data() + regular);
      for (int u = 0; u < n; ++u) {
        scale_row(&kf[u * d], knorm[u], regular);
        scale_row(&kf[u * d + regular], load_half(recs[u] + O.norm), O.count);
        knorm[u] = 1.f;
      }
    }
    decode_v.rows(recs, L.value_indices, n, d, vf.data());

    // Rows whose limit precedes the tile (causal) are a prefix of the item's rows.
    int first = 0;
    while (first < R && lim[first] < ts) ++first;
    for (int r = first; r < R; ++r) {
      const int visible = static_cast<int>(std::min<int64_t>(n, lim[r] - ts + 1));
      float* sr = &S[static_cast<size_t>(r) * TILE];
      for (int u = 0; u < TILE; ++u) sr[u] = 0.f;  // past `visible`: weight 0 below
      if (has_k) add_scores(&Q[static_cast<size_t>(r) * d], kf.data(), knorm, visible, d, sr);
      if (L.prod) add_scores(&QS[static_cast<size_t>(r) * d], sg.data(), rnorm, visible, d, sr);
      const float m_new = std::max(m[r], max_score(sr, visible));
      alpha[r] = m[r] == NEG_INF ? 0.f : std::exp(m[r] - m_new);
      l[r] = l[r] * alpha[r] + softmax_weights(sr, vnorm, m_new, visible, sr);  // in place
      m[r] = m_new;
    }
    for (int r0 = first; r0 < R; r0 += ROW_BLOCK) {
      const int rows = std::min(ROW_BLOCK, R - r0);
      float* accs[ROW_BLOCK];
      const float* ws[ROW_BLOCK];
      for (int i = 0; i < rows; ++i) {
        accs[i] = &acc[static_cast<size_t>(r0 + i) * d];
        ws[i] = &S[static_cast<size_t>(r0 + i) * TILE];
      }
      // A block's last row sees the most tokens; the others' weights are 0 past theirs.
      const int visible = static_cast<int>(std::min<int64_t>(n, lim[r0 + rows - 1] - ts + 1));
      accumulate(accs, &alpha[r0], ws, rows, vf.data(), visible, d);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* o = out + (r / g) * out_stride + (r % g) * d;
    const float* ar = &acc[static_cast<size_t>(r) * d];
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;  // no tokens (an empty split): 0
    for (int j = 0; j < d; ++j) o[j] = ar[j] * inv;
    if (lse) lse[r] = l[r] > 0.f ? m[r] + std::log(l[r]) : NEG_INF;
  }
}

// A bijection of [0, n): 0, n-1, 1, n-2, ... Row tiles later in a chunk see more (causal)
// context; parallel_for hands each thread a contiguous range, which this way mixes light
// and heavy items instead of giving one thread all the heavy ones.
inline int64_t interleaved(int64_t pos, int64_t n) {
  return pos % 2 == 0 ? pos / 2 : n - 1 - pos / 2;
}

struct RowTile {
  int64_t b, row0, lim0, end;  // end: tokens the tile reads (its last row's limit + 1)
  int rows;
};

at::Tensor attention(const at::Tensor& q, const at::Tensor& qs, const at::Tensor& kv_cache,
                     const at::Tensor& block_table, const at::Tensor& query_start_loc,
                     const at::Tensor& seq_lens, const at::Tensor& key_centroids,
                     const at::Tensor& value_centroids, at::IntArrayRef layout, double qjl_coef,
                     int64_t rows_per_tile, int64_t num_splits,
                     const std::optional<at::Tensor>& outlier_centroids,
                     at::IntArrayRef outliers) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "q must be a contiguous float32 [T, Hq, d] tensor");
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.scalar_type() == at::kByte &&
                  kv_cache.is_contiguous(),
              "kv_cache must be a contiguous uint8 [num_blocks, Hk, block_size, C] tensor");
  TORCH_CHECK(block_table.dim() == 2 && block_table.scalar_type() == at::kInt &&
                  block_table.stride(1) == 1,
              "block_table must be int32 [B, max_blocks] with unit column stride");
  TORCH_CHECK(query_start_loc.scalar_type() == at::kInt && query_start_loc.is_contiguous() &&
                  seq_lens.scalar_type() == at::kInt && seq_lens.is_contiguous(),
              "query_start_loc and seq_lens must be contiguous int32");
  TORCH_CHECK(layout.size() == 7, "layout must hold 7 integers");
  TORCH_CHECK(rows_per_tile >= 1 && num_splits >= 0, "rows_per_tile >= 1, num_splits >= 0");
  const int64_t batch = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.size(0) == batch + 1 && block_table.size(0) == batch,
              "query_start_loc needs B + 1 entries and block_table B rows");
  Problem P;
  P.d = static_cast<int>(q.size(2));
  P.hq = static_cast<int>(q.size(1));
  P.hk = kv_cache.size(1);
  TORCH_CHECK(P.hq % P.hk == 0, "query heads must be a multiple of KV heads");
  P.g = static_cast<int>(P.hq / P.hk);
  P.lay = Layout{static_cast<int>(layout[0]), layout[1] != 0, static_cast<int>(layout[2]),
                 static_cast<int>(layout[3]), static_cast<int>(layout[4]),
                 static_cast<int>(layout[5]), static_cast<int>(layout[6]),
                 static_cast<float>(qjl_coef)};
  TORCH_CHECK(P.lay.key_bits >= 0 && P.lay.key_bits <= 8 && P.lay.value_bits >= 1 &&
                  P.lay.value_bits <= 8,
              "key bits 0..8 and value bits 1..8");
  TORCH_CHECK(key_centroids.scalar_type() == at::kFloat && key_centroids.is_contiguous() &&
                  key_centroids.numel() >= (int64_t{1} << P.lay.key_bits) &&
                  value_centroids.scalar_type() == at::kFloat &&
                  value_centroids.is_contiguous() &&
                  value_centroids.numel() >= (int64_t{1} << P.lay.value_bits),
              "centroids must be contiguous float32 with 2^bits entries");
  TORCH_CHECK(!P.lay.prod || (qs.sizes() == q.sizes() && qs.scalar_type() == at::kFloat &&
                              qs.is_contiguous()),
              "prod mode needs qs shaped like q, contiguous float32");
  P.q = q.data_ptr<float>();
  P.qs = P.lay.prod ? qs.data_ptr<float>() : nullptr;
  P.cache = kv_cache.data_ptr<uint8_t>();
  P.num_blocks = kv_cache.size(0);
  P.block_size = kv_cache.size(2);
  P.record = kv_cache.size(3);
  P.table = block_table.data_ptr<int32_t>();
  P.table_stride = block_table.stride(0);
  P.kc = key_centroids.data_ptr<float>();
  P.vc = value_centroids.data_ptr<float>();
  P.outliers = outlier_part(outliers, outlier_centroids, P.d, P.record);
  TORCH_CHECK(!P.outliers.count || (!P.lay.prod && P.lay.key_bits > 0),
              "split keys are Lloyd-Max (mse) keys");

  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  std::vector<RowTile> tiles;
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t lo = qsl[b], hi = qsl[b + 1], len = lens[b];
    TORCH_CHECK(hi >= lo && hi <= q.size(0) && len >= hi - lo,
                "sequence ", b, ": bad query_start_loc or seq_len");
    TORCH_CHECK((len + P.block_size - 1) / P.block_size <= block_table.size(1),
                "sequence ", b, " has more blocks than block_table columns");
    for (int64_t row = lo; row < hi; row += rows_per_tile) {
      const int rows = static_cast<int>(std::min<int64_t>(rows_per_tile, hi - row));
      const int64_t lim0 = len - (hi - lo) + (row - lo);  // first row's last visible token
      tiles.push_back(RowTile{b, row, lim0, lim0 + rows, rows});
      longest = std::max(longest, lim0 + rows);
    }
  }
  auto out = at::empty_like(q);
  const int64_t units = static_cast<int64_t>(tiles.size()) * P.hk;
  if (units == 0) return out;
  if (num_splits == 0) {  // about 4 items per thread, splits no shorter than 256 tokens
    const int64_t want = (4 * at::get_num_threads() + units - 1) / units;
    num_splits = std::max<int64_t>(1, std::min(want, (longest + 255) / 256));
  }
  float* o = out.data_ptr<float>();
  const int64_t hq = P.hq, d = P.d, g = P.g, rpt = rows_per_tile;
  if (num_splits == 1) {
    at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
      for (int64_t pos = begin; pos < end; ++pos) {
        const int64_t i = interleaved(pos, units);
        const RowTile& tile = tiles[i / P.hk];
        const int64_t h = i % P.hk;
        attend_item(P, tile.b, tile.row0, tile.rows, tile.lim0, h, 0, tile.end,
                    o + (tile.row0 * hq + h * g) * d, hq * d, nullptr);
      }
    });
    return out;
  }
  // Split items write [rows_per_tile, g, d] partials and their lse; a second pass merges.
  const int64_t ns = num_splits, unit_rows = rpt * g;
  std::vector<float> part(static_cast<size_t>(units * ns * unit_rows * d));
  std::vector<float> lse(static_cast<size_t>(units * ns * unit_rows));
  at::parallel_for(0, units * ns, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pos = begin; pos < end; ++pos) {
      const int64_t i = interleaved(pos, units * ns);
      const int64_t unit = i / ns, split = i % ns;
      const RowTile& tile = tiles[unit / P.hk];
      const int64_t per = (tile.end + ns - 1) / ns;
      const int64_t t0 = std::min(split * per, tile.end), t1 = std::min(t0 + per, tile.end);
      attend_item(P, tile.b, tile.row0, tile.rows, tile.lim0, unit % P.hk, t0, t1,
                  &part[i * unit_rows * d], g * d, &lse[i * unit_rows]);
    }
  });
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    for (int64_t unit = begin; unit < end; ++unit) {
      const RowTile& tile = tiles[unit / P.hk];
      const int64_t h = unit % P.hk;
      for (int64_t r = 0; r < tile.rows * g; ++r) {
        float top = NEG_INF;
        for (int64_t s = 0; s < ns; ++s) top = std::max(top, lse[(unit * ns + s) * unit_rows + r]);
        float* dst = o + ((tile.row0 + r / g) * hq + h * g + r % g) * d;
        std::fill(dst, dst + d, 0.f);
        if (top == NEG_INF) continue;  // no tokens at all
        float total = 0.f;
        for (int64_t s = 0; s < ns; ++s) {
          const int64_t item = unit * ns + s;
          const float w = std::exp(lse[item * unit_rows + r] - top);
          total += w;
          const float* src = &part[(item * unit_rows + r) * d];
          for (int64_t j = 0; j < d; ++j) dst[j] += w * src[j];
        }
        for (int64_t j = 0; j < d; ++j) dst[j] /= total;
      }
    }
  });
  return out;
}

// -- store: quantize a step's keys and values and pack them into their records -------------
// The records must be the bytes store_kv_reference writes. Everything rounding could change
// (the matrix products, and the norms, which ATen reduces in an order of its own) comes from
// the ATen calls the reference makes, on tensors of the same shapes; the steps between them
// are single IEEE operations done here in the reference's order. The reference's many small
// ops (packing, record assembly, the scatter) were what cost the time.

// to_fp16_norm: a non-finite norm becomes 0, a larger one 65504; then round to nearest even.
inline void store_fp16_norm(uint8_t* p, float n) {
  if (!std::isfinite(n)) n = 0.f;
  if (n > 65504.f) n = 65504.f;
  const uint16_t bits = c10::Half(n).x;
  std::memcpy(p, &bits, 2);
}

// torch.bucketize (right=False) of u [n] over the 2^bits - 1 sorted boundaries: idx = the
// number of boundaries b with !(b >= u), by a binary search one step at a time over the whole
// row, so each step vectorizes (a search per coordinate is a chain of dependent loads and
// cost ~10x more). A NaN u compares false everywhere and gets the last index, as in ATen.
inline void bucketize(const float* bnd, int bits, const float* u, int64_t n, int32_t* idx) {
#ifdef TQ_AVX512
  if (n % 16 == 0) {  // hardware gathers; _CMP_NGE_UQ is !(b >= u), NaN included
    for (int64_t j = 0; j < n; j += 16) _mm512_storeu_si512(idx + j, _mm512_setzero_si512());
    for (int s = bits - 1; s >= 0; --s) {  // steps outermost: the gathers of a step overlap
      for (int64_t j = 0; j < n; j += 16) {
        const __m512i i = _mm512_loadu_si512(idx + j);
        const __m512i cand = _mm512_add_epi32(i, _mm512_set1_epi32(1 << s));
        const __m512 b = _mm512_i32gather_ps(_mm512_sub_epi32(cand, _mm512_set1_epi32(1)), bnd, 4);
        const __mmask16 lower = _mm512_cmp_ps_mask(b, _mm512_loadu_ps(u + j), _CMP_NGE_UQ);
        _mm512_storeu_si512(idx + j, _mm512_mask_blend_epi32(lower, i, cand));
      }
    }
    return;
  }
#endif
  for (int64_t j = 0; j < n; ++j) idx[j] = 0;
  for (int s = bits - 1; s >= 0; --s) {
    for (int64_t j = 0; j < n; ++j) {
      const int32_t cand = idx[j] + (1 << s);
      idx[j] = !(bnd[cand - 1] >= u[j]) ? cand : idx[j];
    }
  }
}

// packing.py: index j at bits [j*bits, (j+1)*bits), LSB first; the last byte's spare high
// bits are zero. Every byte of the field is written.
inline void pack_indices(const int32_t* idx, int64_t n, int bits, uint8_t* out) {
  uint64_t acc = 0;
  int filled = 0;
  for (int64_t j = 0; j < n; ++j) {
    acc |= static_cast<uint64_t>(idx[j]) << filled;
    filled += bits;
    while (filled >= 8) {
      *out++ = static_cast<uint8_t>(acc & 0xFF);
      acc >>= 8;
      filled -= 8;
    }
  }
  if (filled > 0) *out = static_cast<uint8_t>(acc & 0xFF);
}

// y - n * c rounded twice, as the reference's two tensor ops: a fused multiply-add would
// change the residual's last bits, and so its signs and norm.
__attribute__((noinline, optimize("fp-contract=off"))) void residual_row(
    const float* y, const float* c, float n, int64_t d, float* r) {
  for (int64_t j = 0; j < d; ++j) {
    const float t = n * c[j];
    r[j] = y[j] - t;
  }
}

struct StoreTarget {
  uint8_t* cache;
  const int64_t* slots;
  int64_t heads, block_size, sb, sh, ss;
  uint8_t* record(int64_t row) const {
    const int64_t slot = slots[row / heads];
    return cache + (slot / block_size) * sb + (row % heads) * sh + (slot % block_size) * ss;
  }
};

// Rows of x [T, H, d] rotated, indexed and packed at idx_off; returns what the norms need:
// (x as float, y, centroids at the indices), and the indices in idx.
std::tuple<at::Tensor, at::Tensor, at::Tensor> index_rows(
    const at::Tensor& x_in, const at::Tensor& rotation, const at::Tensor& centroids,
    const at::Tensor& boundaries, int bits, int64_t idx_off, const StoreTarget& target,
    std::vector<int32_t>& idx) {
  at::Tensor x = x_in.to(at::kFloat);                    // the reference's x.float()
  at::Tensor y = at::matmul(x, rotation.t()).contiguous();  // x @ R^T
  at::Tensor ynorm = at::linalg_vector_norm(y, 2, {-1}, false, std::nullopt).contiguous();
  const int64_t rows = y.size(0) * y.size(1), d = y.size(2);
  at::Tensor c = at::empty_like(y);
  idx.resize(rows * d);
  const float* yp = y.data_ptr<float>();
  const float* yn = ynorm.data_ptr<float>();
  const float* cent = centroids.data_ptr<float>();
  const float* bnd = boundaries.data_ptr<float>();
  TORCH_CHECK(boundaries.numel() == (int64_t{1} << bits) - 1, "store: boundaries need 2^bits - 1 entries");
  float* cp = c.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> u(d);
    for (int64_t row = begin; row < end; ++row) {
      float n = yn[row];
      if (n < 1e-30f) n = 1e-30f;  // clamp_min(1e-30), which keeps a NaN
      int32_t* ri = &idx[row * d];
      for (int64_t j = 0; j < d; ++j) u[j] = yp[row * d + j] / n;
      bucketize(bnd, bits, u.data(), d, ri);
      for (int64_t j = 0; j < d; ++j) cp[row * d + j] = cent[ri[j]];
      if (bits > 0) pack_indices(ri, d, bits, target.record(row) + idx_off);
    }
  });
  return {x, y, c};
}

// mse mode: the stored norm is ||x|| / ||c[idx]|| (quantizer._code_norms).
void store_mse_norms(const at::Tensor& x, const at::Tensor& c, int64_t norm_off,
                     const StoreTarget& target) {
  at::Tensor xnorm = at::linalg_vector_norm(x, 2, {-1}, false, std::nullopt).contiguous();
  at::Tensor cnorm = at::linalg_vector_norm(c, 2, {-1}, false, std::nullopt).contiguous();
  const float* xn = xnorm.data_ptr<float>();
  const float* cn = cnorm.data_ptr<float>();
  for (int64_t row = 0; row < xnorm.numel(); ++row) {
    store_fp16_norm(target.record(row) + norm_off, xn[row] / (cn[row] > 0 ? cn[row] : 1.f));
  }
}

void store(const at::Tensor& key_in, const at::Tensor& value_in, at::Tensor kv_cache,
           const at::Tensor& slot_mapping, const at::Tensor& rotation,
           const at::Tensor& key_centroids, const at::Tensor& key_boundaries,
           const std::optional<at::Tensor>& qjl, const at::Tensor& value_centroids,
           const at::Tensor& value_boundaries, at::IntArrayRef layout) {
  TORCH_CHECK(layout.size() == 8, "store: layout needs 8 entries");
  const int key_bits = static_cast<int>(layout[0]), value_bits = static_cast<int>(layout[2]);
  const bool prod = layout[1] != 0;
  const int64_t value_norm = layout[3], key_indices = layout[4], key_signs = layout[5],
                value_indices = layout[6], key_residual_norm = layout[7];
  at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  at::Tensor key = key_in, value = value_in;
  // Tokens with a negative slot (vLLM's padding) are dropped as the reference drops them, so
  // that the matrix products run on the same rows and round the same way.
  std::vector<int64_t> keep;
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < slots.numel(); ++t) {
    if (sp[t] >= 0) keep.push_back(t);
  }
  if (static_cast<int64_t>(keep.size()) < slots.numel()) {
    if (keep.empty()) return;
    const at::Tensor rows = at::tensor(keep, at::kLong);
    key = key.index_select(0, rows);
    value = value.index_select(0, rows);
    slots = slots.index_select(0, rows);
  }
  const StoreTarget target{kv_cache.data_ptr<uint8_t>(), slots.data_ptr<int64_t>(),
                           kv_cache.size(1),  kv_cache.size(2),
                           kv_cache.stride(0), kv_cache.stride(1),
                           kv_cache.stride(2)};
  std::vector<int32_t> idx;
  auto [vx, vy, vc] = index_rows(value, rotation, value_centroids, value_boundaries, value_bits,
                                 value_indices, target, idx);
  store_mse_norms(vx, vc, value_norm, target);
  auto [kx, ky, kc] = index_rows(key, rotation, key_centroids, key_boundaries, key_bits,
                                 key_indices, target, idx);
  if (!prod) {
    store_mse_norms(kx, kc, 0, target);
    return;
  }
  // prod: the stored norm is ||x||; the residual of that (rounded) norm keeps QJL signs.
  TORCH_CHECK(qjl.has_value(), "store: prod mode needs the QJL matrix");
  at::Tensor xnorm = at::linalg_vector_norm(kx, 2, {-1}, false, std::nullopt).contiguous();
  const float* xn = xnorm.data_ptr<float>();
  const int64_t rows = xnorm.numel(), d = ky.size(2);
  at::Tensor residual = at::empty_like(ky);
  const float* yp = ky.data_ptr<float>();
  const float* cp = kc.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  for (int64_t row = 0; row < rows; ++row) {
    uint8_t* rec = target.record(row);
    store_fp16_norm(rec, xn[row]);
    uint16_t bits;
    std::memcpy(&bits, rec, 2);
    const float n = static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
    residual_row(yp + row * d, cp + row * d, n, d, rp + row * d);
  }
  at::Tensor proj = at::matmul(residual, qjl->t()).contiguous();  // residual @ S^T
  at::Tensor rnorm = at::linalg_vector_norm(residual, 2, {-1}, false, std::nullopt).contiguous();
  const float* pp = proj.data_ptr<float>();
  const float* rn = rnorm.data_ptr<float>();
  for (int64_t row = 0; row < rows; ++row) {
    uint8_t* rec = target.record(row);
    store_fp16_norm(rec + key_residual_norm, rn[row]);
    int32_t* signs = &idx[row * d];  // the key indices are packed already: reuse the buffer
    for (int64_t j = 0; j < d; ++j) signs[j] = pp[row * d + j] >= 0;
    pack_indices(signs, d, 1, rec + key_signs);
  }
}

// -- dequantize: one sequence's cached tokens as dense rotated keys and values -------------
// For chunked prefill on bf16 models: the caller attends over the result with a dense kernel
// (oneDNN, AMX where the CPU has it), far faster per score than the fused float32 loop once
// a chunk has more than a few rows. Lloyd-Max values are norm * c[idx] in float32; uniform
// values (value_mode "uniform", unrotated) are zero + scale * idx, two roundings as in
// uniform.py; either is then rounded once to the output dtype. Split keys (outliers.py) are
// two Lloyd-Max parts with their own norms and centroids, written side by side: the regular
// channels first, then the outlier channels.

// dst[:n] = scale * src[:n] (+ shift, where shifted) in T, rounded twice as uniform.py does
// (no fused multiply-add).
#define TQ_NO_FMA __attribute__((noinline, optimize("fp-contract=off")))
template <typename T>
TQ_NO_FMA void write_scaled(const float* src, float scale, float shift, bool shifted, int n,
                            T* dst) {
  for (int j = 0; j < n; ++j) {
    const float product = scale * src[j];
    dst[j] = static_cast<T>(shifted ? shift + product : product);
  }
}
#if defined(TQ_AVX512) && defined(__AVX512BF16__)
template <>
TQ_NO_FMA void write_scaled<c10::BFloat16>(const float* src, float scale, float shift,
                                           bool shifted, int n, c10::BFloat16* dst) {
  int j = 0;
  for (; j + 16 <= n; j += 16) {  // round to nearest even, as c10::BFloat16 does
    __m512 x = _mm512_mul_ps(_mm512_set1_ps(scale), _mm512_loadu_ps(src + j));
    if (shifted) x = _mm512_add_ps(_mm512_set1_ps(shift), x);
    const __m256bh h = _mm512_cvtneps_pbh(x);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), reinterpret_cast<const __m256i&>(h));
  }
  for (; j < n; ++j) {
    const float product = scale * src[j];
    dst[j] = static_cast<c10::BFloat16>(shifted ? shift + product : product);
  }
}
#endif

template <typename T>
void dequantize_into(const uint8_t* cache, int64_t hk, int64_t block_size, int64_t record,
                     int64_t num_blocks, const int32_t* blocks, int64_t length, int d,
                     const Layout& L, int64_t value_zero, const float* kc, const float* vc,
                     const OutlierPart& O, T* out) {
  const int64_t nb = (length + block_size - 1) / block_size;
  const int regular = d - O.count;
  const RowDecoder decode_k(kc, L.key_bits, regular), decode_v(vc, L.value_bits, d);
  const RowDecoder decode_o(O.count ? O.centroids : kc, O.count ? O.bits : 1, O.count);
  const bool uniform = value_zero >= 0;
  T* keys = out;
  T* values = out + hk * length * d;
  at::parallel_for(0, hk * nb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(d);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / nb, i = item % nb, block = blocks[i];
      TORCH_CHECK(block >= 0 && block < num_blocks, "block_table entry ", block,
                  " out of range for a cache of ", num_blocks, " blocks");
      const uint8_t* rec = cache + (block * hk + h) * block_size * record;
      const int64_t t0 = i * block_size, t1 = std::min(length, t0 + block_size);
      for (int64_t t = t0; t < t1; ++t, rec += record) {
        const int64_t at = (h * length + t) * d;
        decode_k(rec + L.key_indices, row.data());
        write_scaled(row.data(), load_half(rec), 0.f, false, regular, keys + at);
        if (O.count) {
          decode_o(rec + O.indices, row.data());
          write_scaled(row.data(), load_half(rec + O.norm), 0.f, false, O.count,
                       keys + at + regular);
        }
        decode_v(rec + L.value_indices, row.data());
        const float zero = uniform ? load_half(rec + value_zero) : 0.f;
        write_scaled(row.data(), load_half(rec + L.value_norm), zero, uniform, d, values + at);
      }
    }
  });
}

// value_zero: byte offset of the uniform values' fp16 zero point (their scale sits at
// layout's value_norm and value_centroids must be 0, 1, ..., 2^b - 1), or -1 for Lloyd-Max.
// outliers: [] for plain keys, or [count, bits, norm offset, indices offset] of split keys'
// outlier part (outlier_centroids its 2^bits centroids); key_centroids are then the regular
// part's, whose head_dim - count indices sit at layout's key_indices.
at::Tensor dequantize(const at::Tensor& kv_cache, const at::Tensor& blocks, int64_t length,
                      const at::Tensor& key_centroids, const at::Tensor& value_centroids,
                      at::IntArrayRef layout, int64_t value_zero, int64_t head_dim,
                      at::ScalarType dtype, const std::optional<at::Tensor>& outlier_centroids,
                      at::IntArrayRef outliers) {
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.scalar_type() == at::kByte &&
                  kv_cache.is_contiguous(),
              "kv_cache must be a contiguous uint8 [num_blocks, Hk, block_size, C] tensor");
  TORCH_CHECK(layout.size() == 7 && layout[1] == 0 && layout[0] >= 1 && layout[0] <= 8 &&
                  layout[2] >= 1 && layout[2] <= 8,
              "dequantize reads mse keys and values of 1..8 bits (layout of 7 integers)");
  const int64_t block_size = kv_cache.size(2), hk = kv_cache.size(1);
  TORCH_CHECK(value_zero < kv_cache.size(3), "value_zero past the record");
  TORCH_CHECK(length >= 0 && blocks.dim() == 1 && blocks.scalar_type() == at::kInt &&
                  blocks.is_contiguous() &&
                  blocks.size(0) >= (length + block_size - 1) / block_size,
              "blocks must be contiguous int32 with an entry for each block of the sequence");
  TORCH_CHECK(key_centroids.scalar_type() == at::kFloat && key_centroids.is_contiguous() &&
                  key_centroids.numel() >= (int64_t{1} << layout[0]) &&
                  value_centroids.scalar_type() == at::kFloat &&
                  value_centroids.is_contiguous() &&
                  value_centroids.numel() >= (int64_t{1} << layout[2]),
              "centroids must be contiguous float32 with 2^bits entries");
  const Layout L{static_cast<int>(layout[0]), false, static_cast<int>(layout[2]),
                 static_cast<int>(layout[3]), static_cast<int>(layout[4]),
                 static_cast<int>(layout[5]), static_cast<int>(layout[6]), 0.f};
  const int d = static_cast<int>(head_dim);
  const OutlierPart O = outlier_part(outliers, outlier_centroids, head_dim, kv_cache.size(3));
  auto out = at::empty({2, hk, length, head_dim}, kv_cache.options().dtype(dtype));
  auto run = [&](auto* dst) {
    dequantize_into(kv_cache.data_ptr<uint8_t>(), hk, block_size, kv_cache.size(3),
                    kv_cache.size(0), blocks.data_ptr<int32_t>(), length, d, L, value_zero,
                    key_centroids.data_ptr<float>(), value_centroids.data_ptr<float>(), O, dst);
  };
  switch (dtype) {
    case at::kFloat: run(out.data_ptr<float>()); break;
    case at::kBFloat16: run(out.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: run(out.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "dequantize writes float32, bfloat16 or float16");
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(tq_vllm_cpu, m) {
  m.def(
      "attention(Tensor q, Tensor qs, Tensor kv_cache, Tensor block_table, "
      "Tensor query_start_loc, Tensor seq_lens, Tensor key_centroids, Tensor value_centroids, "
      "int[] layout, float qjl_coef, int rows_per_tile, int num_splits, "
      "Tensor? outlier_centroids=None, int[] outliers=[]) -> Tensor");
  m.def(
      "store(Tensor key, Tensor value, Tensor(a!) kv_cache, Tensor slot_mapping, "
      "Tensor rotation, Tensor key_centroids, Tensor key_boundaries, Tensor? qjl, "
      "Tensor value_centroids, Tensor value_boundaries, int[] layout) -> ()");
  m.def(
      "dequantize(Tensor kv_cache, Tensor blocks, int length, Tensor key_centroids, "
      "Tensor value_centroids, int[] layout, int value_zero, int head_dim, ScalarType dtype, "
      "Tensor? outlier_centroids=None, int[] outliers=[]) -> Tensor");
}

TORCH_LIBRARY_IMPL(tq_vllm_cpu, CPU, m) {
  m.impl("attention", &attention);
  m.impl("store", &store);
  m.impl("dequantize", &dequantize);
}
