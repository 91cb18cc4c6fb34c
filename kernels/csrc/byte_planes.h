// The AVX2 byte-plane codebook lookup of RowDecoder (row_decoder.h) at 4-6 bits: rows of
// packed indices unpacked 32 at a time and looked up by vpshufb in 16-entry tables of the
// centroids' bytes, in the natural order or (bf16-exact codebooks) transposed.
#pragma once

#include "records.h"

namespace tq {

// How many steps of `step` bytes, from byte 0 of a field of `field` bytes, can each read
// `reach` bytes without passing its end (0 when even the first cannot).
inline int whole_loads(int field, int reach, int step) {
  return field < reach ? 0 : (field - reach) / step + 1;
}

#ifdef TQ_AVX2
class BytePlanes {
 public:
  BytePlanes() = default;
  // table: 64 floats, the codebook's 2^bits entries first; rows of n indices, n % 32 == 0.
  BytePlanes(const float* table, int bits, int n) : n_(n) {
    // Byte plane P of the centroids 16s .. 16s + 15 in planes_[P][s], XORed with the plane of
    // the 16 before them (s > 0); per 16-bit lane k of a 128-bit half, the two bytes holding index k (unpack_lo_) or
    // k + 8 (unpack_hi_) and the power of two that moves its first bit to bit 8.
    uint8_t bytes[64][4];
    std::memcpy(bytes, table, sizeof(bytes));
    alignas(32) uint8_t plane[32], lo[32], hi[32];
    for (int P = 0; P < 4; ++P)
      for (int s = 0; s < 4; ++s) {
        for (int j = 0; j < 32; ++j)
          plane[j] = bytes[16 * s + j % 16][P] ^ (s ? bytes[16 * s - 16 + j % 16][P] : 0);
        planes_[P][s] = _mm256_load_si256(reinterpret_cast<const __m256i*>(plane));
      }
    alignas(32) int16_t mul[16];
    for (int j = 0; j < 16; ++j) {
      const int k = j % 8, first = k * bits / 8, second = (k + 8) * bits / 8;
      lo[2 * j] = static_cast<uint8_t>(first);
      lo[2 * j + 1] = static_cast<uint8_t>(std::min(first + 1, 15));
      hi[2 * j] = static_cast<uint8_t>(second);
      hi[2 * j + 1] = static_cast<uint8_t>(std::min(second + 1, 15));
      mul[j] = static_cast<int16_t>(1 << (8 - k * bits % 8));
    }
    unpack_lo_ = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo));
    unpack_hi_ = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi));
    unpack_mul_ = _mm256_load_si256(reinterpret_cast<const __m256i*>(mul));
  }

  // 32 indices (4 groups, 4B bytes) at a time, 16 per 128-bit half: vpshufb puts the two
  // bytes holding each index in a 16-bit lane, a multiply by a power of two shifts its bits
  // to the high byte, a pack gathers them (4 bits: one vpshufb and masks). Then each of the
  // float's four bytes is looked up by vpshufb in 2^(B - 4) 16-entry tables, and the four byte
  // planes are interleaved back into floats. Two thirds or less of the time of the blend tree
  // (RowDecoder::pick) at 5-6 bits here (Zen 4), and as exact. FOLD (a symmetric codebook,
  // 5-6 bits): as RowDecoder::folded_pick, half the tables are looked up (same timing: 5 bits
  // 13.0 -> 10.7 us, 6 bits 15.7 -> 12.4 us).
  //
  // TRANSPOSED (a bf16-exact codebook: each float's low two bytes are 0): byte k of the index
  // vector holds index k, only planes 2 and 3 are looked up, and shifts and masks make floats
  // of them in place, so float k of output vector m holds index 4k + m (RowDecoder::position).
  // 5 bits folded then takes 5 shuffles per 32 values where the interleaved order takes 16 (same
  // timing, bf16-exact symmetric tables, against the interleaved order: 4 bits 7.5 -> 7.0 us,
  // 5 bits 12.9 -> 10.5 us; the one-vpshufb 4-bit unpack took 10.7 -> 7.5 us before that).
  template <int B, bool FOLD = false, bool TRANSPOSED = false>
  void rows(const uint8_t* const* recs, int offset, int n, int stride, float* out) const {
    const __m256i mask = _mm256_set1_epi8(static_cast<char>((1 << B) - 1));
    // Chunks whose 16-byte loads stay inside the row's packed field: the first `wide`.
    const int wide = whole_loads(n_ * B / 8, 2 * B + 16, 4 * B);
    // Dword k of the packed indices holds indices 4k .. 4k + 3; even dwords to the low half
    // make the byte planes' interleave come out in order.
    const __m256i order = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    // At 4 bits byte k holds indices 2k, 2k + 1: the same order needs bytes 0-1, 4-5, 8-9,
    // 12-13 in the low half and 2-3, 6-7, 10-11, 14-15 in the high half.
    // TRANSPOSED takes them in order: bytes 0-7 low, 8-15 high.
    const __m256i nibble_pairs =
        TRANSPOSED ? _mm256_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 9, 9,
                                      10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15)
                   : _mm256_setr_epi8(0, 0, 1, 1, 4, 4, 5, 5, 8, 8, 9, 9, 12, 12, 13, 13, 2, 2, 3,
                                      3, 6, 6, 7, 7, 10, 10, 11, 11, 14, 14, 15, 15);
    for (int u = 0; u < n; ++u) {
      if (u + 2 < n) __builtin_prefetch(recs[u + 2] + offset);
      const uint8_t* p = recs[u] + offset;
      float* o = out + static_cast<size_t>(u) * stride;
      for (int c = 0; c < n_; c += 32, p += 4 * B) {
        __m256i i;
        if constexpr (B == 4) {
          // The 16 bytes in both halves; vpshufb copies byte k to both bytes of a 16-bit lane
          // and masks split its two nibbles: one shuffle where wider indices take four.
          const __m256i twice = _mm256_shuffle_epi8(
              _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
              nibble_pairs);
          i = _mm256_or_si256(
              _mm256_and_si256(twice, _mm256_set1_epi16(0x000f)),
              _mm256_and_si256(_mm256_srli_epi16(twice, 4), _mm256_set1_epi16(0x0f00)));
        } else {
          const __m256i data =
              c / 32 < wide ? _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(p + 2 * B),
                                                  reinterpret_cast<const __m128i*>(p))
                            : _mm256_setr_m128i(two_groups<B>(p), two_groups<B>(p + 2 * B));
          const __m256i x = _mm256_srli_epi16(
              _mm256_mullo_epi16(_mm256_shuffle_epi8(data, unpack_lo_), unpack_mul_), 8);
          const __m256i y = _mm256_srli_epi16(
              _mm256_mullo_epi16(_mm256_shuffle_epi8(data, unpack_hi_), unpack_mul_), 8);
          i = _mm256_and_si256(_mm256_packus_epi16(x, y), mask);
          if constexpr (!TRANSPOSED) i = _mm256_permutevar8x32_epi32(i, order);
        }
        __m256i upper = _mm256_setzero_si256();
        if constexpr (FOLD) {
          upper = _mm256_cmpgt_epi8(i, _mm256_set1_epi8(static_cast<char>((1 << (B - 1)) - 1)));
          i = _mm256_xor_si256(i, _mm256_and_si256(upper, mask));
        }
        constexpr int TABLES = 1 << (B - 4 - FOLD);
        // i - 16s reads table s's difference from table s - 1 where i >= 16s, and 0 where
        // i < 16s (a negative byte has bit 7 set): the XOR of the reads is table i / 16's byte.
        __m256i shifted[4] = {i};
#pragma GCC unroll 3
        for (int s = 1; s < TABLES; ++s)
          shifted[s] = _mm256_sub_epi8(i, _mm256_set1_epi8(static_cast<char>(16 * s)));
        __m256i b[4];
#pragma GCC unroll 4
        for (int P = TRANSPOSED ? 2 : 0; P < 4; ++P) {
          b[P] = _mm256_shuffle_epi8(planes_[P][0], i);
#pragma GCC unroll 3
          for (int s = 1; s < TABLES; ++s)
            b[P] = _mm256_xor_si256(b[P], _mm256_shuffle_epi8(planes_[P][s], shifted[s]));
        }
        if constexpr (FOLD)
          b[3] = _mm256_xor_si256(b[3], _mm256_and_si256(upper, _mm256_set1_epi8(-128)));
        __m256i* oc = reinterpret_cast<__m256i*>(o + c);
        if constexpr (TRANSPOSED) {
          // 16-bit lane w: the bf16 of index 2w (even) or 2w + 1 (odd); then per 32-bit lane k
          // the floats of indices 4k, 4k + 1 (low halves) and 4k + 2, 4k + 3 (high halves).
          const __m256i even = _mm256_or_si256(_mm256_and_si256(b[2], _mm256_set1_epi16(0xff)),
                                               _mm256_slli_epi16(b[3], 8));
          const __m256i odd = _mm256_or_si256(
              _mm256_srli_epi16(b[2], 8),
              _mm256_and_si256(b[3], _mm256_set1_epi16(static_cast<int16_t>(0xff00))));
          const __m256i high = _mm256_set1_epi32(static_cast<int32_t>(0xffff0000u));
          _mm256_storeu_si256(oc, _mm256_slli_epi32(even, 16));
          _mm256_storeu_si256(oc + 1, _mm256_slli_epi32(odd, 16));
          _mm256_storeu_si256(oc + 2, _mm256_and_si256(even, high));
          _mm256_storeu_si256(oc + 3, _mm256_and_si256(odd, high));
          continue;
        }
        const __m256i lo01 = _mm256_unpacklo_epi8(b[0], b[1]);
        const __m256i hi01 = _mm256_unpackhi_epi8(b[0], b[1]);
        const __m256i lo23 = _mm256_unpacklo_epi8(b[2], b[3]);
        const __m256i hi23 = _mm256_unpackhi_epi8(b[2], b[3]);
        _mm256_storeu_si256(oc, _mm256_unpacklo_epi16(lo01, lo23));
        _mm256_storeu_si256(oc + 1, _mm256_unpackhi_epi16(lo01, lo23));
        _mm256_storeu_si256(oc + 2, _mm256_unpacklo_epi16(hi01, hi23));
        _mm256_storeu_si256(oc + 3, _mm256_unpackhi_epi16(hi01, hi23));
      }
    }
  }

  // The 2B bytes of two index groups at p in the low bytes, zero above (no read past them).
  template <int B>
  static __m128i two_groups(const uint8_t* p) {
    uint64_t low, high = 0;
    std::memcpy(&low, p, 8);
    std::memcpy(&high, p + 8, 2 * B - 8);
    return _mm_set_epi64x(static_cast<int64_t>(high), static_cast<int64_t>(low));
  }

 private:
  int n_ = 0;
  __m256i planes_[4][4], unpack_lo_, unpack_hi_, unpack_mul_;
};
#endif

}  // namespace tq
