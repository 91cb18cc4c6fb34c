// A CPU decode step under the exact-window rule, whole: the step's tokens into their records
// (store), each row's attention over its compressed positions (attention), merged with its
// exact ones (exact_merge_into, straight into vLLM's output buffer), and the ring's write.
//
// Contract: kernels/window/cpu_exact.py's decode_step. Why one op: in a served model every
// layer's weights stream through the caches between two of its attention calls, so each
// Python function and each op dispatch runs cold; four ops and their Python wrappers cost a
// layer-step 250 us at 256 tokens of context, where vLLM's own attention took 90.

#include "../csrc/float_rows.h"
#include "../csrc/ops.h"

#include <torch/library.h>

namespace tq {
namespace {

void decode_step(const at::Tensor& query, const at::Tensor& key, const at::Tensor& value,
                 at::Tensor out, at::Tensor kv_cache, const at::Tensor& slot_mapping,
                 const at::Tensor& block_table, at::Tensor ring,
                 const at::Tensor& segment_starts, const at::Tensor& visible,
                 const at::Tensor& row_ring, const at::Tensor& ring_reads,
                 const at::Tensor& write_tokens, const at::Tensor& write_blocks,
                 const at::Tensor& write_slots, int64_t window, double scale, double sparse_v,
                 bool bf16_dots, const std::optional<at::Tensor>& rotated_query,
                 const std::optional<at::Tensor>& rotated_qs, const at::Tensor& key_codebook,
                 const at::Tensor& value_codebook,
                 const std::optional<at::Tensor>& outlier_codebook, const at::Tensor& rotation,
                 const at::Tensor& rotation_t, double qjl_coef, const at::Tensor& value_rotation_t,
                 const at::Tensor& value_centroids, const at::Tensor& value_boundaries,
                 const at::Tensor& key_rotation_t, const at::Tensor& key_centroids,
                 const at::Tensor& key_boundaries, const std::optional<at::Tensor>& qjl_t,
                 at::IntArrayRef layout, const std::optional<at::Tensor>& key_order,
                 const std::optional<at::Tensor>& outlier_rotation_t,
                 const std::optional<at::Tensor>& outlier_centroids,
                 const std::optional<at::Tensor>& outlier_boundaries) {
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3 && slot_mapping.dim() == 1,
              "decode_step: query and key must be [T, H, d], slot_mapping 1-d");
  const int64_t rows = query.size(0), hq = query.size(1), d = query.size(2);
  TORCH_CHECK(slot_mapping.size(0) == rows && key.size(0) == rows,
              "decode_step: one slot and one key per query row");
  TORCH_CHECK(query.stride(2) == 1 && query.stride(1) == d,
              "decode_step: the query's heads must lie together in a row");
  store(key, value, kv_cache, slot_mapping, value_rotation_t, value_centroids, value_boundaries, key_rotation_t, key_centroids,
        key_boundaries, qjl_t, layout, key_order, outlier_rotation_t, outlier_centroids,
        outlier_boundaries);

  // Plain mse keys' queries are rotated and scaled in the attention op, as float32 rows; the
  // others arrive so. Scratch from the heap, views not made: ATen calls cost more cold.
  const bool rotate = !rotated_query.has_value();
  const auto floats = query.options().dtype(at::kFloat);
  std::vector<float> q_rows(rotate ? rows * hq * d : 0), lse_rows(rows * hq);
  if (rotate) {
    const auto* bytes = static_cast<const uint8_t*>(query.data_ptr());
    for (int64_t r = 0; r < rows; ++r)
      load_floats(bytes + r * query.stride(0) * query.element_size(), query.scalar_type(),
                  static_cast<int>(hq * d), &q_rows[r * hq * d]);
  }
  const at::Tensor q = rotate ? at::from_blob(q_rows.data(), {rows, hq, d}, floats)
                              : *rotated_query;
  const at::Tensor lse = at::from_blob(lse_rows.data(), {rows, hq}, floats);
  const at::Tensor compressed = attention(
      q, rotated_qs ? *rotated_qs : q, kv_cache, block_table, at::Tensor(),
      segment_starts, key_codebook, value_codebook, layout, qjl_coef, 1, 0, outlier_codebook,
      sparse_v, 0, lse, bf16_dots, rotation, rotation_t, rotate, scale);
  exact_merge_into(out, query, key, value, ring, std::nullopt, segment_starts, visible, row_ring,
                   ring_reads, window, scale, compressed, lse);
  write_ring(ring, key, value, write_tokens, write_blocks, write_slots);
}

}  // namespace
}  // namespace tq

TORCH_LIBRARY_FRAGMENT(TQ_OPS, m) {
  m.def(
      "decode_step(Tensor query, Tensor key, Tensor value, Tensor(a!) out, Tensor(b!) kv_cache, "
      "Tensor slot_mapping, Tensor block_table, Tensor(c!) ring, Tensor segment_starts, "
      "Tensor visible, Tensor row_ring, Tensor ring_reads, Tensor write_tokens, "
      "Tensor write_blocks, Tensor write_slots, int window, float scale, float sparse_v, "
      "bool bf16_dots, Tensor? rotated_query, Tensor? rotated_qs, Tensor key_codebook, "
      "Tensor value_codebook, Tensor? outlier_codebook, Tensor rotation, Tensor rotation_t, "
      "float qjl_coef, "
      "Tensor value_rotation_t, Tensor value_centroids, Tensor value_boundaries, "
      "Tensor key_rotation_t, Tensor key_centroids, Tensor key_boundaries, Tensor? qjl_t, "
      "int[] layout, Tensor? key_order=None, Tensor? outlier_rotation_t=None, "
      "Tensor? outlier_centroids=None, Tensor? outlier_boundaries=None) -> ()");
}

TORCH_LIBRARY_IMPL(TQ_OPS, CPU, m) { m.impl("decode_step", &tq::decode_step); }
