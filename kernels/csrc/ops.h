// The ops' C++ entry points, for ops built from others (window/decode_step.cpp). Each is
// registered under its own name too; their contracts are the Python wrappers' (store:
// kernels/store/cpu_store.py, attention: kernels/decode/cpu_decode.py, exact_merge_into and
// write_ring: kernels/window/cpu_exact.py).
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace tq {

void store(const at::Tensor& key, const at::Tensor& value, at::Tensor kv_cache,
           const at::Tensor& slot_mapping, const at::Tensor& value_rotation_t,
           const at::Tensor& value_centroids, const at::Tensor& value_boundaries,
           const at::Tensor& key_rotation_t, const at::Tensor& key_centroids,
           const at::Tensor& key_boundaries, const std::optional<at::Tensor>& qjl_t,
           at::IntArrayRef layout, const std::optional<at::Tensor>& key_order,
           const std::optional<at::Tensor>& outlier_rotation_t,
           const std::optional<at::Tensor>& outlier_centroids,
           const std::optional<at::Tensor>& outlier_boundaries);

at::Tensor attention(const at::Tensor& q, const at::Tensor& qs, const at::Tensor& kv_cache,
                     const at::Tensor& block_table, const at::Tensor& query_start_loc,
                     const at::Tensor& seq_lens, const at::Tensor& key_centroids,
                     const at::Tensor& value_centroids, at::IntArrayRef layout, double qjl_coef,
                     int64_t rows_per_tile, int64_t num_splits,
                     const std::optional<at::Tensor>& outlier_centroids, double sparse_v,
                     int64_t sliding_window, const std::optional<at::Tensor>& lse_out,
                     bool bf16_dots, const std::optional<at::Tensor>& rotation,
                     const std::optional<at::Tensor>& rotation_t, bool rotate_queries,
                     double scale);

// exact_merge's result written into out (shaped and typed as the query, contiguous).
void exact_merge_into(at::Tensor out, const at::Tensor& query, const at::Tensor& key,
                      const at::Tensor& value, const at::Tensor& ring,
                      const std::optional<at::Tensor>& rows, const at::Tensor& segment_starts,
                      const at::Tensor& visible, const at::Tensor& row_ring,
                      const at::Tensor& ring_reads, int64_t window, double scale,
                      const at::Tensor& out_c, const at::Tensor& lse_c);

void write_ring(at::Tensor ring, const at::Tensor& key, const at::Tensor& value,
                const at::Tensor& tokens, const at::Tensor& blocks, const at::Tensor& slots);

}  // namespace tq
