// Decoding rows of packed indices into centroid values (RowDecoder), shared by the C++ ops that
// read records (attention.cpp, dequantize.cpp): per ISA, unpacking whole groups and looking the
// codebook up in registers where it fits.
#pragma once

#include "records.h"

namespace tq {

// How many steps of `step` bytes, from byte 0 of a field of `field` bytes, can each read
// `reach` bytes without passing its end (0 when even the first cannot).
inline int whole_loads(int field, int reach, int step) {
  return field < reach ? 0 : (field - reach) / step + 1;
}

// Centroid values of one row of b-bit indices: c[idx] for each of the n indices at p.
class RowDecoder {
 public:
  // AVX2 has three exact lookups (rows_fixed, rows_bytes); `lookup` forces one, kChosen takes
  // the one timed fastest on this CPU (chosen_lookups).
  enum Lookup { kChosen, kPermute, kGather, kBytes };

  // any_order: the caller reads a row's values by position(j) (attention's dots, whose
  // queries and sums follow it), which lets a bf16-exact codebook at 4-5 bits skip the
  // interleave of byte planes on AVX2 (rows_bytes).
  RowDecoder(const float* centroids, int bits, int n, Lookup lookup = kChosen,
             bool any_order = false)
      : c_(centroids), bits_(bits), n_(n) {
#ifdef TQ_AVX512
    (void)any_order;
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
#elif defined(TQ_AVX2)
    fast_ = n % 8 == 0;
    alignas(32) float table[64] = {};  // up to 6 bits the table sits in eight registers
    for (int i = 0; i < std::min(64, 1 << bits); ++i) table[i] = centroids[i];
    for (int i = 0; i < 8; ++i) t_[i] = _mm256_load_ps(table + 8 * i);
    // c[2^b - 1 - i] = -c[i], as Lloyd-Max codebooks are: 5-6 bit lookups then fold (below).
    symmetric_ = bits <= 6;
    for (int i = 0; i < (1 << bits) && symmetric_; ++i) {
      uint32_t x, y;
      std::memcpy(&x, &table[i], 4);
      std::memcpy(&y, &table[(1 << bits) - 1 - i], 4);
      symmetric_ = y == (x ^ 0x80000000u);
    }
    if (bits > 6) lookup_ = kGather;
    else if (bits >= 4) lookup_ = lookup == kChosen ? chosen_lookups()[bits] : lookup;
    // A bf16-exact codebook (the served ones at up to 5 bits: centroids.py, BF16_BITS) takes
    // two byte planes and no interleave: fewer shuffles than any other lookup (rows_bytes).
    transposed_ = any_order && bits >= 4 && bits <= 5 && n % 32 == 0;
    for (int i = 0; i < (1 << bits) && transposed_; ++i) {
      uint32_t x;
      std::memcpy(&x, &table[i], 4);
      transposed_ = (x & 0xffffu) == 0;
    }
    if (transposed_) lookup_ = kBytes;  // the byte-plane constants below are built for it
    if (lookup_ == kBytes && n % 32 != 0) lookup_ = kPermute;
    if (lookup_ != kBytes) return;
    // rows_bytes' constants: byte plane P of the centroids 16s .. 16s + 15 in planes_[P][s],
    // XORed with the plane of the 16 before them (s > 0);
    // per 16-bit lane k of a 128-bit half, the two bytes holding index k (unpack_lo_) or
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
#else
    (void)lookup, (void)any_order;
#endif
  }

  // The index that output position j of a row holds: j, or with a transposed decode the 4 x 8
  // transpose within each 32: position 8m + k holds index 4k + m.
  int position(int j) const { return transposed_ ? j / 32 * 32 + j % 8 * 4 + j % 32 / 8 : j; }

  void operator()(const uint8_t* p, float* out) const {
    const uint8_t* rows[1] = {p};
    this->rows(rows, 0, 1, 0, out);
  }

