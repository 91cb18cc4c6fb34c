#include "../csrc/ops.h"
#include "../decode/attention_math.h"
#include "row_indexer.h"

namespace tq {
namespace {

// Store: quantize a step's keys and values and pack them into their records (the contract:
// kernels/store/reference.py), one (token, KV head) row at a time: its rotation, norms, search
// and packing in registers and a few hundred bytes of scratch, in an order of its own that does
// not depend on the other rows. So a token's record is the same whichever tokens share its
// step (a prefill chunk, a decode batch, a speculative verify), and a decode step's store is
// one call with no tensor allocated. The reference's matrix products and norms are ATen's,
// which round in their own orders (and the BLAS by the product's shape): the records can
// differ from its bytes where a rotated coordinate lies within rounding of a bucket boundary
// and where a norm rounds to the neighbouring fp16 (tests/kernels/test_cpu_store.py bounds both).
// Through 2026-12-06 this op made the reference's ATen calls to write its exact bytes: a dozen
// calls for one decode token, 80-100 us per layer in a served model against vLLM's 12.

// to_fp16_norm: a non-finite norm becomes 0, a larger one 65504; then round to nearest even.
inline void store_fp16_norm(uint8_t* p, float n) {
  if (!std::isfinite(n)) n = 0.f;
  if (n > 65504.f) n = 65504.f;
  const uint16_t bits = c10::Half(n).x;
  std::memcpy(p, &bits, 2);
}

inline float norm(const float* x, int n) { return std::sqrt(dot(x, x, n)); }

// y - n * c rounded twice, as the reference's two tensor ops: a fused multiply-add would
// change the residual's last bits, and so its signs and norm.
__attribute__((noinline, optimize("fp-contract=off"))) void residual_row(
    const float* y, const float* c, float n, int d, float* r) {
  for (int j = 0; j < d; ++j) {
    const float t = n * c[j];
    r[j] = y[j] - t;
  }
}

// One quantizer of rows of n floats (quantizer.py): its rotation as R^T (combine_rows' form),
// its codebook's search and packing, and where its fields sit in a record.
struct Part {
  const float* rotation_t;
  RowIndexer indexer;
  int n, indices;  // coordinates; the packed indices' offset
  // A randomized Hadamard rotation (power-of-two head_dims 16..256): its signs, applied by the
  // fast transform. The dense products were 40% of the store's time on AVX-512; the transform
  // is about a tenth of it there, a fifth on AVX2 (2,048 tokens, 1 thread, rotations skipped
  // in a throwaway build to compare).
  std::vector<float> signs;

  Part(const at::Tensor& rotation_t, const at::Tensor& centroids, const at::Tensor& boundaries,
       int bits, int n, int indices)
      : rotation_t(rotation_t.data_ptr<float>()),
        indexer(checked_indexer(rotation_t, centroids, boundaries, bits, n)), n(n),
        indices(indices), signs(hadamard_signs(this->rotation_t, n)) {}

  // y = R x
  void rotate(const float* x, float* y) const {
    if (signs.empty()) return combine_rows(rotation_t, x, n, 1.f, y);
    hadamard_rows(signs.data(), std::fabs(rotation_t[0]), x, n, y);
  }

