// One rotated unit row to its packed indices and centroids, for the store (store.cpp):
// torch.bucketize's search, the bit packing of tq_vllm/record/packing.py, and RowIndexer, which
// does both per ISA.
#pragma once

#include "../csrc/row_decoder.h"

namespace tq {

// torch.bucketize (right=False) of u [n] over the 2^bits - 1 sorted boundaries: idx = the
// number of boundaries b with !(b >= u), by a binary search one step at a time over the whole
// row, so each step vectorizes (a search per coordinate is a chain of dependent loads and
// cost ~10x more). A NaN u compares false everywhere and gets the last index, as in ATen.
// (RowIndexer runs the same search in registers where it can.)
inline void bucketize(const float* bnd, int bits, const float* u, int64_t n, int32_t* idx) {
#ifdef TQ_AVX2
  if (n % 8 == 0) {  // hardware gathers; _CMP_NGE_UQ is !(b >= u), NaN included
    for (int64_t j = 0; j < n; j += 8)
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + j), _mm256_setzero_si256());
    for (int s = bits - 1; s >= 0; --s) {  // steps outermost: the gathers of a step overlap
      for (int64_t j = 0; j < n; j += 8) {
        __m256i* at = reinterpret_cast<__m256i*>(idx + j);
        const __m256i i = _mm256_loadu_si256(at);
        const __m256i cand = _mm256_add_epi32(i, _mm256_set1_epi32(1 << s));
        const __m256 b = _mm256_i32gather_ps(bnd, _mm256_sub_epi32(cand, _mm256_set1_epi32(1)), 4);
        const __m256 lower = _mm256_cmp_ps(b, _mm256_loadu_ps(u + j), _CMP_NGE_UQ);
        _mm256_storeu_si256(at, _mm256_blendv_epi8(i, cand, _mm256_castps_si256(lower)));
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

// tq_vllm/record/packing.py: index j at bits [j*bits, (j+1)*bits), LSB first; the last byte's spare high
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

// One rotated unit row u [n] to its b-bit indices (bucketize), their packed bytes in the
// record (pack_indices) and its centroids c[idx]. Where the row allows, whole groups of 8
// indices are packed by multiply-adds (pairs, then fours, then eights, as the bit stream
// concatenates them) and the centroids are read back from the packed bytes by RowDecoder, as
// the attention reads them; the search keeps the boundaries in registers (up to 6 bits)
// instead of gathering them. The scalar packing loop, the per-coordinate lookup and the
// gathers were most of the store's own time.
class RowIndexer {
 public:
  RowIndexer(const float* bnd, const float* cent, int bits, int n)
      : bnd_(bnd), cent_(cent), bits_(bits), n_(n) {
    if (bits > 0) decoder_.emplace(cent, bits, n);
#if defined(TQ_AVX512) || defined(TQ_AVX2)
    alignas(64) float table[64];  // 2^bits - 1 boundaries (up to 6 bits); the rest is never read
    for (int i = 0; i < 64; ++i)
      table[i] = i < (1 << bits) - 1 ? bnd[i] : std::numeric_limits<float>::infinity();
#endif
#ifdef TQ_AVX512
    fast_ = bits >= 1 && bits <= 6 && n % 16 == 0;
    if (!fast_) return;
    for (int k = 0; k < 4; ++k) t_[k] = _mm512_load_ps(table + 16 * k);
    alignas(64) uint8_t compact[64] = {};  // byte k of the packed chunk: group k / b, byte k % b
    for (int k = 0; k < 8 * bits; ++k) compact[k] = static_cast<uint8_t>(8 * (k / bits) + k % bits);
    compact_ = _mm512_load_si512(compact);
#elif defined(TQ_AVX2)
    fast_ = bits >= 1 && bits <= 6 && n % 32 == 0 && n <= 256;  // pack_row's buffer
    for (int k = 0; k < 8; ++k) t_[k] = _mm256_load_ps(table + 8 * k);
    alignas(32) uint8_t compact[32];  // per 128-bit lane: its two groups' 2b bytes first
    for (int k = 0; k < 16; ++k)
      compact[k] = compact[16 + k] =
          k < 2 * bits ? static_cast<uint8_t>(8 * (k / bits) + k % bits) : 0x80;
    compact_ = _mm256_load_si256(reinterpret_cast<const __m256i*>(compact));
#endif
  }

  // idx: scratch for n indices (their values are left there only on the portable path).
  void operator()(const float* u, int32_t* idx, uint8_t* packed, float* c) const {
#if defined(TQ_AVX512) || defined(TQ_AVX2)
    if (fast_) {
      switch (bits_) {
        case 1: pack_row<1>(u, packed); break;
        case 2: pack_row<2>(u, packed); break;
        case 3: pack_row<3>(u, packed); break;
        case 4: pack_row<4>(u, packed); break;
        case 5: pack_row<5>(u, packed); break;
        default: pack_row<6>(u, packed); break;
      }
      (*decoder_)(packed, c);
      return;
    }
#endif
    bucketize(bnd_, bits_, u, n_, idx);
    for (int j = 0; j < n_; ++j) c[j] = cent_[idx[j]];
    if (bits_ > 0) pack_indices(idx, n_, bits_, packed);
  }

 private:
#if defined(TQ_AVX512) || defined(TQ_AVX2)
  // Lanes of 8 indices (bytes) per 64 bits, LSB first: lane = the group's B bytes.
  template <int B, class V>
  static V pack_groups(V bytes) {
    constexpr int16_t pair = static_cast<int16_t>(1 | (1 << B) << 8);  // idx0 + idx1 * 2^B
    constexpr int16_t four = static_cast<int16_t>(1 << 2 * B);         // pair0 + pair1 * 2^2B
#ifdef TQ_AVX512
    const V pairs = _mm512_maddubs_epi16(bytes, _mm512_set1_epi16(pair));
    const V fours = _mm512_madd_epi16(pairs, _mm512_set1_epi32(1 | four << 16));
    return _mm512_or_si512(_mm512_and_si512(fours, _mm512_set1_epi64(0xFFFFFFFF)),
                           _mm512_slli_epi64(_mm512_srli_epi64(fours, 32), 4 * B));
#else
    const V pairs = _mm256_maddubs_epi16(bytes, _mm256_set1_epi16(pair));
    const V fours = _mm256_madd_epi16(pairs, _mm256_set1_epi32(1 | four << 16));
    return _mm256_or_si256(_mm256_and_si256(fours, _mm256_set1_epi64x(0xFFFFFFFF)),
                           _mm256_slli_epi64(_mm256_srli_epi64(fours, 32), 4 * B));
#endif
  }
#endif

#ifdef TQ_AVX512
  // bucketize's search for 16 coordinates, the boundaries in registers.
  template <int B>
  __m512i search(__m512 u) const {
    __m512i i = _mm512_setzero_si512();
#pragma GCC unroll 8
    for (int s = B - 1; s >= 0; --s) {
      const __m512i cand = _mm512_add_epi32(i, _mm512_set1_epi32(1 << s));
      const __m512 b = table_lookup<B>(t_, _mm512_sub_epi32(cand, _mm512_set1_epi32(1)), bnd_);
      i = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(b, u, _CMP_NGE_UQ), i, cand);
    }
    return i;
  }

  template <int B>
  void pack_row(const float* u, uint8_t* packed) const {
    for (int c0 = 0; c0 < n_; c0 += 64) {
      const int m = std::min(64, n_ - c0);  // a multiple of 16
      __m128i bytes[4] = {};
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v)
        if (16 * v < m) bytes[v] = _mm512_cvtepi32_epi8(search<B>(_mm512_loadu_ps(u + c0 + 16 * v)));
      __m512i all = _mm512_castsi128_si512(bytes[0]);
      all = _mm512_inserti32x4(all, bytes[1], 1);
      all = _mm512_inserti32x4(all, bytes[2], 2);
      all = _mm512_inserti32x4(all, bytes[3], 3);
      const int len = m * B / 8;
      const __mmask64 keep = len == 64 ? ~__mmask64{0} : (__mmask64{1} << len) - 1;
      _mm512_mask_storeu_epi8(packed + c0 * B / 8, keep,
                              _mm512_permutexvar_epi8(compact_, pack_groups<B>(all)));
    }
  }
  __m512 t_[4];
  __m512i compact_;
#elif defined(TQ_AVX2)
  // 32 coordinates a step, 4 vectors' searches interleaved; the boundaries by table_pick's
  // permutes and blends (gathers are slow on AMD before Zen 4 and on Intel parts with the GDS
  // microcode fix, RowDecoder::chosen_lookups).
  template <int B>
  void pack_row(const float* u, uint8_t* packed) const {
    alignas(32) uint8_t out[256 * 6 / 8 + 16];  // n * B / 8 bytes, and a step's spill
    for (int c0 = 0; c0 < n_; c0 += 32) {
      __m256i i[4];
      __m256 x[4];
#pragma GCC unroll 4
      for (int v = 0; v < 4; ++v) i[v] = _mm256_setzero_si256(), x[v] = _mm256_loadu_ps(u + c0 + 8 * v);
#pragma GCC unroll 8
      for (int s = B - 1; s >= 0; --s)
#pragma GCC unroll 4
        for (int v = 0; v < 4; ++v) {
          const __m256i cand = _mm256_add_epi32(i[v], _mm256_set1_epi32(1 << s));
          const __m256 b = table_pick<B>(t_, _mm256_sub_epi32(cand, _mm256_set1_epi32(1)), 0);
          const __m256 lower = _mm256_cmp_ps(b, x[v], _CMP_NGE_UQ);
          i[v] = _mm256_blendv_epi8(i[v], cand, _mm256_castps_si256(lower));
        }
      // int32 -> bytes in order: the packs interleave 128-bit lanes, the permute undoes it.
      const __m256i bytes = _mm256_permutevar8x32_epi32(
          _mm256_packus_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3])),
          _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      const __m256i lanes = _mm256_shuffle_epi8(pack_groups<B>(bytes), compact_);
      uint8_t* o = out + c0 * B / 8;  // each lane's 2B bytes; the next step overwrites the rest
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o), _mm256_castsi256_si128(lanes));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(o + 2 * B), _mm256_extracti128_si256(lanes, 1));
    }
    std::memcpy(packed, out, n_ * B / 8);
  }
  __m256 t_[8];
  __m256i compact_;
#endif
  const float* bnd_;
  const float* cent_;
  int bits_, n_;
  bool fast_ = false;
  std::optional<RowDecoder> decoder_;
};

}  // namespace tq
