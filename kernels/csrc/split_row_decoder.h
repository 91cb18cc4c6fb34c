// SplitRowDecoder: a split key's row (both parts) decoded for the fused attention and the
// dequantize, on top of RowDecoder (row_decoder.h).
#pragma once

#include "row_decoder.h"

namespace tq {

// A split key's row (tq_vllm/quant/outliers.py): the regular channels' indices at the layout's
// key bits, then the outlier channels' at theirs, each part's centroids times its norm. On
// AVX-512 one pass over the row's bytes decodes both parts (one table holds both codebooks,
// each lane knows its part's width and table offset, and its norm), where two decoders and a
// scaling pass over the row cost the K2.5 V3 preset's decode a fifth of its time. AVX2 takes
// one pass over the row's groups where both parts have at most 4 bits; other widths and channel
// counts, and the portable build, decode the parts in turn.
// The products are the same either way: centroid times norm, one float rounding.
class SplitRowDecoder {
 public:
  // any_order: as RowDecoder's (the parts in turn may each leave their own order).
  SplitRowDecoder(const Layout& L, int d, const float* regular_centroids, const OutlierPart& O,
                  bool any_order)
      : regular_(d - O.count), outliers_(O.count), key_indices_(L.key_indices),
        outlier_indices_(O.indices), outlier_norm_(O.norm),
        regular_decoder_(regular_centroids, L.key_bits, d - O.count, RowDecoder::kChosen,
                         any_order),
        outlier_decoder_(O.centroids, O.bits, O.count, RowDecoder::kChosen, any_order) {
#ifdef TQ_AVX512
    const int rb = L.key_bits, ob = O.bits, entries = (1 << rb) + (1 << ob);
    one_pass_ = regular_ % 8 == 0 && outliers_ % 8 == 0 && d % 16 == 0 && d <= 64 * MAX_CHUNKS &&
                entries <= 64 &&  // so each part has at most 5 bits
                O.indices == L.key_indices + regular_ * rb / 8;  // one field, as the layout has it
    if (!one_pass_) return;
    lookup_bits_ = entries <= 16 ? 4 : entries <= 32 ? 5 : 6;
    alignas(64) float table[64] = {};
    for (int i = 0; i < (1 << rb); ++i) table[i] = regular_centroids[i];
    for (int i = 0; i < (1 << ob); ++i) table[(1 << rb) + i] = O.centroids[i];
    for (int i = 0; i < 4; ++i) t_[i] = _mm512_load_ps(table + 16 * i);
    // Group G (8 indices) of the row: its bytes' start in the field, its width, its part.
    auto group_start = [&](int G) {
      return 8 * G < regular_ ? G * rb : regular_ * rb / 8 + (G - regular_ / 8) * ob;
    };
    chunks_ = (d + 63) / 64;
    for (int c = 0; c < chunks_; ++c) {
      alignas(64) uint8_t perm[64] = {}, shift[64] = {}, mask[64] = {}, offset[64] = {};
      const int groups = std::min(8, (d - 64 * c) / 8), first = group_start(8 * c);
      for (int g = 0; g < groups; ++g) {
        const int G = 8 * c + g;
        const bool outlier = 8 * G >= regular_;
        const int bits = outlier ? ob : rb;
        for (int i = 0; i < 8; ++i) {
          perm[8 * g + i] = static_cast<uint8_t>(group_start(G) - first + i);
          shift[8 * g + i] = static_cast<uint8_t>(i * bits);
          mask[8 * g + i] = static_cast<uint8_t>((1 << bits) - 1);
          offset[8 * g + i] = static_cast<uint8_t>(outlier ? 1 << rb : 0);
        }
      }
      const int last = 8 * c + groups - 1;
      const int bytes = group_start(last) + (8 * last >= regular_ ? ob : rb) - first;
      Chunk& C = chunk_[c];
      C.perm = _mm512_load_si512(perm);
      C.shift = _mm512_load_si512(shift);
      C.mask = _mm512_load_si512(mask);
      C.offset = _mm512_load_si512(offset);
      C.load = (__mmask64{1} << bytes) - 1;  // at most 5 x 8 bytes
      C.first = first;
      C.vectors = groups / 2;
      for (int v = 0; v < C.vectors; ++v) {
        uint32_t lanes = 0;
        for (int l = 0; l < 16; ++l) lanes |= uint32_t{64 * c + 16 * v + l >= regular_} << l;
        C.outlier_lanes[v] = static_cast<__mmask16>(lanes);
      }
    }
#elif defined(TQ_AVX2)
    // Up to 4 bits a part's table fits two registers, and a group of 8 indices one 32-bit load.
    const int rb = L.key_bits, ob = O.bits, field = regular_ * rb / 8 + outliers_ * ob / 8;
    one_pass_ = regular_ % 8 == 0 && outliers_ % 8 == 0 && rb <= 4 && ob <= 4 &&
                O.indices == L.key_indices + regular_ * rb / 8;
    if (!one_pass_) return;
    bits_ = 8 * rb + ob;
    alignas(32) float table[32] = {};
    for (int i = 0; i < (1 << rb); ++i) table[i] = regular_centroids[i];
    for (int i = 0; i < (1 << ob); ++i) table[16 + i] = O.centroids[i];
    for (int i = 0; i < 4; ++i) t_[i] = _mm256_load_ps(table + 8 * i);
    // Groups whose 4-byte load would pass the key field's end read their bytes one by one.
    wide_ = whole_loads(field, 4, 1);
#endif
  }

