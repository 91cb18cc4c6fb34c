#include "../csrc/split_row_decoder.h"

namespace tq {
namespace {

// Dequantize: one sequence's cached tokens as dense rotated keys and values.
// For chunked prefill on bf16 models: the caller attends over the result with a dense kernel
// (oneDNN, AMX where the CPU has it), far faster per score than the fused float32 loop once
// a chunk has more than a few rows. Lloyd-Max values are norm * c[idx] in float32; uniform
// values (value_mode "uniform", unrotated) are zero + scale * idx, two roundings as in
// tq_vllm/quant/uniform.py; either is then rounded once to the output dtype. Split keys (tq_vllm/quant/outliers.py) are
// two Lloyd-Max parts with their own norms and centroids, written side by side: the regular
// channels first, then the outlier channels.

// dst[:n] = scale * src[:n] (+ shift, where shifted) in T, rounded twice as tq_vllm/quant/uniform.py does
// (no fused multiply-add).
#define TQ_NO_FMA __attribute__((noinline, optimize("fp-contract=off")))
template <typename T>
TQ_NO_FMA void write_scaled(const float* src, float scale, float shift, bool shifted, int n,
                            T* dst) {
  for (int j = 0; j < n; ++j) {
    const float product = scale * src[j];
    dst[j] = static_cast<T>(shifted ? shift + product : product);
  }
}
#if defined(TQ_AVX512) && defined(__AVX512BF16__)
template <>
TQ_NO_FMA void write_scaled<c10::BFloat16>(const float* src, float scale, float shift,
                                           bool shifted, int n, c10::BFloat16* dst) {
  int j = 0;
  for (; j + 16 <= n; j += 16) {  // round to nearest even, as c10::BFloat16 does
    __m512 x = _mm512_mul_ps(_mm512_set1_ps(scale), _mm512_loadu_ps(src + j));
    if (shifted) x = _mm512_add_ps(_mm512_set1_ps(shift), x);
    const __m256bh h = _mm512_cvtneps_pbh(x);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + j), reinterpret_cast<const __m256i&>(h));
  }
  for (; j < n; ++j) {
    const float product = scale * src[j];
    dst[j] = static_cast<c10::BFloat16>(shifted ? shift + product : product);
  }
}
#endif

template <typename T>
void dequantize_into(const PagedCache& C, const int32_t* blocks, int64_t length, int d,
                     const Layout& L, const float* kc, const float* vc, const OutlierPart& O,
                     T* out) {
  const int64_t hk = C.hk, block_size = C.block_size;
  const int64_t nb = (length + block_size - 1) / block_size;
  const RowDecoder decode_v(vc, L.value_bits, d);
  std::optional<RowDecoder> decode_k;
  std::optional<SplitRowDecoder> decode_split;
  if (O.count) decode_split.emplace(L, d, kc, O, false);
  else decode_k.emplace(kc, L.key_bits, d);
  const bool uniform = L.uniform_values;
  T* keys = out;
  T* values = out + hk * length * d;
  at::parallel_for(0, hk * nb, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(d);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t h = item / nb, i = item % nb, block = blocks[i];
      TORCH_CHECK(block >= 0 && block < C.num_blocks, "block_table entry ", block,
                  " out of range for a cache of ", C.num_blocks, " blocks");
      const uint8_t* rec = C.head(block, h);
      const int64_t t0 = i * block_size, t1 = std::min(length, t0 + block_size);
      for (int64_t t = t0; t < t1; ++t, rec += C.ss) {
        const int64_t at = (h * length + t) * d;
        const float key_norm = load_half(rec + L.key_norm);
        if (decode_split) {  // each part already times its norm: times 1 is exact
          decode_split->rows(&rec, 1, d, &key_norm, row.data());
          write_scaled(row.data(), 1.f, 0.f, false, d, keys + at);
        } else {
          (*decode_k)(rec + L.key_indices, row.data());
          write_scaled(row.data(), key_norm, 0.f, false, d, keys + at);
        }
        decode_v(rec + L.value_indices, row.data());
        const float zero = uniform ? load_half(rec + L.value_zero) : 0.f;
        write_scaled(row.data(), load_half(rec + L.value_norm), zero, uniform, d, values + at);
      }
    }
  });
}

// Uniform values: their scale sits at the layout's value_norm, their zero point at value_zero,
// and value_centroids must be 0, 1, ..., 2^b - 1. Split keys: key_centroids are the regular
// part's, outlier_centroids the outlier part's.
at::Tensor dequantize(const at::Tensor& kv_cache, const at::Tensor& blocks, int64_t length,
                      const at::Tensor& key_centroids, const at::Tensor& value_centroids,
                      at::IntArrayRef layout, int64_t head_dim, at::ScalarType dtype,
                      const std::optional<at::Tensor>& outlier_centroids) {
  const PagedCache C = paged_cache(kv_cache);
  const Layout L = parse_layout(layout, head_dim, C.record);
  TORCH_CHECK(!L.prod && L.key_bits >= 1, "dequantize reads mse keys of 1..8 bits");
  const int64_t block_size = C.block_size, hk = C.hk;
  TORCH_CHECK(length >= 0 && blocks.dim() == 1 && blocks.scalar_type() == at::kInt &&
                  blocks.is_contiguous() &&
                  blocks.size(0) >= (length + block_size - 1) / block_size,
              "blocks must be contiguous int32 with an entry for each block of the sequence");
  TORCH_CHECK(key_centroids.scalar_type() == at::kFloat && key_centroids.is_contiguous() &&
                  key_centroids.numel() >= (int64_t{1} << L.key_bits) &&
                  value_centroids.scalar_type() == at::kFloat &&
                  value_centroids.is_contiguous() &&
                  value_centroids.numel() >= (int64_t{1} << L.value_bits),
              "centroids must be contiguous float32 with 2^bits entries");
  const int d = static_cast<int>(head_dim);
  const OutlierPart O = outlier_part(L, outlier_centroids);
  auto out = at::empty({2, hk, length, head_dim}, kv_cache.options().dtype(dtype));
  auto run = [&](auto* dst) {
    dequantize_into(C, blocks.data_ptr<int32_t>(), length, d, L, key_centroids.data_ptr<float>(),
                    value_centroids.data_ptr<float>(), O, dst);
  };
  switch (dtype) {
    case at::kFloat: run(out.data_ptr<float>()); break;
    case at::kBFloat16: run(out.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: run(out.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK(false, "dequantize writes float32, bfloat16 or float16");
  }
  return out;
}


}  // namespace
}  // namespace tq

TORCH_LIBRARY_FRAGMENT(TQ_OPS, m) {
  m.def(
      "dequantize(Tensor kv_cache, Tensor blocks, int length, Tensor key_centroids, "
      "Tensor value_centroids, int[] layout, int head_dim, ScalarType dtype, "
      "Tensor? outlier_centroids=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(TQ_OPS, CPU, m) { m.impl("dequantize", &tq::dequantize); }
