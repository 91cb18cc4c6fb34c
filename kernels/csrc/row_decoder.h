// Decoding rows of packed indices into centroid values (RowDecoder), shared by the C++ ops that
// read records (attention.cpp, dequantize.cpp): per ISA, unpacking whole groups and looking the
// codebook up in registers where it fits.
#pragma once

#include "byte_planes.h"

namespace tq {

#ifdef TQ_AVX512
// table[i] for each lane's index i < 2^B: from t, the table's first 64 entries in four
// registers, up to 6 bits; a gather from memory above.
template <int B>
inline __m512 table_lookup(const __m512* t, __m512i i, const float* table) {
  if constexpr (B <= 4) {
    return _mm512_permutexvar_ps(i, t[0]);
  } else if constexpr (B == 5) {
    return _mm512_permutex2var_ps(t[0], i, t[1]);
  } else if constexpr (B == 6) {
    const __mmask16 high = _mm512_test_epi32_mask(i, _mm512_set1_epi32(32));
    return _mm512_mask_blend_ps(high, _mm512_permutex2var_ps(t[0], i, t[1]),
                                _mm512_permutex2var_ps(t[2], i, t[3]));
  } else {
    return _mm512_i32gather_ps(i, table, 4);
  }
}
#endif

// Entries [8 * first, 8 * first + 2^(B - 3) * 8) of a table held 8 floats per register in t,
// for B <= 6, by index bits 3..B-1: vpermps on the low 3 bits, blends on the rest.
#ifdef TQ_AVX2
template <int B>
inline __m256 table_pick(const __m256* t, __m256i i, int first) {
  if constexpr (B <= 3) {
    return _mm256_permutevar8x32_ps(t[first], i);
  } else {
    const __m256 low = table_pick<B - 1>(t, i, first);
    const __m256 high = table_pick<B - 1>(t, i, first + (1 << (B - 4)));
    // Index bit B - 1 moved to the sign bit selects.
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(i, 32 - B)));
  }
}

// Lane k: w >> (k * B) (the low 32 bits).
template <int B>
inline __m256i spread(uint64_t w) {
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
#endif

// Centroid values of one row of b-bit indices: c[idx] for each of the n indices at p.
class RowDecoder {
 public:
  // AVX2 has three exact lookups (rows_fixed, BytePlanes); `lookup` forces one, kChosen takes
  // the one timed fastest on this CPU (chosen_lookups).
  enum Lookup { kChosen, kPermute, kGather, kBytes };

  // any_order: the caller reads a row's values by position(j) (attention's dots, whose
  // queries and sums follow it), which lets a bf16-exact codebook at 4-5 bits skip the
  // interleave of byte planes on AVX2 (BytePlanes).
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
    // two byte planes and no interleave: fewer shuffles than any other lookup (BytePlanes).
    transposed_ = any_order && bits >= 4 && bits <= 5 && n % 32 == 0;
    for (int i = 0; i < (1 << bits) && transposed_; ++i) {
      uint32_t x;
      std::memcpy(&x, &table[i], 4);
      transposed_ = (x & 0xffffu) == 0;
    }
    if (transposed_) lookup_ = kBytes;  // the byte-plane constants below are built for it
    if (lookup_ == kBytes && n % 32 != 0) lookup_ = kPermute;
    if (lookup_ != kBytes) return;
    bytes_ = BytePlanes(table, bits, n);
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
        case 4: return bytes_.rows<4, false, true>(recs, offset, n, stride, out);
        default: return symmetric_ ? bytes_.rows<5, true, true>(recs, offset, n, stride, out)
                                   : bytes_.rows<5, false, true>(recs, offset, n, stride, out);
      }
    if (fast_ && lookup_ == kBytes) switch (bits_) {
        case 4: return bytes_.rows<4>(recs, offset, n, stride, out);
        case 5: return symmetric_ ? bytes_.rows<5, true>(recs, offset, n, stride, out)
                                  : bytes_.rows<5>(recs, offset, n, stride, out);
        default: return symmetric_ ? bytes_.rows<6, true>(recs, offset, n, stride, out)
                                   : bytes_.rows<6>(recs, offset, n, stride, out);
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
          _mm512_storeu_ps(o + c + v, table_lookup<B>(t_, i, c_));
        }
      }
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

  template <int B>
  __m256 pick(__m256i i, int first) const {
    return table_pick<B>(t_, i, first);
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
        alignas(32) float table[64];  // symmetric, as the codebooks are (BytePlanes folds)
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
  BytePlanes bytes_;
#endif
  const float* c_;
  int bits_, n_;
  bool transposed_ = false;
};

}  // namespace tq
