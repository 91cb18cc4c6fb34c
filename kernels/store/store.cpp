#include "row_indexer.h"

// MKL's C entry point (mkl_service.h's mkl_set_num_threads_local; the lowercase symbol is the
// Fortran one, taking a pointer), where torch ships MKL: returns the previous local count
// (0: the global one). Null where torch has no MKL; were another MKL loaded first, the call
// would set that one's count and only the speed-up would be lost.
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));

namespace tq {
namespace {

// Store: quantize a step's keys and values and pack them into their records (the contract:
// kernels/store/reference.py).
//
// The records must be the bytes store_kv_reference writes. Everything rounding could change
// (the matrix products, and the norms, which ATen reduces in an order of its own) comes from
// the ATen calls the reference makes, on tensors of the same shapes; the steps between them
// are single IEEE operations done here in the reference's order. The reference's many small
// ops (packing, record assembly, the scatter) were what cost the time.

// to_fp16_norm: a non-finite norm becomes 0, a larger one 65504; then round to nearest even.
inline void store_fp16_norm(uint8_t* p, float n) {
  if (!std::isfinite(n)) n = 0.f;
  if (n > 65504.f) n = 65504.f;
  const uint16_t bits = c10::Half(n).x;
  std::memcpy(p, &bits, 2);
}

// y - n * c rounded twice, as the reference's two tensor ops: a fused multiply-add would
// change the residual's last bits, and so its signs and norm.
__attribute__((noinline, optimize("fp-contract=off"))) void residual_row(
    const float* y, const float* c, float n, int64_t d, float* r) {
  for (int64_t j = 0; j < d; ++j) {
    const float t = n * c[j];
    r[j] = y[j] - t;
  }
}

// A decode step's products ([T * Hk, d] x [d, d], T a few tokens) run on this thread alone:
// MKL's sgemm otherwise wakes the OpenMP pool for them, which costs more than the product (one
// token's store on 2 threads: 41-47 us with the pool, 33 us without, as on 1 thread). The
// guard sets MKL's thread-local thread count to 1 for up to SERIAL_ROWS rows and restores it;
// torch builds without MKL (no such symbol) keep their own BLAS as it is. The products split
// their output, not their sums, so the bits are the same either way (tests compare the records
// with the reference's at 1, 2 and 4 threads).
constexpr int64_t SERIAL_ROWS = 256;
class SerialProducts {
 public:
  explicit SerialProducts(int64_t rows)
      : active_(rows <= SERIAL_ROWS && MKL_Set_Num_Threads_Local != nullptr) {
    if (active_) saved_ = MKL_Set_Num_Threads_Local(1);
  }
  ~SerialProducts() {
    if (active_) MKL_Set_Num_Threads_Local(saved_);
  }
  SerialProducts(const SerialProducts&) = delete;
  SerialProducts& operator=(const SerialProducts&) = delete;

 private:
  bool active_;
  int saved_ = 0;
};

struct StoreTarget {
  uint8_t* cache;
  const int64_t* slots;
  int64_t heads, block_size, sb, sh, ss;
  uint8_t* record(int64_t row) const {
    const int64_t slot = slots[row / heads];
    return cache + (slot / block_size) * sb + (row % heads) * sh + (slot % block_size) * ss;
  }
};

// Rows of x [T, H, d] rotated, indexed and packed at idx_off; returns what the norms need:
// (x as float, y, centroids at the indices).
std::tuple<at::Tensor, at::Tensor, at::Tensor> index_rows(
    const at::Tensor& x_in, const at::Tensor& rotation, const at::Tensor& centroids,
    const at::Tensor& boundaries, int bits, int64_t idx_off, const StoreTarget& target) {
  at::Tensor x = x_in.to(at::kFloat);  // the reference's x.float()
  // x @ R^T over x's rows as one 2-d product, as the reference (rotation.rows_times) computes
  // it: a strided 3-d x (a float32 model's keys, sliced from the fused qkv projection) in
  // at::matmul ran as a batched product per token, 3.5x slower for a 2,048-token chunk.
  at::Tensor y = at::mm(x.reshape({-1, x.size(-1)}), rotation.t()).view(x.sizes());
  at::Tensor ynorm = at::linalg_vector_norm(y, 2, {-1}, false, std::nullopt).contiguous();
  const int64_t rows = y.size(0) * y.size(1), d = y.size(2);
  at::Tensor c = at::empty_like(y);
  const float* yp = y.data_ptr<float>();
  const float* yn = ynorm.data_ptr<float>();
  const float* cent = centroids.data_ptr<float>();
  const float* bnd = boundaries.data_ptr<float>();
  TORCH_CHECK(boundaries.numel() == (int64_t{1} << bits) - 1, "store: boundaries need 2^bits - 1 entries");
  float* cp = c.data_ptr<float>();
  const RowIndexer indexer(bnd, cent, bits, static_cast<int>(d));
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> u(d);
    std::vector<int32_t> idx(d);
    for (int64_t row = begin; row < end; ++row) {
      float n = yn[row];
      if (n < 1e-30f) n = 1e-30f;  // clamp_min(1e-30), which keeps a NaN
      for (int64_t j = 0; j < d; ++j) u[j] = yp[row * d + j] / n;
      indexer(u.data(), idx.data(), target.record(row) + idx_off, cp + row * d);
    }
  });
  return {x, y, c};
}