  // The indexer reads the codebook as it is built: the tensors are checked first.
  static RowIndexer checked_indexer(const at::Tensor& rotation_t, const at::Tensor& centroids,
                                    const at::Tensor& boundaries, int bits, int n) {
    TORCH_CHECK(rotation_t.scalar_type() == at::kFloat && rotation_t.is_contiguous() &&
                    rotation_t.numel() == int64_t{n} * n,
                "store: a rotation must be a contiguous float32 [", n, ", ", n, "] tensor");
    TORCH_CHECK(centroids.scalar_type() == at::kFloat && centroids.is_contiguous() &&
                    centroids.numel() == (int64_t{1} << bits) &&
                    boundaries.scalar_type() == at::kFloat && boundaries.is_contiguous() &&
                    boundaries.numel() == (int64_t{1} << bits) - 1,
                "store: centroids and boundaries must be contiguous float32 with 2^bits and "
                "2^bits - 1 entries");
    return RowIndexer(boundaries.data_ptr<float>(), centroids.data_ptr<float>(), bits, n);
  }
};

// Per thread: a value's and a key's row at each stage (x the input, y its rotation, parts a
// split key's channel order).
struct Scratch {
  std::vector<float> x, key, parts, y, key_y, u, c, r, proj;
  std::vector<int32_t> idx;
  explicit Scratch(int d)
      : x(d), key(d), parts(d), y(d), key_y(d), u(d), c(d), r(d), proj(d), idx(d) {}
};

// x [P.n] with y its rotation, searched and packed into rec; c gets the centroids at its
// indices. Returns ||x||. u = y / max(||y||, 1e-30), as the reference's clamp_min (which keeps
// a NaN).
float index_row(const Part& P, const float* x, const float* y, uint8_t* rec, Scratch& s) {
  float ny = norm(y, P.n);
  if (ny < 1e-30f) ny = 1e-30f;
  for (int j = 0; j < P.n; ++j) s.u[j] = y[j] / ny;
  P.indexer(s.u.data(), s.idx.data(), rec + P.indices, s.c.data());
  return norm(x, P.n);
}

// mse mode: the stored norm is ||x|| / ||c[idx]|| (quantizer._gain_norms, gain "norm"); y is
// x rotated.
void store_mse(const Part& P, const float* x, const float* y, int norm_off, uint8_t* rec,
               Scratch& s) {
  const float nx = index_row(P, x, y, rec, s);
  const float nc = norm(s.c.data(), P.n);
  store_fp16_norm(rec + norm_off, nx / (nc > 0 ? nc : 1.f));
}

// prod mode: the stored norm is ||x||; the residual of that (rounded) norm keeps QJL signs of
// S r (S^T given) and its own norm. y is x rotated.
void store_prod(const Part& P, const float* qjl_t, const Layout& L, const float* x,
                const float* y, uint8_t* rec, Scratch& s) {
  store_fp16_norm(rec + L.key_norm, index_row(P, x, y, rec, s));
  residual_row(y, s.c.data(), load_half(rec + L.key_norm), P.n, s.r.data());
  combine_rows(qjl_t, s.r.data(), P.n, 1.f, s.proj.data());
  store_fp16_norm(rec + L.key_residual_norm, norm(s.r.data(), P.n));
  for (int j = 0; j < P.n; ++j) s.idx[j] = s.proj[j] >= 0;
  pack_indices(s.idx.data(), P.n, 1, rec + L.key_signs);
}

// Split keys (tq_vllm/quant/outliers.py): the head's channels in key_order (regular channels,
// then outlier channels), each part quantized as an mse key of its own; a key with a
// non-finite coordinate gets zero norms in both parts, as SplitKeyQuantizer.quantize gives it.
void store_split(const Part& regular, const Part& outlier, const int64_t* order,
                 const Layout& L, const float* x, uint8_t* rec, Scratch& s) {
  const int d = regular.n + outlier.n;
  std::vector<float>& parts = s.parts;
  bool finite = true;
  for (int j = 0; j < d; ++j) {
    parts[j] = x[order[j]];
    finite = finite && std::isfinite(x[j]);
  }
  float* y = s.key_y.data();
  regular.rotate(parts.data(), y);
  outlier.rotate(parts.data() + regular.n, y + regular.n);
  store_mse(regular, parts.data(), y, L.key_norm, rec, s);
  store_mse(outlier, parts.data() + regular.n, y + regular.n, L.key_outlier_norm, rec, s);
  if (!finite) {
    store_fp16_norm(rec + L.key_norm, 0.f);
    store_fp16_norm(rec + L.key_outlier_norm, 0.f);
  }
}

// [T, H, d] rows of a float dtype, any token and head strides (vLLM's key and value are views
// of its fused qkv projection).
struct Rows {
  const char* base;
  at::ScalarType type;
  int64_t heads, st, sh;  // byte strides
  const void* row(int64_t t, int64_t h) const { return base + t * st + h * sh; }
};

Rows rows_of(const at::Tensor& x, int64_t tokens, int64_t heads, int64_t d, const char* name) {
  TORCH_CHECK(x.dim() == 3 && x.size(0) == tokens && x.size(1) == heads && x.size(2) == d &&
                  x.stride(2) == 1,
              "store: ", name, " must be [", tokens, ", ", heads, ", ", d,
              "] with contiguous rows");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 ||
                  x.scalar_type() == at::kHalf,
              "store: ", name, " must be float32, bf16 or fp16");
  const int64_t size = x.element_size();
  return Rows{static_cast<const char*>(x.data_ptr()), x.scalar_type(), heads,
              x.stride(0) * size, x.stride(1) * size};
}

}  // namespace

