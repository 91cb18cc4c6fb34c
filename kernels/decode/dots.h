// How attend_item (attention.cpp) turns a tile of records into scores and value sums, per
// arithmetic: FloatDots (float32, every build) and Bf16Dots (bf16 dots, AVX512-BF16 builds).
// Each holds the item's queries and the tile's decoded keys and values; dim(j) names the
// output dimension of position j of its value sums.
#pragma once

#include "bf16_dots.h"

namespace tq {

// x[:n] *= scale
inline void scale_row(float* x, float scale, int n) {
  for (int j = 0; j < n; ++j) x[j] *= scale;
}

// The float32 dots of attend_item: centroids decoded to floats, scores and value sums in
// float32 (attention_math.h). Split keys scale each part by its own norm here.
class FloatDots {
 public:
  FloatDots(const Layout& L, int d, const float* kc, const float* vc, const OutlierPart& O,
            int R)
      : d_(d), regular_(d - O.count), outliers_(O),
        value_(vc, L.value_bits, d, RowDecoder::kChosen, true),
        q_(static_cast<size_t>(R) * d), keys_(L.key_bits ? TILE * d : 0), values_(TILE * d) {
    if (L.key_bits) key_.emplace(kc, L.key_bits, regular_, RowDecoder::kChosen, true);
    if (outliers_.count)
      outlier_.emplace(outliers_.centroids, outliers_.bits, outliers_.count, RowDecoder::kChosen,
                       true);
  }
  // The decoders may leave a row's values in their own order (RowDecoder::position): queries
  // are stored in the keys' order, and value sums come out in the values'.
  int dim(int j) const { return value_.position(j); }
  void set_query(int r, const float* q) {
    float* row = &q_[size_t(r) * d_];
    if (key_)
      for (int j = 0; j < regular_; ++j) row[j] = q[key_->position(j)];
    for (int j = 0; j < outliers_.count; ++j)
      row[regular_ + j] = q[regular_ + outlier_->position(j)];
  }
  void decode_keys(const uint8_t* const* recs, int key_indices, int n, float* knorm) {
    key_->rows(recs, key_indices, n, d_, keys_.data());
    if (!outliers_.count) return;
    outlier_->rows(recs, outliers_.indices, n, d_, keys_.data() + regular_);
    for (int u = 0; u < n; ++u) {  // the score's scale is then 1
      scale_row(&keys_[u * d_], knorm[u], regular_);
      scale_row(&keys_[u * d_ + regular_], load_half(recs[u] + outliers_.norm), outliers_.count);
      knorm[u] = 1.f;
    }
  }
  void add_scores(int r, const float* knorm, int n, float* s) const {
    tq::add_scores(&q_[size_t(r) * d_], keys_.data(), knorm, n, d_, s);
  }
  void decode_values(const uint8_t** recs, int value_indices, int n) {
    value_.rows(recs, value_indices, n, d_, values_.data());
  }
  // An odd n adds the tile's next row with its weight 0 (attend_item zeroes a tile's weights
  // past the visible tokens; the buffer holds whole tiles of finite centroids).
  static_assert(TILE % 2 == 0, "an odd count's extra row must lie inside the tile");
  void accumulate(float* const* acc, const float* alpha, const float* const* w, int rows, int n) {
    tq::accumulate(acc, alpha, w, rows, values_.data(), n + n % 2, d_);
  }