// mse mode: the stored norm is ||x|| / ||c[idx]|| (quantizer._gain_norms, gain "norm").
void store_mse_norms(const at::Tensor& x, const at::Tensor& c, int64_t norm_off,
                     const StoreTarget& target) {
  at::Tensor xnorm = at::linalg_vector_norm(x, 2, {-1}, false, std::nullopt).contiguous();
  at::Tensor cnorm = at::linalg_vector_norm(c, 2, {-1}, false, std::nullopt).contiguous();
  const float* xn = xnorm.data_ptr<float>();
  const float* cn = cnorm.data_ptr<float>();
  for (int64_t row = 0; row < xnorm.numel(); ++row) {
    store_fp16_norm(target.record(row) + norm_off, xn[row] / (cn[row] > 0 ? cn[row] : 1.f));
  }
}

// Split keys (tq_vllm/quant/outliers.py): each head's channels gathered into its regular and
// outlier parts (key_order [Hk, d]: regular channels, then outlier channels), each part
// quantized by its own rotation and codebook, as two mse keys; a key with a non-finite
// coordinate gets zero norms in both parts, as SplitKeyQuantizer.quantize gives it.
void store_split_keys(const at::Tensor& key, const Layout& L, const at::Tensor& key_order,
                      const at::Tensor& rotation, const at::Tensor& centroids,
                      const at::Tensor& boundaries, const at::Tensor& outlier_rotation,
                      const at::Tensor& outlier_centroids,
                      const at::Tensor& outlier_boundaries, const StoreTarget& target) {
  const at::Tensor x = key.to(at::kFloat);
  const at::Tensor parts = x.gather(-1, key_order.expand(x.sizes()));
  const int64_t d = x.size(-1), regular = d - L.key_outliers;
  auto [rx, ry, rc] = index_rows(parts.slice(-1, 0, regular), rotation, centroids, boundaries,
                                 L.key_bits, L.key_indices, target);
  store_mse_norms(rx, rc, L.key_norm, target);
  auto [ox, oy, oc] = index_rows(parts.slice(-1, regular, d), outlier_rotation,
                                 outlier_centroids, outlier_boundaries, L.key_outlier_bits,
                                 L.key_outlier_indices, target);
  store_mse_norms(ox, oc, L.key_outlier_norm, target);
  const at::Tensor finite = x.isfinite().all(-1).contiguous();
  const bool* ok = finite.data_ptr<bool>();
  for (int64_t row = 0; row < finite.numel(); ++row) {
    if (ok[row]) continue;
    store_fp16_norm(target.record(row) + L.key_norm, 0.f);
    store_fp16_norm(target.record(row) + L.key_outlier_norm, 0.f);
  }
}