void store(const at::Tensor& key, const at::Tensor& value, at::Tensor kv_cache,
           const at::Tensor& slot_mapping, const at::Tensor& value_rotation_t,
           const at::Tensor& value_centroids, const at::Tensor& value_boundaries,
           const at::Tensor& key_rotation_t, const at::Tensor& key_centroids,
           const at::Tensor& key_boundaries, const std::optional<at::Tensor>& qjl_t,
           at::IntArrayRef layout, const std::optional<at::Tensor>& key_order,
           const std::optional<at::Tensor>& outlier_rotation_t,
           const std::optional<at::Tensor>& outlier_centroids,
           const std::optional<at::Tensor>& outlier_boundaries) {
  const PagedCache C = paged_cache(kv_cache);  // records contiguous, any block and head strides
  const int64_t tokens = key.size(0), hk = C.hk;
  const int d = static_cast<int>(key.size(-1));
  const Layout L = parse_layout(layout, d, C.record);
  TORCH_CHECK(!L.uniform_values, "store: no fused store for uniform values");
  const Rows keys = rows_of(key, tokens, hk, d, "key"), values = rows_of(value, tokens, hk, d, "value");
  TORCH_CHECK(slot_mapping.dim() == 1 && slot_mapping.size(0) == tokens,
              "store: slot_mapping needs one slot per token");
  // vLLM's int64 slots as they are: even a no-op .to() is a dispatch, costly in a cold step.
  const bool as_is = slot_mapping.scalar_type() == at::kLong && slot_mapping.is_contiguous();
  const at::Tensor slots = as_is ? slot_mapping : slot_mapping.to(at::kLong).contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t capacity = C.num_blocks * C.block_size;
  for (int64_t t = 0; t < tokens; ++t)  // before any write: a bad slot writes nothing
    TORCH_CHECK(sp[t] < capacity, "store: slot_mapping[", t, "] = ", sp[t],
                " is past the cache's ", capacity, " slots");

  const Part value_part(value_rotation_t, value_centroids, value_boundaries, L.value_bits, d,
                        L.value_indices);
  const int regular = d - L.key_outliers;
  const Part key_part(key_rotation_t, key_centroids, key_boundaries, L.key_bits, regular,
                      L.key_indices);
  std::optional<Part> outlier_part;
  const int64_t* order = nullptr;
  if (L.key_outliers) {
    TORCH_CHECK(key_order && outlier_rotation_t && outlier_centroids && outlier_boundaries,
                "store: split keys need key_order and the outlier part's rotation, centroids "
                "and boundaries");
    TORCH_CHECK(key_order->scalar_type() == at::kLong && key_order->is_contiguous() &&
                    key_order->numel() == hk * d,
                "store: key_order must be a contiguous int64 [Hk, d] tensor");
    order = key_order->data_ptr<int64_t>();
    outlier_part.emplace(*outlier_rotation_t, *outlier_centroids, *outlier_boundaries,
                         L.key_outlier_bits, L.key_outliers, L.key_outlier_indices);
  }
  const float* qjl = nullptr;
  if (L.prod) {
    TORCH_CHECK(qjl_t && qjl_t->scalar_type() == at::kFloat && qjl_t->is_contiguous() &&
                    qjl_t->numel() == int64_t{d} * d,
                "store: prod mode needs S^T, a contiguous float32 [d, d] tensor");
    qjl = qjl_t->data_ptr<float>();
  }

  uint8_t* cache = kv_cache.data_ptr<uint8_t>();
  // Rows of one token and head each; a decode step's few rows stay on this thread.
  at::parallel_for(0, tokens * hk, 16, [&](int64_t begin, int64_t end) {
    Scratch s(d);
    float *x = s.x.data(), *y = s.y.data(), *key = s.key.data(), *key_y = s.key_y.data();
    for (int64_t row = begin; row < end; ++row) {
      const int64_t t = row / hk, h = row % hk, slot = sp[t];
      if (slot < 0) continue;  // vLLM's padding
      uint8_t* rec = cache + (slot / C.block_size) * C.sb + h * C.sh + (slot % C.block_size) * C.ss;
      load_floats(values.row(t, h), values.type, d, x);
      load_floats(keys.row(t, h), keys.type, d, key);
      if (order) {  // a split key: its two parts (48 and 16 channels) rotate in store_split
        value_part.rotate(x, y);
        store_mse(value_part, x, y, L.value_norm, rec, s);
        store_split(key_part, *outlier_part, order + h * d, L, key, rec, s);
        continue;
      }
      if (value_part.signs.empty() && key_part.signs.empty()) {
        combine_rows_pair(value_part.rotation_t, x, key_part.rotation_t, key, d, y, key_y);
      } else {
        value_part.rotate(x, y);
        key_part.rotate(key, key_y);
      }
      store_mse(value_part, x, y, L.value_norm, rec, s);
      if (L.prod)
        store_prod(key_part, qjl, L, key, key_y, rec, s);
      else
        store_mse(key_part, key, key_y, L.key_norm, rec, s);
    }
  });
}

}  // namespace tq

TORCH_LIBRARY_FRAGMENT(TQ_OPS, m) {
  m.def(
      "store(Tensor key, Tensor value, Tensor(a!) kv_cache, Tensor slot_mapping, "
      "Tensor value_rotation_t, Tensor value_centroids, Tensor value_boundaries, "
      "Tensor key_rotation_t, Tensor key_centroids, Tensor key_boundaries, Tensor? qjl_t, "
      "int[] layout, Tensor? key_order=None, Tensor? outlier_rotation_t=None, "
      "Tensor? outlier_centroids=None, Tensor? outlier_boundaries=None) -> ()");
}

TORCH_LIBRARY_IMPL(TQ_OPS, CPU, m) { m.impl("store", &tq::store); }
