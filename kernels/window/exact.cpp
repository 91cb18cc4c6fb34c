// The exact part of the exact-window rule on the CPU, merged into the compressed part: one op
// for what exact.py's exact_attention and merge do in a dozen PyTorch calls per layer (on a
// decode step those calls cost the float32 model more than the fused attention itself).
//
// Contract: exact.py's exact_merge_reference. Row r, query head h (KV head h / G) reads the
// first visible[r] timeline entries from window_start[r] (keys [:d], values [d:]), in its own
// softmax; its result is merged with the compressed part (out_c, lse_c) by the two
// log-sum-exps. Every row is computed alone, so a row's result does not depend on which rows
// share its step. Float32 throughout; the output is rounded once to the query's dtype.

#include "../decode/attention_math.h"

namespace tq {
namespace {

void load_floats(const void* src, at::ScalarType type, int n, float* dst) {
  switch (type) {
    case at::kFloat: std::memcpy(dst, src, sizeof(float) * n); break;
    case at::kBFloat16: {
      const auto* s = static_cast<const c10::BFloat16*>(src);
      for (int j = 0; j < n; ++j) dst[j] = static_cast<float>(s[j]);
      break;
    }
    default: {
      const auto* s = static_cast<const c10::Half*>(src);
      for (int j = 0; j < n; ++j) dst[j] = static_cast<float>(s[j]);
    }
  }
}

void store_floats(const float* src, at::ScalarType type, int n, void* dst) {
  switch (type) {
    case at::kFloat: std::memcpy(dst, src, sizeof(float) * n); break;
    case at::kBFloat16: {
      auto* o = static_cast<c10::BFloat16*>(dst);
      for (int j = 0; j < n; ++j) o[j] = static_cast<c10::BFloat16>(src[j]);
      break;
    }
    default: {
      auto* o = static_cast<c10::Half*>(dst);
      for (int j = 0; j < n; ++j) o[j] = static_cast<c10::Half>(src[j]);
    }
  }
}

bool float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

at::Tensor exact_merge(const at::Tensor& query, const at::Tensor& timeline,
                       const at::Tensor& window_start, const at::Tensor& visible,
                       int64_t window, double scale, const at::Tensor& out_c,
                       const at::Tensor& lse_c) {
  TORCH_CHECK(query.dim() == 3 && query.is_contiguous() && float_type(query.scalar_type()),
              "query must be a contiguous float32/bf16/fp16 [T, Hq, d] tensor");
  const int64_t n = query.size(0);
  const int hq = static_cast<int>(query.size(1)), d = static_cast<int>(query.size(2));
  TORCH_CHECK(timeline.dim() == 3 && timeline.is_contiguous() && timeline.size(2) == 2 * d &&
                  float_type(timeline.scalar_type()),
              "timeline must be a contiguous float [L, Hk, 2d] tensor, d as the query's");
  const int hk = static_cast<int>(timeline.size(1));
  TORCH_CHECK(hk > 0 && hq % hk == 0, "query heads must be a multiple of the timeline's KV heads");
  TORCH_CHECK(window_start.scalar_type() == at::kLong && visible.scalar_type() == at::kLong &&
                  window_start.is_contiguous() && visible.is_contiguous() &&
                  window_start.numel() == n && visible.numel() == n,
              "window_start and visible must be contiguous int64 [T]");
  TORCH_CHECK(out_c.scalar_type() == at::kFloat && out_c.is_contiguous() &&
                  out_c.sizes() == query.sizes(),
              "the compressed part must be contiguous float32, shaped as the query");
  TORCH_CHECK(lse_c.scalar_type() == at::kFloat && lse_c.is_contiguous() && lse_c.dim() == 2 &&
                  lse_c.size(0) == n && lse_c.size(1) == hq,
              "the compressed log-sum-exps must be contiguous float32 [T, Hq]");
  TORCH_CHECK(window >= 1, "window must be >= 1");
  const int64_t length = timeline.size(0);
  const int64_t* start = window_start.data_ptr<int64_t>();
  const int64_t* count = visible.data_ptr<int64_t>();
  for (int64_t r = 0; r < n; ++r)
    TORCH_CHECK(count[r] >= 1 && count[r] <= window && start[r] >= 0 &&
                    start[r] + count[r] <= length,
                "row ", r, " reads ", count[r], " exact entries from ", start[r],
                ": needs 1..window entries inside the timeline's ", length);

  at::Tensor out = at::empty_like(query);
  const auto qt = query.scalar_type(), kt = timeline.scalar_type();
  const size_t q_size = query.element_size(), k_size = timeline.element_size();
  const auto* q_bytes = static_cast<const uint8_t*>(query.data_ptr());
  const auto* k_bytes = static_cast<const uint8_t*>(timeline.data_ptr());
  auto* o_bytes = static_cast<uint8_t*>(out.data_ptr());
  const float* comp = out_c.data_ptr<float>();
  const float* lse = lse_c.data_ptr<float>();
  const int g = hq / hk, w_max = static_cast<int>(window);
  const float sc = static_cast<float>(scale);
  // Tiny items (decode: G x W x d per KV head): one thread below 16 of them.
  at::parallel_for(0, n * hk, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> kv(static_cast<size_t>(w_max) * 2 * d), q(d), acc(d), s(w_max);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / hk;
      const int h = static_cast<int>(item % hk), seen = static_cast<int>(count[r]);
      for (int w = 0; w < seen; ++w)
        load_floats(k_bytes + ((start[r] + w) * hk + h) * 2 * d * k_size, kt, 2 * d,
                    &kv[static_cast<size_t>(w) * 2 * d]);
      for (int i = 0; i < g; ++i) {
        const int64_t row = r * hq + h * g + i;  // (row, query head)
        load_floats(q_bytes + row * d * q_size, qt, d, q.data());
        float top = NEG_INF;
        for (int w = 0; w < seen; ++w) {
          s[w] = dot(q.data(), &kv[static_cast<size_t>(w) * 2 * d], d) * sc;
          top = std::max(top, s[w]);
        }
        float total = 0.f;
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int w = 0; w < seen; ++w) {
          const float p = std::exp(s[w] - top);
          total += p;
          const float* v = &kv[static_cast<size_t>(w) * 2 * d + d];
          for (int j = 0; j < d; ++j) acc[j] += p * v[j];
        }
        // Merge: weights e^(lse - max) of the two parts; the exact part is never empty.
        const float lse_e = top + std::log(total), lse_k = lse[row];
        const float both = std::max(lse_e, lse_k);
        const float wk = std::exp(lse_k - both), we = std::exp(lse_e - both);
        const float inv = 1.f / (wk + we), exact_scale = we / total;
        const float* c = comp + row * d;
        for (int j = 0; j < d; ++j) acc[j] = (c[j] * wk + acc[j] * exact_scale) * inv;
        store_floats(acc.data(), qt, d, o_bytes + row * d * q_size);
      }
    }
  });
  return out;
}

}  // namespace
}  // namespace tq

TORCH_LIBRARY_FRAGMENT(TQ_OPS, m) {
  m.def(
      "exact_merge(Tensor query, Tensor timeline, Tensor window_start, Tensor visible, "
      "int window, float scale, Tensor out_c, Tensor lse_c) -> Tensor");
}

TORCH_LIBRARY_IMPL(TQ_OPS, CPU, m) { m.impl("exact_merge", &tq::exact_merge); }
