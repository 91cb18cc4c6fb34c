// How attend_item (attention.cpp) turns a tile of records into scores and value sums, per
// arithmetic: FloatDots (float32, every build) and Bf16Dots (bf16 dots, AVX512-BF16 builds).
// Each holds the item's queries and the tile's decoded keys and values; dim(j) names the
// output dimension of position j of its value sums.
#pragma once

#include "../csrc/split_row_decoder.h"
#include "bf16_dots.h"

namespace tq {

// The float32 dots of attend_item: centroids decoded to floats, scores and value sums in
// float32 (attention_math.h). Split keys come out of their decoder times each part's norm.
class FloatDots {
 public:
  FloatDots(const Layout& L, int d, const float* kc, const float* vc, const OutlierPart& O,
            int R)
      : d_(d), value_(vc, L.value_bits, d, RowDecoder::kChosen, true),
        q_(static_cast<size_t>(R) * d), keys_(L.key_bits ? TILE * d : 0), values_(TILE * d) {
    if (O.count) split_.emplace(L, d, kc, O, true);
    else if (L.key_bits) key_.emplace(kc, L.key_bits, d, RowDecoder::kChosen, true);
  }
  // The decoders may leave a row's values in their own order (RowDecoder::position): queries
  // are stored in the keys' order, and value sums come out in the values'.
  int dim(int j) const { return value_.position(j); }
  void set_query(int r, const float* q) {
    float* row = &q_[size_t(r) * d_];
    for (int j = 0; j < d_; ++j)
      row[j] = q[split_ ? split_->position(j) : key_ ? key_->position(j) : j];
  }
  void decode_keys(const uint8_t* const* recs, int key_indices, int n, float* knorm) {
    if (!split_) return key_->rows(recs, key_indices, n, d_, keys_.data());
    split_->rows(recs, n, d_, knorm, keys_.data());
    std::fill(knorm, knorm + n, 1.f);  // the norms are in the keys: the score's scale is 1
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
  int d_;
  std::optional<RowDecoder> key_;
  std::optional<SplitRowDecoder> split_;
  RowDecoder value_;
  std::vector<float> q_, keys_, values_;
};

#ifdef TQ_BF16_DOTS
// bf16_dots.h's dots: keys, values, queries and weights in bf16, sums in float32.
class Bf16Dots {
 public:
  // fits(L, d) must hold.
  Bf16Dots(const Layout& L, int d, const float* kc, const float* vc, const OutlierPart&, int R)
      : d_(d), key_(kc, L.key_bits, d), value_(vc, L.value_bits, d),
        q_(static_cast<size_t>(R) * d), keys_(TILE * d), values_(TILE * d) {}
  static bool fits(const Layout& L, int d, const OutlierPart& O) {
    return L.key_bits > 0 && !L.prod && O.count == 0 && (d == 64 || d == 128 || d == 256) &&
           Bf16RowDecoder::fits(L.key_bits, d) && Bf16RowDecoder::fits(L.value_bits, d);
  }
  static int dim(int j) { return j / 64 * 64 + pair_dim(j % 64); }
  void set_query(int r, const float* q) {
    float permuted[256];
    for (int j = 0; j < d_; ++j) permuted[j] = q[j / 64 * 64 + permuted_dim(j % 64)];
    to_bf16(permuted, d_, &q_[size_t(r) * d_]);
  }
  void decode_keys(const uint8_t* const* recs, int key_indices, int n, float*) {
    key_.rows(recs, key_indices, n, keys_.data());
  }
  void add_scores(int r, const float* knorm, int n, float* s) const {
    add_scores_bf16(&q_[size_t(r) * d_], keys_.data(), knorm, n, d_, s);
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
  int d_;
  Bf16RowDecoder key_, value_;
  std::vector<uint16_t> q_, keys_, values_;
};
#endif

}  // namespace tq