  // The index that output position j of a row holds.
  int position(int j) const {
    if (one_pass_) return j;
    return j < regular_ ? regular_decoder_.position(j)
                        : regular_ + outlier_decoder_.position(j - regular_);
  }

  // Rows recs[u] (u < n, whole records) into out + u * stride: the regular part times
  // regular_norm[u], the outlier part times the outlier norm the record holds.
  void rows(const uint8_t* const* recs, int n, int stride, const float* regular_norm,
            float* out) const {
#ifdef TQ_AVX512
    if (one_pass_) switch (lookup_bits_) {
        case 4: return rows_one_pass<4>(recs, n, stride, regular_norm, out);
        case 5: return rows_one_pass<5>(recs, n, stride, regular_norm, out);
        default: return rows_one_pass<6>(recs, n, stride, regular_norm, out);
      }
#elif defined(TQ_AVX2)
    if (one_pass_) return widths<1>(bits_ / 8, bits_ % 8, recs, n, stride, regular_norm, out);
#endif
    regular_decoder_.rows(recs, key_indices_, n, stride, out);
    outlier_decoder_.rows(recs, outlier_indices_, n, stride, out + regular_);
    for (int u = 0; u < n; ++u) {
      float* o = out + static_cast<size_t>(u) * stride;
      const float on = load_half(recs[u] + outlier_norm_);
      for (int j = 0; j < regular_; ++j) o[j] *= regular_norm[u];
      for (int j = regular_; j < regular_ + outliers_; ++j) o[j] *= on;
    }
  }

 private:
#ifdef TQ_AVX512
  static constexpr int MAX_CHUNKS = 4;  // head_dim up to 256
  // 64 lanes of the row: RowDecoder's byte permute and multishift with per-lane widths, and
  // the outlier lanes' table offset added.
  struct Chunk {
    __m512i perm, shift, mask, offset;
    __mmask64 load;
    int first, vectors;  // the chunk's first byte in the field; its 16-lane vectors
    __mmask16 outlier_lanes[4];
  };