void store(const at::Tensor& key_in, const at::Tensor& value_in, at::Tensor kv_cache,
           const at::Tensor& slot_mapping, const at::Tensor& value_rotation,
           const at::Tensor& value_centroids, const at::Tensor& value_boundaries,
           const at::Tensor& key_rotation, const at::Tensor& key_centroids,
           const at::Tensor& key_boundaries, const std::optional<at::Tensor>& qjl,
           at::IntArrayRef layout, const std::optional<at::Tensor>& key_order,
           const std::optional<at::Tensor>& outlier_rotation,
           const std::optional<at::Tensor>& outlier_centroids,
           const std::optional<at::Tensor>& outlier_boundaries) {
  paged_cache(kv_cache);  // checks the view: records contiguous, any block and head strides
  const Layout L = parse_layout(layout, key_in.size(-1), kv_cache.size(3));
  TORCH_CHECK(!L.uniform_values, "store: no fused store for uniform values");
  TORCH_CHECK(!L.key_outliers || (key_order && outlier_rotation && outlier_centroids &&
                                  outlier_boundaries),
              "store: split keys need key_order and the outlier part's rotation, centroids "
              "and boundaries");
  const int key_bits = L.key_bits, value_bits = L.value_bits;
  const bool prod = L.prod;
  at::Tensor slots = slot_mapping.to(at::kLong).contiguous();
  at::Tensor key = key_in, value = value_in;
  // Tokens with a negative slot (vLLM's padding) are dropped as the reference drops them, so
  // that the matrix products run on the same rows and round the same way.
  std::vector<int64_t> keep;
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t capacity = kv_cache.size(0) * kv_cache.size(2);
  for (int64_t t = 0; t < slots.numel(); ++t) {
    TORCH_CHECK(sp[t] < capacity, "store: slot_mapping[", t, "] = ", sp[t],
                " is past the cache's ", capacity, " slots");
    if (sp[t] >= 0) keep.push_back(t);
  }
  if (static_cast<int64_t>(keep.size()) < slots.numel()) {
    if (keep.empty()) return;
    const at::Tensor rows = at::tensor(keep, at::kLong);
    key = key.index_select(0, rows);
    value = value.index_select(0, rows);
    slots = slots.index_select(0, rows);
  }
  const StoreTarget target{kv_cache.data_ptr<uint8_t>(), slots.data_ptr<int64_t>(),
                           kv_cache.size(1),  kv_cache.size(2),
                           kv_cache.stride(0), kv_cache.stride(1),
                           kv_cache.stride(2)};
  const SerialProducts serial(key.size(0) * key.size(1));
  auto [vx, vy, vc] = index_rows(value, value_rotation, value_centroids, value_boundaries,
                                 value_bits, L.value_indices, target);
  store_mse_norms(vx, vc, L.value_norm, target);
  if (L.key_outliers) {
    store_split_keys(key, L, *key_order, key_rotation, key_centroids, key_boundaries,
                     *outlier_rotation, *outlier_centroids, *outlier_boundaries, target);
    return;
  }
  auto [kx, ky, kc] = index_rows(key, key_rotation, key_centroids, key_boundaries, key_bits,
                                 L.key_indices, target);
  if (!prod) {
    store_mse_norms(kx, kc, L.key_norm, target);
    return;
  }
  // prod: the stored norm is ||x||; the residual of that (rounded) norm keeps QJL signs.
  TORCH_CHECK(qjl.has_value(), "store: prod mode needs the QJL matrix");
  at::Tensor xnorm = at::linalg_vector_norm(kx, 2, {-1}, false, std::nullopt).contiguous();
  const float* xn = xnorm.data_ptr<float>();
  const int64_t rows = xnorm.numel(), d = ky.size(2);
  at::Tensor residual = at::empty_like(ky);
  const float* yp = ky.data_ptr<float>();
  const float* cp = kc.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  std::vector<int32_t> signs(d);
  for (int64_t row = 0; row < rows; ++row) {
    uint8_t* rec = target.record(row);
    store_fp16_norm(rec + L.key_norm, xn[row]);
    const float n = load_half(rec + L.key_norm);
    residual_row(yp + row * d, cp + row * d, n, d, rp + row * d);
  }
  at::Tensor proj = at::matmul(residual, qjl->t()).contiguous();  // residual @ S^T
  at::Tensor rnorm = at::linalg_vector_norm(residual, 2, {-1}, false, std::nullopt).contiguous();
  const float* pp = proj.data_ptr<float>();
  const float* rn = rnorm.data_ptr<float>();
  for (int64_t row = 0; row < rows; ++row) {
    uint8_t* rec = target.record(row);
    store_fp16_norm(rec + L.key_residual_norm, rn[row]);
    for (int64_t j = 0; j < d; ++j) signs[j] = pp[row * d + j] >= 0;
    pack_indices(signs.data(), d, 1, rec + L.key_signs);
  }
}


}  // namespace
}  // namespace tq

TORCH_LIBRARY_FRAGMENT(TQ_OPS, m) {
  m.def(
      "store(Tensor key, Tensor value, Tensor(a!) kv_cache, Tensor slot_mapping, "
      "Tensor value_rotation, Tensor value_centroids, Tensor value_boundaries, "
      "Tensor key_rotation, Tensor key_centroids, Tensor key_boundaries, Tensor? qjl, "
      "int[] layout, Tensor? key_order=None, Tensor? outlier_rotation=None, "
      "Tensor? outlier_centroids=None, Tensor? outlier_boundaries=None) -> ()");
}

TORCH_LIBRARY_IMPL(TQ_OPS, CPU, m) { m.impl("store", &tq::store); }
