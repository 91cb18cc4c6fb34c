// The exact part of the exact-window rule on the CPU, merged into the compressed part: one op
// for what exact.py's exact_attention and merge do in a dozen PyTorch calls per layer (on a
// decode step those calls cost the float32 model more than the fused attention itself).
//
// Contract: exact.py's exact_merge_reference. Query row i is step row r = rows[i] (i where rows
// is absent); with s = segment_starts[r], n = visible[r] and m = ring_reads[r], its entries are
// ring[row_ring[r], :, (s + w) mod R] for w < m and the step's own key/value rows
// r - n + 1 + w (rounded through the ring's dtype) for m <= w < n. Query head h (KV head h / G)
// attends over them in its own softmax; the result is merged with the compressed part (out_c,
// lse_c) by the two log-sum-exps. Every row is computed alone, so a row's result does not
// depend on which rows share its step. Float32 throughout; the output is rounded once to the
// query's dtype.

#include "../csrc/ops.h"
#include "../decode/attention_math.h"

namespace tq {
namespace {

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

// x as a value of type t holds it (a float32 model's tokens as its bf16 ring holds them).
float round_to(float x, at::ScalarType t) {
  if (t == at::kBFloat16) return static_cast<float>(static_cast<c10::BFloat16>(x));
  if (t == at::kHalf) return static_cast<float>(static_cast<c10::Half>(x));
  return x;
}

bool float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

bool rows_of_heads(const at::Tensor& t, int64_t d) {  // [n, H, d], heads packed in a row
  return t.dim() == 3 && t.size(2) == d && t.stride(2) == 1 && t.stride(1) == d;
}

const int64_t* index_data(const at::Tensor& t, int64_t n, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kLong && t.is_contiguous() && t.numel() == n, name,
              " must be a contiguous int64 tensor of ", n, " entries");
  return t.data_ptr<int64_t>();
}

}  // namespace

