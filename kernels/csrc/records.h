// Reading and writing the paged records, shared by the C++ ops (store.cpp, attention.cpp,
// dequantize.cpp). Every byte offset comes from tq_vllm/record/layout.py through Layout, in the
// order RecordLayout.kernel_fields() lists them; nothing here restates one. Packed indices are
// LSB-first bit streams, 8 indices of b bits in b bytes (tq_vllm/record/packing.py).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI__)
#include <immintrin.h>
#define TQ_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define TQ_AVX2 1
#endif

namespace tq {

inline float load_half(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);  // records have any length: the field may be unaligned
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

template <int B>
inline void unpack_bits(const uint8_t* p, int n, uint8_t* out) {
  constexpr uint64_t mask = (uint64_t{1} << B) - 1;
  int j = 0;
  for (; j + 8 <= n; j += 8, p += B) {  // 8 indices fill exactly B bytes
    uint64_t w = 0;
    std::memcpy(&w, p, B);
    for (int k = 0; k < 8; ++k) out[j + k] = static_cast<uint8_t>((w >> (k * B)) & mask);
  }
  if (j < n) {  // a head_dim that is not a multiple of 8: the row's last, partial group
    const int rest = n - j;
    uint64_t w = 0;
    std::memcpy(&w, p, (rest * B + 7) / 8);
    for (int k = 0; k < rest; ++k) out[j + k] = static_cast<uint8_t>((w >> (k * B)) & mask);
  }
}


using UnpackFn = void (*)(const uint8_t*, int, uint8_t*);
constexpr UnpackFn UNPACK[9] = {nullptr,         unpack_bits<1>, unpack_bits<2>,
                                unpack_bits<3>, unpack_bits<4>, unpack_bits<5>,
                                unpack_bits<6>, unpack_bits<7>, unpack_bits<8>};

// QJL sign bits of one row as +-1.
inline void decode_signs(const uint8_t* p, int n, float* out) {
  int j = 0;
#ifdef TQ_AVX512
  const __m512 pos = _mm512_set1_ps(1.f), neg = _mm512_set1_ps(-1.f);
  for (; j + 16 <= n; j += 16) {
    uint16_t bits;
    std::memcpy(&bits, p + j / 8, 2);
    _mm512_storeu_ps(out + j, _mm512_mask_blend_ps(bits, neg, pos));
  }
#endif
  for (; j < n; ++j) out[j] = ((p[j >> 3] >> (j & 7)) & 1) ? 1.f : -1.f;
}


// The record layout: tq_vllm/record/layout.py's RecordLayout.kernel_fields(), in this order.
struct Layout {
  int key_bits;  // mse index bits of the (regular) keys, 0 for 1-bit prod (no mse part)
  bool prod;
  int value_bits;
  int key_norm, key_residual_norm, value_norm, value_zero;  // fp16 fields
  int key_indices, key_signs, value_indices;                // packed fields
  // Split keys (tq_vllm/quant/outliers.py): key_outliers channels at key_outlier_bits, their fp16 norm and
  // packed indices here; the regular part is the key fields over the first d - count rotated
  // coordinates. 0 outliers: plain keys.
  int key_outliers, key_outlier_bits, key_outlier_norm, key_outlier_indices;
  bool uniform_values;  // value_mode "uniform": scale at value_norm, zero point at value_zero
};
constexpr size_t LAYOUT_FIELDS = 15;

inline Layout parse_layout(at::IntArrayRef f, int64_t head_dim, int64_t record) {
  TORCH_CHECK(f.size() == LAYOUT_FIELDS, "layout must hold ", LAYOUT_FIELDS,
              " integers (RecordLayout.kernel_fields())");
  auto i = [&](size_t k) { return static_cast<int>(f[k]); };
  const Layout L{i(0), f[1] != 0, i(2),  i(3),  i(4),  i(5),  i(6), i(7),
                 i(8), i(9),      i(10), i(11), i(12), i(13), f[14] != 0};
  TORCH_CHECK(L.key_bits >= 0 && L.key_bits <= 8 && L.value_bits >= 1 && L.value_bits <= 8,
              "key bits 0..8 and value bits 1..8");
  TORCH_CHECK(L.key_outliers >= 0 && L.key_outliers < head_dim, "key_outliers out of range");
  if (L.key_outliers) {
    TORCH_CHECK(!L.prod && L.key_bits > 0, "split keys are Lloyd-Max (mse) keys");
    TORCH_CHECK(L.key_outlier_bits >= 1 && L.key_outlier_bits <= 8 && L.key_outlier_norm >= 0 &&
                    L.key_outlier_norm + 2 <= record && L.key_outlier_indices >= 0 &&
                    L.key_outlier_indices + (L.key_outliers * L.key_outlier_bits + 7) / 8 <= record,
                "split keys' outlier fields must lie inside the record");
  }
  return L;
}

// A layer's paged cache [num_blocks, Hk, block_size, record bytes] as vLLM hands it over: a
// contiguous tensor, or a strided view into a buffer shared with layers of another page size
// (hybrid models). Only a record's own bytes must be contiguous.
struct PagedCache {
  const uint8_t* base;
  int64_t num_blocks, hk, block_size, record, sb, sh, ss;  // sizes, then byte strides

  const uint8_t* head(int64_t block, int64_t h) const { return base + block * sb + h * sh; }
};

inline PagedCache paged_cache(const at::Tensor& kv_cache) {
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.scalar_type() == at::kByte &&
                  kv_cache.stride(3) == 1 && kv_cache.stride(2) >= kv_cache.size(3),
              "kv_cache must be a uint8 [num_blocks, Hk, block_size, C] tensor whose records "
              "are contiguous");
  return PagedCache{kv_cache.data_ptr<uint8_t>(), kv_cache.size(0),    kv_cache.size(1),
                    kv_cache.size(2),             kv_cache.size(3),    kv_cache.stride(0),
                    kv_cache.stride(1),           kv_cache.stride(2)};
}

// The outlier part of split keys with its centroids; count 0: plain keys.
struct OutlierPart {
  int count = 0, bits = 0, norm = 0, indices = 0;
  const float* centroids = nullptr;
};

inline OutlierPart outlier_part(const Layout& L, const std::optional<at::Tensor>& centroids) {
  if (!L.key_outliers) return {};
  TORCH_CHECK(centroids.has_value() && centroids->scalar_type() == at::kFloat &&
                  centroids->is_contiguous() &&
                  centroids->numel() >= (int64_t{1} << L.key_outlier_bits),
              "split keys need contiguous float32 outlier_centroids with 2^bits entries");
  return OutlierPart{L.key_outliers, L.key_outlier_bits, L.key_outlier_norm,
                     L.key_outlier_indices, centroids->data_ptr<float>()};
}

}  // namespace tq