  // Rows recs[u] + offset for u < n into out + u * stride: one dispatch on the bit width per
  // call, the per-row work then inlined with the width known at compile time.
  void rows(const uint8_t* const* recs, int offset, int n, int stride, float* out) const {
#ifdef TQ_AVX2
    if (fast_ && transposed_) switch (bits_) {
        case 4: return rows_bytes<4, false, true>(recs, offset, n, stride, out);
        default: return symmetric_ ? rows_bytes<5, true, true>(recs, offset, n, stride, out)
                                   : rows_bytes<5, false, true>(recs, offset, n, stride, out);
      }
    if (fast_ && lookup_ == kBytes) switch (bits_) {
        case 4: return rows_bytes<4>(recs, offset, n, stride, out);
        case 5: return symmetric_ ? rows_bytes<5, true>(recs, offset, n, stride, out)
                                  : rows_bytes<5>(recs, offset, n, stride, out);
        default: return symmetric_ ? rows_bytes<6, true>(recs, offset, n, stride, out)
                                   : rows_bytes<6>(recs, offset, n, stride, out);
      }
    if (fast_ && lookup_ == kGather) switch (bits_) {
        case 4: return rows_fixed<4, true>(recs, offset, n, stride, out);
        case 5: return rows_fixed<5, true>(recs, offset, n, stride, out);
        case 6: return rows_fixed<6, true>(recs, offset, n, stride, out);
        case 7: return rows_fixed<7, true>(recs, offset, n, stride, out);
        default: return rows_fixed<8, true>(recs, offset, n, stride, out);
      }
#endif
#if defined(TQ_AVX512) || defined(TQ_AVX2)
    if (fast_) switch (bits_) {
        case 1: return rows_fixed<1>(recs, offset, n, stride, out);
        case 2: return rows_fixed<2>(recs, offset, n, stride, out);
        case 3: return rows_fixed<3>(recs, offset, n, stride, out);
        case 4: return rows_fixed<4>(recs, offset, n, stride, out);
        case 5: return rows_fixed<5>(recs, offset, n, stride, out);
        case 6: return rows_fixed<6>(recs, offset, n, stride, out);
#ifdef TQ_AVX512
        case 7: return rows_fixed<7>(recs, offset, n, stride, out);
        default: return rows_fixed<8>(recs, offset, n, stride, out);
#else
        default: break;  // 7-8 bits gather (above)
#endif
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
#elif defined(TQ_AVX2)
  // 8 indices (B bytes) at a time: variable shifts of the broadcast word put index k in lane
  // k (no pdep: microcoded on AMD before Zen 3), then a lookup: in registers (GATHER false:
  // vpermps takes 3 index bits, blends on bits 3-5 pick among up to eight 8-entry tables) or
  // a gather from the codebook (7-8 bits always; 4-6 bits where it was timed faster).
  template <int B, bool GATHER = false>
  void rows_fixed(const uint8_t* const* recs, int offset, int n, int stride, float* out) const {
    const __m256i mask = _mm256_set1_epi32((1 << B) - 1);
    // A load of a fixed LOAD bytes (an odd-sized memcpy costs a call) while it stays inside
    // the row's packed field: the first `wide` groups; the rest byte by byte.
    constexpr int LOAD = B <= 4 ? 4 : 8;
    const int wide = whole_loads(n_ / 8 * B, LOAD, B);
    for (int u = 0; u < n; ++u) {
      if (u + 2 < n) __builtin_prefetch(recs[u + 2] + offset);
      const uint8_t* p = recs[u] + offset;
      float* o = out + static_cast<size_t>(u) * stride;
      for (int g = 0; g < n_ / 8; ++g, p += B) {
        uint64_t w = 0;
        if (g < wide) {
          std::memcpy(&w, p, LOAD);
        } else {
#pragma GCC unroll 8
          for (int k = 0; k < B; ++k) w |= static_cast<uint64_t>(p[k]) << (8 * k);
        }
        const __m256i i = _mm256_and_si256(spread<B>(w), mask);
        if constexpr (GATHER) {
          _mm256_storeu_ps(o + 8 * g, _mm256_i32gather_ps(c_, i, 4));
        } else if constexpr (B >= 5) {
          _mm256_storeu_ps(o + 8 * g, symmetric_ ? folded_pick<B>(i) : pick<B>(i, 0));
        } else {
          _mm256_storeu_ps(o + 8 * g, pick<B>(i, 0));
        }
      }
    }
  }

  // Lane k: w >> (k * B) (the low 32 bits).
  template <int B>
  static __m256i spread(uint64_t w) {
    if constexpr (B <= 4) {  // 8 indices in 32 bits
      const __m256i shifts = _mm256_setr_epi32(0, B, 2 * B, 3 * B, 4 * B, 5 * B, 6 * B, 7 * B);
      return _mm256_srlv_epi32(_mm256_set1_epi32(static_cast<int32_t>(w)), shifts);
    } else {
      const __m256i all = _mm256_set1_epi64x(static_cast<int64_t>(w));
      const __m256 lo = _mm256_castsi256_ps(
          _mm256_srlv_epi64(all, _mm256_setr_epi64x(0, B, 2 * B, 3 * B)));
      const __m256 hi = _mm256_castsi256_ps(
          _mm256_srlv_epi64(all, _mm256_setr_epi64x(4 * B, 5 * B, 6 * B, 7 * B)));
      // Low dwords per 128-bit half: [0, 1, 4, 5 | 2, 3, 6, 7]; the permute puts them in order.
      const __m256 mixed = _mm256_shuffle_ps(lo, hi, _MM_SHUFFLE(2, 0, 2, 0));
      return _mm256_permutevar8x32_epi32(_mm256_castps_si256(mixed),
                                         _mm256_setr_epi32(0, 1, 4, 5, 2, 3, 6, 7));
    }
  }

  // Entries [8 * first, 8 * first + 2^(B - 3) * 8) of the table, by index bits 3..B-1.
  template <int B>
  __m256 pick(__m256i i, int first) const {
    if constexpr (B <= 3) {
      return _mm256_permutevar8x32_ps(t_[first], i);
    } else {
      const __m256 low = pick<B - 1>(i, first), high = pick<B - 1>(i, first + (1 << (B - 4)));
      // Index bit B - 1 moved to the sign bit selects.
      return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(i, 32 - B)));
    }
  }