void exact_merge_into(at::Tensor out, const at::Tensor& query, const at::Tensor& key,
                      const at::Tensor& value, const at::Tensor& ring,
                      const std::optional<at::Tensor>& rows, const at::Tensor& segment_starts,
                      const at::Tensor& visible, const at::Tensor& row_ring,
                      const at::Tensor& ring_reads, int64_t window, double scale,
                      const at::Tensor& out_c, const at::Tensor& lse_c) {
  TORCH_CHECK(query.dim() == 3 && float_type(query.scalar_type()) &&
                  rows_of_heads(query, query.size(2)),
              "query must be a float32/bf16/fp16 [T, Hq, d] tensor with contiguous rows");
  const int64_t n = query.size(0), steps = key.size(0);
  const int hq = static_cast<int>(query.size(1)), d = static_cast<int>(query.size(2));
  TORCH_CHECK(rows_of_heads(key, d) && rows_of_heads(value, d) && value.sizes() == key.sizes() &&
                  key.scalar_type() == value.scalar_type() && float_type(key.scalar_type()),
              "key and value must be float [T, Hk, d] tensors of one dtype with contiguous "
              "rows, d as the query's");
  const int hk = static_cast<int>(key.size(1));
  TORCH_CHECK(hk > 0 && hq % hk == 0, "query heads must be a multiple of the KV heads");
  TORCH_CHECK(ring.dim() == 4 && ring.size(1) == hk && ring.size(3) == 2 * d &&
                  ring.stride(3) == 1 && float_type(ring.scalar_type()),
              "the ring must be a float [rings, Hk, R, 2d] tensor with contiguous entries");
  TORCH_CHECK(segment_starts.scalar_type() == at::kInt && segment_starts.is_contiguous() &&
                  segment_starts.numel() == steps,
              "segment_starts must be contiguous int32 [T]");
  const int32_t* first = segment_starts.data_ptr<int32_t>();
  const int64_t* count = index_data(visible, steps, "visible");
  const int64_t* which = index_data(row_ring, steps, "row_ring");
  const int64_t* reads = index_data(ring_reads, steps, "ring_reads");
  const int64_t* pick = rows ? index_data(*rows, n, "rows") : nullptr;
  TORCH_CHECK(out_c.scalar_type() == at::kFloat && out_c.is_contiguous() &&
                  out_c.sizes() == query.sizes(),
              "the compressed part must be contiguous float32, shaped as the query");
  TORCH_CHECK(lse_c.scalar_type() == at::kFloat && lse_c.is_contiguous() && lse_c.dim() == 2 &&
                  lse_c.size(0) == n && lse_c.size(1) == hq,
              "the compressed log-sum-exps must be contiguous float32 [T, Hq]");
  TORCH_CHECK(window >= 1, "window must be >= 1");
  const int64_t ring_slots = ring.size(2);
  TORCH_CHECK(ring_slots >= window, "a ring of ", ring_slots, " slots cannot hold a ", window,
              "-token window");
  for (int64_t i = 0; i < n; ++i) {
    const int64_t r = pick ? pick[i] : i;
    TORCH_CHECK(r >= 0 && r < steps, "row ", i, " is step row ", r, " of ", steps);
    TORCH_CHECK(count[r] >= 1 && count[r] <= window && reads[r] >= 0 && reads[r] < count[r] &&
                    r - count[r] + 1 + reads[r] >= 0 && first[r] >= 0 && which[r] >= 0 &&
                    which[r] < ring.size(0),
                "step row ", r, " reads ", count[r], " exact entries, ", reads[r],
                " of them from ring ", which[r], " from position ", first[r],
                ": needs 1..window entries, the last from the step's own rows, inside the ",
                ring.size(0), " rings");
  }

  TORCH_CHECK(out.sizes() == query.sizes() && out.scalar_type() == query.scalar_type() &&
                  out.is_contiguous(),
              "exact_merge: out must be contiguous, shaped and typed as the query");
  const auto qt = query.scalar_type(), kt = key.scalar_type(), rt = ring.scalar_type();
  const size_t q_size = query.element_size(), k_size = key.element_size();
  const size_t r_size = ring.element_size();
  const auto* q_bytes = static_cast<const uint8_t*>(query.data_ptr());
  const auto* k_bytes = static_cast<const uint8_t*>(key.data_ptr());
  const auto* v_bytes = static_cast<const uint8_t*>(value.data_ptr());
  const auto* r_bytes = static_cast<const uint8_t*>(ring.data_ptr());
  auto* o_bytes = static_cast<uint8_t*>(out.data_ptr());
  const int64_t q_row = query.stride(0), k_row = key.stride(0), v_row = value.stride(0);
  const int64_t ring_stride = ring.stride(0), head_stride = ring.stride(1);
  const int64_t slot_stride = ring.stride(2);
  const float* comp = out_c.data_ptr<float>();
  const float* lse = lse_c.data_ptr<float>();
  const int g = hq / hk, w_max = static_cast<int>(window);
  const float sc = static_cast<float>(scale);
  const bool rounds = rt != kt;
  // Tiny items (decode: G x W x d per KV head): one thread below 16 of them.
  at::parallel_for(0, n * hk, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> kv(static_cast<size_t>(w_max) * 2 * d), q(d), acc(d), s(w_max);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item / hk, r = pick ? pick[i] : i;
      const int h = static_cast<int>(item % hk), seen = static_cast<int>(count[r]);
      const int from_ring = static_cast<int>(reads[r]);
      for (int w = 0; w < seen; ++w) {
        float* entry = &kv[static_cast<size_t>(w) * 2 * d];
        if (w < from_ring) {
          const int64_t slot = (first[r] + w) % ring_slots;
          load_floats(r_bytes + (which[r] * ring_stride + h * head_stride + slot * slot_stride) *
                                    r_size,
                      rt, 2 * d, entry);
          continue;
        }
        const int64_t own = r - seen + 1 + w;
        load_floats(k_bytes + (own * k_row + h * d) * k_size, kt, d, entry);
        load_floats(v_bytes + (own * v_row + h * d) * k_size, kt, d, entry + d);
        if (rounds)
          for (int j = 0; j < 2 * d; ++j) entry[j] = round_to(round_to(entry[j], rt), kt);
      }
      for (int k = 0; k < g; ++k) {
        const int64_t row = i * hq + h * g + k;  // (row, query head)
        load_floats(q_bytes + (i * q_row + (h * g + k) * d) * q_size, qt, d, q.data());
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
}

// exact.py's write_ring_reference: token tokens[e] of the step goes to slot slots[e] of ring blocks[e],
// K then V, rounded to the ring's dtype.
void write_ring(at::Tensor ring, const at::Tensor& key, const at::Tensor& value,
                const at::Tensor& tokens, const at::Tensor& blocks, const at::Tensor& slots) {
  TORCH_CHECK(ring.dim() == 4 && ring.stride(3) == 1 && float_type(ring.scalar_type()),
              "the ring must be a float [rings, Hk, R, 2d] tensor with contiguous entries");
  const int64_t d = ring.size(3) / 2, hk = ring.size(1);
  TORCH_CHECK(rows_of_heads(key, d) && rows_of_heads(value, d) && value.sizes() == key.sizes() &&
                  key.size(1) == hk && key.scalar_type() == value.scalar_type() &&
                  float_type(key.scalar_type()),
              "key and value must be float [T, Hk, d] tensors of one dtype with contiguous rows, "
              "shaped as the ring's entries");
  const int64_t n = tokens.numel();
  const int64_t* token = index_data(tokens, n, "tokens");
  const int64_t* block = index_data(blocks, n, "blocks");
  const int64_t* slot = index_data(slots, n, "slots");
  for (int64_t e = 0; e < n; ++e)
    TORCH_CHECK(token[e] >= 0 && token[e] < key.size(0) && block[e] >= 0 &&
                    block[e] < ring.size(0) && slot[e] >= 0 && slot[e] < ring.size(2),
                "ring write ", e, ": token ", token[e], " to ring ", block[e], " slot ", slot[e],
                " is out of range");
  const auto kt = key.scalar_type(), rt = ring.scalar_type();
  const size_t k_size = key.element_size(), r_size = ring.element_size();
  const auto* k_bytes = static_cast<const uint8_t*>(key.data_ptr());
  const auto* v_bytes = static_cast<const uint8_t*>(value.data_ptr());
  auto* r_bytes = static_cast<uint8_t*>(ring.data_ptr());
  std::vector<float> entry(2 * d);
  for (int64_t e = 0; e < n; ++e)
    for (int64_t h = 0; h < hk; ++h) {
      load_floats(k_bytes + (token[e] * key.stride(0) + h * d) * k_size, kt, d, entry.data());
      load_floats(v_bytes + (token[e] * value.stride(0) + h * d) * k_size, kt, d,
                  entry.data() + d);
      store_floats(entry.data(), rt, 2 * d,
                   r_bytes + (block[e] * ring.stride(0) + h * ring.stride(1) +
                              slot[e] * ring.stride(2)) * r_size);
    }
}

namespace {

at::Tensor exact_merge(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                       const at::Tensor& ring, const std::optional<at::Tensor>& rows,
                       const at::Tensor& segment_starts, const at::Tensor& visible,
                       const at::Tensor& row_ring, const at::Tensor& ring_reads,
                       int64_t window, double scale, const at::Tensor& out_c,
                       const at::Tensor& lse_c) {
  at::Tensor out = at::empty(query.sizes(), query.options());
  exact_merge_into(out, query, key, value, ring, rows, segment_starts, visible, row_ring,
                   ring_reads, window, scale, out_c, lse_c);
  return out;
}

}  // namespace
}  // namespace tq

TORCH_LIBRARY_FRAGMENT(TQ_OPS, m) {
  m.def(
      "exact_merge(Tensor query, Tensor key, Tensor value, Tensor ring, Tensor? rows, "
      "Tensor segment_starts, Tensor visible, Tensor row_ring, Tensor ring_reads, int window, "
      "float scale, Tensor out_c, Tensor lse_c) -> Tensor");
  m.def(
      "write_ring(Tensor(a!) ring, Tensor key, Tensor value, Tensor tokens, Tensor blocks, "
      "Tensor slots) -> ()");
}

TORCH_LIBRARY_IMPL(TQ_OPS, CPU, m) {
  m.impl("exact_merge", &tq::exact_merge);
  m.impl("write_ring", &tq::write_ring);
}