  template <int B>
  void rows_one_pass(const uint8_t* const* recs, int n, int stride, const float* regular_norm,
                     float* out) const {
    for (int u = 0; u < n; ++u) {
      if (u + 2 < n) __builtin_prefetch(recs[u + 2] + key_indices_);
      const uint8_t* p = recs[u] + key_indices_;
      float* o = out + static_cast<size_t>(u) * stride;
      const __m512 kn = _mm512_set1_ps(regular_norm[u]);
      const __m512 on = _mm512_set1_ps(load_half(recs[u] + outlier_norm_));
      for (int c = 0; c < chunks_; ++c) {
        const Chunk& C = chunk_[c];
        const __m512i lanes =
            _mm512_permutexvar_epi8(C.perm, _mm512_maskz_loadu_epi8(C.load, p + C.first));
        alignas(64) uint8_t idx[64];
        _mm512_store_si512(idx, _mm512_add_epi8(
            _mm512_and_si512(_mm512_multishift_epi64_epi8(C.shift, lanes), C.mask), C.offset));
        for (int v = 0; v < C.vectors; ++v) {
          const __m512i i = _mm512_cvtepu8_epi32(
              _mm_load_si128(reinterpret_cast<const __m128i*>(idx + 16 * v)));
          const __m512 norm = _mm512_mask_blend_ps(C.outlier_lanes[v], kn, on);
          _mm512_storeu_ps(o + 64 * c + 16 * v,
                           _mm512_mul_ps(table_lookup<B>(t_, i, nullptr), norm));
        }
      }
    }
  }

  Chunk chunk_[MAX_CHUNKS];
  __m512 t_[4];
  int chunks_ = 0, lookup_bits_ = 0;
#elif defined(TQ_AVX2)
  // rows_one_pass<RB, OB> for the widths given at run time (1..4 each).
  template <int RB>
  void widths(int rb, int ob, const uint8_t* const* recs, int n, int stride,
              const float* regular_norm, float* out) const {
    if constexpr (RB < 4) {
      if (rb > RB) return widths<RB + 1>(rb, ob, recs, n, stride, regular_norm, out);
    }
    switch (ob) {
      case 1: return rows_one_pass<RB, 1>(recs, n, stride, regular_norm, out);
      case 2: return rows_one_pass<RB, 2>(recs, n, stride, regular_norm, out);
      case 3: return rows_one_pass<RB, 3>(recs, n, stride, regular_norm, out);
      default: return rows_one_pass<RB, 4>(recs, n, stride, regular_norm, out);
    }
  }

  // Group g of a part at B bits (its bytes at p), looked up in the table at t_[first], times
  // norm, into o.
  template <int B>
  void group(const uint8_t* p, bool whole, int first, __m256 norm, float* o) const {
    uint32_t w = 0;
    if (whole) {
      std::memcpy(&w, p, 4);
    } else {
#pragma GCC unroll 4
      for (int k = 0; k < B; ++k) w |= static_cast<uint32_t>(p[k]) << (8 * k);
    }
    const __m256i i = _mm256_and_si256(spread<B>(w), _mm256_set1_epi32((1 << B) - 1));
    _mm256_storeu_ps(o, _mm256_mul_ps(table_pick<B>(t_, i, first), norm));
  }

  template <int RB, int OB>
  void rows_one_pass(const uint8_t* const* recs, int n, int stride, const float* regular_norm,
                     float* out) const {
    const int regular_groups = regular_ / 8, groups = regular_groups + outliers_ / 8;
    for (int u = 0; u < n; ++u) {
      if (u + 2 < n) __builtin_prefetch(recs[u + 2] + key_indices_);
      const uint8_t* p = recs[u] + key_indices_;
      float* o = out + static_cast<size_t>(u) * stride;
      const __m256 kn = _mm256_set1_ps(regular_norm[u]);
      const __m256 on = _mm256_set1_ps(load_half(recs[u] + outlier_norm_));
      int g = 0, at = 0;  // at: group g's first byte
      for (; g < regular_groups; ++g, at += RB) group<RB>(p + at, at < wide_, 0, kn, o + 8 * g);
      for (; g < groups; ++g, at += OB) group<OB>(p + at, at < wide_, 2, on, o + 8 * g);
    }
  }

  __m256 t_[4];  // the regular part's table in t_[0..1], the outliers' in t_[2..3]
  int bits_ = 0, wide_ = 0;  // 8 * regular bits + outlier bits; loads whole below byte wide_
#endif
  bool one_pass_ = false;
  int regular_, outliers_, key_indices_, outlier_indices_, outlier_norm_;
  RowDecoder regular_decoder_, outlier_decoder_;
};

}  // namespace tq