  // pick<B> of a symmetric codebook: an index in the upper half reads the mirror entry of the
  // lower half, 2^B - 1 - i = i ^ (2^B - 1), with the sign flipped, so the blend tree is one
  // level shorter. Timed on Zen 3 (512 rows of 128): 5 bits 26.4 -> 22.5 us, 6 bits 44.7 ->
  // 31.2 us; at 4 bits the extra integer work cost more than the vpermps saved (13.9 -> 17.8).
  template <int B>
  __m256 folded_pick(__m256i i) const {
    const __m256i upper = _mm256_slli_epi32(i, 32 - B);  // index bit B - 1 in the sign bit
    const __m256i mirror =
        _mm256_and_si256(_mm256_srai_epi32(upper, 31), _mm256_set1_epi32((1 << B) - 1));
    const __m256 low = pick<B - 1>(_mm256_xor_si256(i, mirror), 0);
    return _mm256_xor_ps(low, _mm256_castsi256_ps(
                                  _mm256_and_si256(upper, _mm256_set1_epi32(INT32_MIN))));
  }

  // 32 indices (4 groups, 4B bytes) at a time, 16 per 128-bit half: vpshufb puts the two
  // bytes holding each index in a 16-bit lane, a multiply by a power of two shifts its bits
  // to the high byte, a pack gathers them (4 bits: one vpshufb and masks). Then each of the
  // float's four bytes is looked up by vpshufb in 2^(B - 4) 16-entry tables, and the four byte
  // planes are interleaved back into floats. Two thirds or less of the time of pick's blend
  // tree at 5-6 bits here (Zen 4), and as exact. FOLD (a symmetric codebook, 5-6 bits): as
  // folded_pick, half the tables are looked up (same timing: 5 bits 13.0 -> 10.7 us, 6 bits
  // 15.7 -> 12.4 us).
  //
  // TRANSPOSED (a bf16-exact codebook: each float's low two bytes are 0): byte k of the index
  // vector holds index k, only planes 2 and 3 are looked up, and shifts and masks make floats
  // of them in place, so float k of output vector m holds index 4k + m (position()). 5 bits
  // folded then takes 5 shuffles per 32 values where the interleaved order takes 16 (same
  // timing, bf16-exact symmetric tables, against the interleaved order: 4 bits 7.5 -> 7.0 us,
  // 5 bits 12.9 -> 10.5 us; the one-vpshufb 4-bit unpack took 10.7 -> 7.5 us before that).
  template <int B, bool FOLD = false, bool TRANSPOSED = false>
  void rows_bytes(const uint8_t* const* recs, int offset, int n, int stride, float* out) const {
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

  // Gathers are fast on recent Intel cores and slow on AMD Zen 2 or on Intel parts with the
  // GDS microcode fix; the blend tree's and the byte planes' costs grow with the bits and
  // differ by core. So per width 4-6 the three are timed once per process on the same rows,
  // and must agree exactly (and the transposed decode with them at 4-5 bits).
  static const std::array<Lookup, 9>& chosen_lookups() {
    static const std::array<Lookup, 9> chosen = [] {
      std::array<Lookup, 9> fastest{};
      constexpr int ROWS = 512, D = 128;
      std::vector<uint8_t> bytes(ROWS * D);
      std::vector<const uint8_t*> recs(ROWS);
      uint32_t state = 12345;
      for (auto& b : bytes) b = static_cast<uint8_t>((state = state * 1664525u + 1013904223u) >> 24);
      for (int r = 0; r < ROWS; ++r) recs[r] = &bytes[static_cast<size_t>(r) * D];
      constexpr Lookup modes[3] = {kPermute, kGather, kBytes};
      std::vector<float> out[3];
      for (int bits = 4; bits <= 6; ++bits) {
        alignas(32) float table[64];  // symmetric, as the codebooks are (rows_bytes folds)
        for (int i = 0; i < (1 << bits); ++i)
          table[i] = 0.01f * static_cast<float>(2 * i + 1 - (1 << bits));
        double best = 1e30;
        for (int m = 0; m < 3; ++m) {
          const RowDecoder decoder(table, bits, D, modes[m]);
          out[m].assign(ROWS * D, 0.f);
          for (int trial = 0; trial < 5; ++trial) {
            const auto start = std::chrono::steady_clock::now();
            decoder.rows(recs.data(), 0, ROWS, D, out[m].data());
            const std::chrono::duration<double> took = std::chrono::steady_clock::now() - start;
            if (took.count() < best) best = took.count(), fastest[bits] = modes[m];
          }
        }
        TORCH_CHECK(out[0] == out[1] && out[0] == out[2],
                    "the AVX2 permute, gather and byte-plane lookups disagree at ", bits, " bits");
        // The unfolded lookups (any other codebook) must agree too; not timed.
        table[0] -= 0.005f;
        for (int m = 0; m < 3; ++m) RowDecoder(table, bits, D, modes[m]).rows(
            recs.data(), 0, ROWS, D, out[m].data());
        TORCH_CHECK(out[0] == out[1] && out[0] == out[2], "the AVX2 lookups of an asymmetric ",
                    "codebook disagree at ", bits, " bits");
        if (bits > 5) continue;
        // The transposed decode (attention's, bf16-exact codebooks) must hold the same values
        // at position(j), folded (symmetric) and not.
        alignas(32) float exact[32];  // multiples of 2^-9 below 1/4: exact in bf16
        for (int i = 0; i < (1 << bits); ++i)
          exact[i] = static_cast<float>(2 * i + 1 - (1 << bits)) / 128.f;
        for (int symmetric = 1; symmetric >= 0; --symmetric) {
          if (!symmetric) exact[0] -= 1.f / 512.f;
          const RowDecoder any(exact, bits, D, kBytes, true);
          TORCH_CHECK(any.transposed_, "a bf16-exact codebook was not decoded transposed");
          RowDecoder(exact, bits, D, kPermute).rows(recs.data(), 0, ROWS, D, out[0].data());
          any.rows(recs.data(), 0, ROWS, D, out[1].data());
          bool same = true;
          for (int r = 0; r < ROWS; ++r)
            for (int j = 0; j < D; ++j) same &= out[1][r * D + j] == out[0][r * D + any.position(j)];
          TORCH_CHECK(same, "the AVX2 transposed lookup disagrees at ", bits, " bits",
                      symmetric ? "" : " (asymmetric codebook)");
        }
      }
      return fastest;
    }();
    return chosen;
  }
  bool fast_ = false, symmetric_ = false;
  Lookup lookup_ = kPermute;
  __m256 t_[8];
  __m256i planes_[4][4], unpack_lo_, unpack_hi_, unpack_mul_;
#endif
  const float* c_;
  int bits_, n_;
  bool transposed_ = false;
};

}  // namespace tq