 private:
  int d_, regular_;
  OutlierPart outliers_;
  std::optional<RowDecoder> key_, outlier_;
  RowDecoder value_;
  std::vector<float> q_, keys_, values_;
};

#ifdef TQ_BF16_DOTS
// bf16_dots.h's dots: keys, values, queries and weights in bf16, sums in float32. Split keys
// score each part against its own bf16 rows (each padded to 64 words) and scale each part's dot
// by its own norm.
class Bf16Dots {
 public:
  // fits(L, d, O) must hold.
  Bf16Dots(const Layout& L, int d, const float* kc, const float* vc, const OutlierPart& O, int R)
      : d_(d), regular_(d - O.count), outliers_(O), key_(kc, L.key_bits, regular_),
        value_(vc, L.value_bits, d), keys_(TILE * key_.width()), values_(TILE * d) {
    if (O.count) {
      outlier_.emplace(O.centroids, O.bits, O.count);
      outlier_keys_.resize(TILE * outlier_->width());
    }
    query_words_ = key_.width() + (outlier_ ? outlier_->width() : 0);
    q_.resize(static_cast<size_t>(R) * query_words_);
  }
  static bool fits(const Layout& L, int d, const OutlierPart& O) {
    return L.key_bits > 0 && !L.prod && (d == 64 || d == 128 || d == 256) &&
           dot_width(d - O.count) &&
           Bf16RowDecoder::fits(L.key_bits) && Bf16RowDecoder::fits(L.value_bits) &&
           (O.count == 0 || (Bf16RowDecoder::fits(O.bits) && dot_width(O.count)));
  }
  static int dim(int j) { return j / 64 * 64 + pair_dim(j % 64); }
  void set_query(int r, const float* q) {
    uint16_t* row = &q_[size_t(r) * query_words_];
    pad_query(q, regular_, key_.width(), row);
    if (outlier_) pad_query(q + regular_, outliers_.count, outlier_->width(), row + key_.width());
  }
  void decode_keys(const uint8_t* const* recs, int key_indices, int n, float*) {
    key_.rows(recs, key_indices, n, keys_.data());
    if (!outlier_) return;
    outlier_->rows(recs, outliers_.indices, n, outlier_keys_.data());
    for (int u = 0; u < n; ++u) outlier_norms_[u] = load_half(recs[u] + outliers_.norm);
  }
  void add_scores(int r, const float* knorm, int n, float* s) const {
    const uint16_t* q = &q_[size_t(r) * query_words_];
    add_scores_bf16(q, keys_.data(), knorm, n, key_.width(), s);
    if (outlier_)
      add_scores_bf16(q + key_.width(), outlier_keys_.data(), outlier_norms_, n,
                      outlier_->width(), s);
  }
  // An odd n pairs the last token with itself; its weight is 0 (attend_item zeroes a tile's
  // weights past the visible tokens).
  void decode_values(const uint8_t** recs, int value_indices, int n) {
    if (n % 2) recs[n] = recs[n - 1];
    value_.pairs(recs, value_indices, (n + 1) / 2, values_.data());
  }
  void accumulate(float* const* acc, const float* alpha, const float* const* w, int rows, int n) {
    uint16_t weights[ROW_BLOCK][TILE];
    const uint16_t* ws[ROW_BLOCK];
    for (int r = 0; r < rows; ++r) to_bf16(w[r], TILE, weights[r]), ws[r] = weights[r];
    accumulate_bf16(acc, alpha, ws, rows, values_.data(), (n + 1) / 2, d_);
  }

 private:
  // Rows of n words padded to 64, 128 or 256 (add_scores_bf16's widths).
  static bool dot_width(int n) {
    const int w = (n + 63) / 64 * 64;
    return w == 64 || w == 128 || w == 256;
  }
  // The n floats of a query part in permuted_dim order, zero past n, as `width` bf16 words.
  static void pad_query(const float* q, int n, int width, uint16_t* out) {
    float permuted[256];
    for (int j = 0; j < width; ++j) {
      const int dim = j / 64 * 64 + permuted_dim(j % 64);
      permuted[j] = dim < n ? q[dim] : 0.f;
    }
    to_bf16(permuted, width, out);
  }

  int d_, regular_, query_words_ = 0;
  OutlierPart outliers_;
  Bf16RowDecoder key_;
  std::optional<Bf16RowDecoder> outlier_;
  Bf16RowDecoder value_;
  std::vector<uint16_t> q_, keys_, outlier_keys_, values_;
  float outlier_norms_[TILE];
};
#endif

}  // namespace tq
