// Fused CPU attention over the TurboQuant paged cache (decode and chunked prefill).
//
// Contract: kernels/decode/cpu_decode.py. Given `rotation` R, the op rotates the outputs back
// (R^T y) and, with rotate_queries, rotates and scales the queries (scale R q) itself: two
// small matmuls per layer that cost more as separate PyTorch calls than the work they do.
// One work item is (sequence, query-row tile, KV head, context split). It walks the
// sequence's records through the block table in tiles of TILE tokens, unpacks the b-bit
// indices straight from the record bytes (LSB-first, 8 indices of b bits = b bytes, see
// tq_vllm/record/packing.py), looks up centroids, scores every query row of the GQA group against
// norm * c[idx] (+ the QJL term in prod mode), and accumulates norm * c_v[vidx] under an
// online softmax, all in the rotated domain. Splits of one row tile are merged by their
// log-sum-exp. Everything is float32, except on AVX512-BF16 builds for bf16 models, where the
// dots take bf16 operands (dots.h, bf16_dots.h).

#include "../csrc/ops.h"
#include "dots.h"

namespace tq {
namespace {

struct Problem {
  const float* q;   // [T, Hq, d] queries: rotated and scaled unless rotate_queries
  const float* qs;  // [T, Hq, d] S q' (prod mode)
  PagedCache cache;
  int64_t hk;
  const int32_t* table;
  int64_t table_stride;
  const float* kc;
  const float* vc;
  int d, g, hq;
  Layout lay;
  float qjl_coef;
  OutlierPart outliers;
  float sparse_v_log;  // log of the sparse-V threshold; -inf: every value tile is read
  int64_t window;      // sliding window: a row at position p sees p - window < t <= p; 0: all
  bool bf16_dots;      // attend_item takes bf16_dots.h's path
  const float* rotation = nullptr;    // R [d, d]: outputs leave as R^T y; nullptr: as y
  const float* rotation_t = nullptr;  // R^T [d, d] where the op rotates the queries
  float scale = 1.f;                  // the queries' scale where the op rotates them
};

// One (sequence, rows [row0, row0 + rows), KV head) over tokens [t0, t1). Row r of the item
// is query row row0 + r / g, head h * g + r % g, and sees tokens lim0 + r / g - window < t <=
// lim0 + r / g (window 0: no lower bound). t0 must not precede the first row's window: tokens
// before it may sit in blocks vLLM has freed.
// Writes acc[r] / l[r] to out (row stride out_stride; rotated back by P.rotation if `final`,
// else left in the rotated domain for the split merge) and log(l[r]) + m[r] to lse if given
// (row stride lse_stride: g within a split's partials, Hq in the op's lse_out).
template <class Dots>
void attend_item(const Problem& P, int64_t b, int64_t row0, int rows, int64_t lim0, int64_t h,
                 int64_t t0, int64_t t1, float* out, int64_t out_stride, float* lse,
                 int64_t lse_stride, bool final) {
  const int d = P.d, g = P.g, R = rows * g;
  const Layout& L = P.lay;
  Dots dots(L, d, P.kc, P.vc, P.outliers, R);
  std::vector<float> QS(L.prod ? static_cast<size_t>(R) * d : 0);
  std::vector<float> acc(static_cast<size_t>(R) * d, 0.f), m(R, NEG_INF), l(R, 0.f);
  std::vector<int64_t> lim(R), lo(R);
  std::vector<float> row(d);  // a rotated query, then an output before its rotation back
  for (int r = 0; r < R; ++r) {
    const int64_t src = ((row0 + r / g) * P.hq + h * g + r % g) * d;
    if (P.rotation_t) {
      combine_rows(P.rotation_t, P.q + src, d, P.scale, row.data());
      dots.set_query(r, row.data());
    } else {
      dots.set_query(r, P.q + src);
    }
    if (L.prod) std::memcpy(&QS[static_cast<size_t>(r) * d], P.qs + src, sizeof(float) * d);
    lim[r] = lim0 + r / g;
    lo[r] = P.window ? lim[r] - P.window + 1 : 0;
  }
  std::vector<float> sg(L.prod ? TILE * d : 0);
  float knorm[TILE], rnorm[TILE], vnorm[TILE];
  const uint8_t* recs[TILE];
  std::vector<float> S(static_cast<size_t>(R) * TILE), alpha(R);  // scores, then weights
  const bool has_k = L.key_bits > 0;  // 1-bit prod keys are all QJL
  const int32_t* row_table = P.table + b * P.table_stride;

  // The walk through the block table: token t sits in row_table[t / block_size] at offset
  // t % block_size, advanced one token at a time (a division per token cost as much as the
  // decode). A head's records of one block lie together; each token prefetches the record
  // `ahead` tokens on, in this block or the next (a whole block prefetched at once left the
  // first reads of each record waiting on memory).
  const PagedCache& C = P.cache;
  auto block_records = [&](int64_t i) -> const uint8_t* {
    const int64_t block = row_table[i];
    TORCH_CHECK(block >= 0 && block < C.num_blocks, "block_table entry ", block,
                " out of range for a cache of ", C.num_blocks, " blocks");
    return C.head(block, h);
  };
  const int64_t last_block = (t1 - 1) / C.block_size, ahead = std::min<int64_t>(TILE, C.block_size);
  auto upcoming_records = [&](int64_t i) -> const uint8_t* {  // nullptr: nothing to prefetch
    if (i > last_block) return nullptr;
    const int64_t block = row_table[i];
    return block < 0 || block >= C.num_blocks ? nullptr : C.head(block, h);  // checked on reading
  };
  int64_t block_i = t0 / C.block_size, offset = t0 % C.block_size;
  const uint8_t* records = t1 > t0 ? block_records(block_i) : nullptr;
  const uint8_t* upcoming = upcoming_records(block_i + 1);

  for (int64_t ts = t0; ts < t1; ts += TILE) {
    const int n = static_cast<int>(std::min<int64_t>(TILE, t1 - ts));
    for (int u = 0; u < n; ++u) {
      if (offset == C.block_size) {
        offset = 0;
        records = block_records(++block_i);
        upcoming = upcoming_records(block_i + 1);
      }
      const int64_t later = offset + ahead;
      const uint8_t* soon = later < C.block_size ? records + later * C.ss
                            : upcoming ? upcoming + (later - C.block_size) * C.ss : nullptr;
      if (soon)
        for (int64_t byte = 0; byte < C.ss; byte += 64) __builtin_prefetch(soon + byte);
      const uint8_t* rec = recs[u] = records + (offset++) * C.ss;
      knorm[u] = load_half(rec + L.key_norm);
      vnorm[u] = load_half(rec + L.value_norm);
      if (L.prod) {
        rnorm[u] = load_half(rec + L.key_residual_norm) * P.qjl_coef;
        decode_signs(rec + L.key_signs, d, &sg[u * d]);
      }
    }
    if (has_k) dots.decode_keys(recs, L.key_indices, n, knorm);

    // Rows whose limit precedes the tile (causal) are a prefix of the item's rows, rows whose
    // window starts after it a suffix; the rows between see at least one of its tokens.
    int first = 0, last = R;
    while (first < R && lim[first] < ts) ++first;
    while (last > first && lo[last - 1] >= ts + n) --last;
    bool read_values = false;
    for (int r = first; r < last; ++r) {
      const int visible = static_cast<int>(std::min<int64_t>(n, lim[r] - ts + 1));
      float* sr = &S[static_cast<size_t>(r) * TILE];
      for (int u = 0; u < TILE; ++u) sr[u] = 0.f;  // past `visible`: weight 0 below
      if (has_k) dots.add_scores(r, knorm, visible, sr);
      if (L.prod) add_scores(&QS[static_cast<size_t>(r) * d], sg.data(), rnorm, visible, d, sr);
      for (int u = 0; u < lo[r] - ts; ++u) sr[u] = NEG_INF;  // before the row's window
      const float top = max_score(sr, visible);
      const float m_new = std::max(m[r], top);
      read_values |= top - m_new >= P.sparse_v_log;
      alpha[r] = m[r] == NEG_INF ? 0.f : std::exp(m[r] - m_new);
      l[r] = l[r] * alpha[r] + softmax_weights(sr, vnorm, m_new, visible, sr);  // in place
      m[r] = m_new;
    }
    // Sparse V: when every row's weights in the tile lie below the threshold times its running
    // maximum, the tile's values are neither decoded nor added (its weights stay in l).
    if (read_values) dots.decode_values(recs, L.value_indices, n);
    for (int r0 = first; r0 < last; r0 += ROW_BLOCK) {
      const int rows = std::min(ROW_BLOCK, last - r0);
      float* accs[ROW_BLOCK];
      const float* ws[ROW_BLOCK];
      for (int i = 0; i < rows; ++i) {
        accs[i] = &acc[static_cast<size_t>(r0 + i) * d];
        ws[i] = &S[static_cast<size_t>(r0 + i) * TILE];
      }
      // A block's last row sees the most tokens; the others' weights are 0 past theirs.
      const int visible = static_cast<int>(std::min<int64_t>(n, lim[r0 + rows - 1] - ts + 1));
      dots.accumulate(accs, &alpha[r0], ws, rows, read_values ? visible : 0);
    }
  }
  for (int r = 0; r < R; ++r) {
    float* o = out + (r / g) * out_stride + (r % g) * d;
    const float* ar = &acc[static_cast<size_t>(r) * d];
    const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;  // no tokens (an empty split): 0
    const bool back = final && P.rotation;
    float* y = back ? row.data() : o;
    for (int j = 0; j < d; ++j) y[dots.dim(j)] = ar[j] * inv;
    if (back) combine_rows(P.rotation, y, d, 1.f, o);
    if (lse) lse[(r / g) * lse_stride + r % g] = l[r] > 0.f ? m[r] + std::log(l[r]) : NEG_INF;
  }
}

void attend(const Problem& P, int64_t b, int64_t row0, int rows, int64_t lim0, int64_t h,
            int64_t t0, int64_t t1, float* out, int64_t out_stride, float* lse, int64_t lse_stride,
            bool final) {
#ifdef TQ_BF16_DOTS
  if (P.bf16_dots)
    return attend_item<Bf16Dots>(P, b, row0, rows, lim0, h, t0, t1, out, out_stride, lse,
                                 lse_stride, final);
#endif
  attend_item<FloatDots>(P, b, row0, rows, lim0, h, t0, t1, out, out_stride, lse, lse_stride,
                         final);
}

// A bijection of [0, n): 0, n-1, 1, n-2, ... Row tiles later in a chunk see more (causal)
// context; parallel_for hands each thread a contiguous range, which this way mixes light
// and heavy items instead of giving one thread all the heavy ones.
inline int64_t interleaved(int64_t pos, int64_t n) {
  return pos % 2 == 0 ? pos / 2 : n - 1 - pos / 2;
}

struct RowTile {
  int64_t b, row0, lim0, begin, end;  // tokens [begin, end) the tile reads: the first row's
  int rows;                           // window start to the last row's limit + 1
};

}  // namespace

at::Tensor attention(const at::Tensor& q, const at::Tensor& qs, const at::Tensor& kv_cache,
                     const at::Tensor& block_table, const at::Tensor& query_start_loc,
                     const at::Tensor& seq_lens, const at::Tensor& key_centroids,
                     const at::Tensor& value_centroids, at::IntArrayRef layout, double qjl_coef,
                     int64_t rows_per_tile, int64_t num_splits,
                     const std::optional<at::Tensor>& outlier_centroids, double sparse_v,
                     int64_t sliding_window, const std::optional<at::Tensor>& lse_out,
                     bool bf16_dots, const std::optional<at::Tensor>& rotation,
                     const std::optional<at::Tensor>& rotation_t, bool rotate_queries,
                     double scale) {
  TORCH_CHECK(q.dim() == 3 && q.scalar_type() == at::kFloat && q.is_contiguous(),
              "q must be a contiguous float32 [T, Hq, d] tensor");
  TORCH_CHECK(block_table.dim() == 2 && block_table.scalar_type() == at::kInt &&
                  block_table.stride(1) == 1,
              "block_table must be int32 [B, max_blocks] with unit column stride");
  // An undefined query_start_loc (from decode_step.cpp): one query row per sequence.
  const bool one_row_each = !query_start_loc.defined();
  TORCH_CHECK((one_row_each || (query_start_loc.scalar_type() == at::kInt &&
                                query_start_loc.is_contiguous())) &&
                  seq_lens.scalar_type() == at::kInt && seq_lens.is_contiguous(),
              "query_start_loc and seq_lens must be contiguous int32");
  TORCH_CHECK(rows_per_tile >= 1 && num_splits >= 0, "rows_per_tile >= 1, num_splits >= 0");
  const int64_t batch = seq_lens.size(0);
  if (one_row_each) {  // decode_step.cpp passes vLLM's block table: rows past B are not read
    TORCH_CHECK(q.size(0) == batch && block_table.size(0) >= batch,
                "one query row per sequence needs B query rows and B block_table rows or more");
  } else {
    TORCH_CHECK(query_start_loc.size(0) == batch + 1 && block_table.size(0) == batch,
                "query_start_loc needs B + 1 entries and block_table B rows");
  }
  Problem P;
  P.cache = paged_cache(kv_cache);
  P.d = static_cast<int>(q.size(2));
  P.hq = static_cast<int>(q.size(1));
  P.hk = P.cache.hk;
  TORCH_CHECK(P.hq % P.hk == 0, "query heads must be a multiple of KV heads");
  P.g = static_cast<int>(P.hq / P.hk);
  P.lay = parse_layout(layout, P.d, P.cache.record);
  TORCH_CHECK(!P.lay.uniform_values, "the fused attention reads Lloyd-Max values only");
  P.qjl_coef = static_cast<float>(qjl_coef);
  TORCH_CHECK(key_centroids.scalar_type() == at::kFloat && key_centroids.is_contiguous() &&
                  key_centroids.numel() >= (int64_t{1} << P.lay.key_bits) &&
                  value_centroids.scalar_type() == at::kFloat &&
                  value_centroids.is_contiguous() &&
                  value_centroids.numel() >= (int64_t{1} << P.lay.value_bits),
              "centroids must be contiguous float32 with 2^bits entries");
  TORCH_CHECK(!P.lay.prod || (qs.sizes() == q.sizes() && qs.scalar_type() == at::kFloat &&
                              qs.is_contiguous()),
              "prod mode needs qs shaped like q, contiguous float32");
  P.q = q.data_ptr<float>();
  P.qs = P.lay.prod ? qs.data_ptr<float>() : nullptr;
  P.table = block_table.data_ptr<int32_t>();
  P.table_stride = block_table.stride(0);
  P.kc = key_centroids.data_ptr<float>();
  P.vc = value_centroids.data_ptr<float>();
  P.outliers = outlier_part(P.lay, outlier_centroids);
  TORCH_CHECK(sparse_v >= 0. && sparse_v < 1., "sparse_v must lie in [0, 1)");
  P.sparse_v_log = sparse_v > 0. ? static_cast<float>(std::log(sparse_v)) : NEG_INF;
  TORCH_CHECK(sliding_window >= 0, "sliding_window must be >= 0 (0: none)");
  P.window = sliding_window;
#ifdef TQ_BF16_DOTS
  P.bf16_dots = bf16_dots && Bf16Dots::fits(P.lay, P.d, P.outliers);
#else
  P.bf16_dots = false;
#endif
  auto square = [&](const at::Tensor& m) {
    return m.scalar_type() == at::kFloat && m.is_contiguous() && m.dim() == 2 &&
           m.size(0) == P.d && m.size(1) == P.d;
  };
  if (rotation) {
    TORCH_CHECK(square(*rotation), "rotation must be a contiguous float32 [d, d] tensor");
    P.rotation = rotation->data_ptr<float>();
    if (rotate_queries) {
      TORCH_CHECK(!P.lay.prod && P.outliers.count == 0,
                  "prod keys (their qs are S R q) and split keys (a rotation per head) take "
                  "rotated queries");
      TORCH_CHECK(rotation_t && square(*rotation_t),
                  "rotate_queries needs rotation_t (R^T), a contiguous float32 [d, d] tensor");
      P.rotation_t = rotation_t->data_ptr<float>();
      P.scale = static_cast<float>(scale);
    }
  } else {
    TORCH_CHECK(!rotate_queries, "rotate_queries needs the rotation");
  }
  // lse_out: each row's natural-log sum of exp(scores) ([T, Hq] float32; -inf where a row
  // read no token), so that attention over another set of tokens can be merged with ours.
  float* lse_rows = nullptr;
  if (lse_out) {
    TORCH_CHECK(lse_out->scalar_type() == at::kFloat && lse_out->is_contiguous() &&
                    lse_out->dim() == 2 && lse_out->size(0) == q.size(0) &&
                    lse_out->size(1) == q.size(1),
                "lse_out must be a contiguous float32 [T, Hq] tensor");
    lse_rows = lse_out->data_ptr<float>();
  }

  const int32_t* qsl = one_row_each ? nullptr : query_start_loc.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  std::vector<RowTile> tiles;
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t lo = qsl ? qsl[b] : b, hi = qsl ? qsl[b + 1] : b + 1, len = lens[b];
    // len 0 with one query row: a padding row of a decode batch, which attends to nothing (0).
    TORCH_CHECK(hi >= lo && hi <= q.size(0) && (len >= hi - lo || (len == 0 && hi - lo == 1)),
                "sequence ", b, ": bad query_start_loc or seq_len");
    TORCH_CHECK((len + P.cache.block_size - 1) / P.cache.block_size <= block_table.size(1),
                "sequence ", b, " has more blocks than block_table columns");
    for (int64_t row = lo; row < hi; row += rows_per_tile) {
      const int rows = static_cast<int>(std::min<int64_t>(rows_per_tile, hi - row));
      const int64_t lim0 = len - (hi - lo) + (row - lo);  // first row's last visible token
      const int64_t begin = P.window ? std::max<int64_t>(0, lim0 - P.window + 1) : 0;
      tiles.push_back(RowTile{b, row, lim0, begin, lim0 + rows, rows});
      longest = std::max(longest, lim0 + rows - begin);
    }
  }
  auto out = at::empty_like(q);
  const int64_t units = static_cast<int64_t>(tiles.size()) * P.hk;
  if (units == 0) return out;
  if (num_splits == 0) {  // about 4 items per thread, splits no shorter than 256 tokens
    const int64_t threads = at::get_num_threads(), most = (longest + 255) / 256;
    num_splits = std::max<int64_t>(1, std::min((4 * threads + units - 1) / units, most));
    // A whole number of items per thread where the floor allows: with 9 equal items on 2
    // threads one thread ran 5 while the other waited after 4.
    while (num_splits < most && units * num_splits % threads != 0) ++num_splits;
  }
  float* o = out.data_ptr<float>();
  const int64_t hq = P.hq, d = P.d, g = P.g, rpt = rows_per_tile;
  if (num_splits == 1) {  // items write their rows' outputs (and lse) themselves
    at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
      for (int64_t pos = begin; pos < end; ++pos) {
        const int64_t i = interleaved(pos, units);
        const RowTile& tile = tiles[i / P.hk];
        const int64_t h = i % P.hk;
        const int64_t first = tile.row0 * hq + h * g;  // the item's first (row, head)
        attend(P, tile.b, tile.row0, tile.rows, tile.lim0, h, tile.begin, tile.end, o + first * d,
               hq * d, lse_rows ? lse_rows + first : nullptr, hq, true);
      }
    });
    return out;
  }
  // Split items write [rows_per_tile, g, d] partials and their lse; a second pass merges.
  const int64_t ns = num_splits, unit_rows = rpt * g;
  std::vector<float> part(static_cast<size_t>(units * ns * unit_rows * d));
  std::vector<float> lse(static_cast<size_t>(units * ns * unit_rows));
  at::parallel_for(0, units * ns, 1, [&](int64_t begin, int64_t end) {
    for (int64_t pos = begin; pos < end; ++pos) {
      const int64_t i = interleaved(pos, units * ns);
      const int64_t unit = i / ns, split = i % ns;
      const RowTile& tile = tiles[unit / P.hk];
      const int64_t per = (tile.end - tile.begin + ns - 1) / ns;
      const int64_t t0 = std::min(tile.begin + split * per, tile.end);
      const int64_t t1 = std::min(t0 + per, tile.end);
      attend(P, tile.b, tile.row0, tile.rows, tile.lim0, unit % P.hk, t0, t1,
             &part[i * unit_rows * d], g * d, &lse[i * unit_rows], g, false);
    }
  });
  at::parallel_for(0, units, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> merged(d);
    for (int64_t unit = begin; unit < end; ++unit) {
      const RowTile& tile = tiles[unit / P.hk];
      const int64_t h = unit % P.hk;
      for (int64_t r = 0; r < tile.rows * g; ++r) {
        float top = NEG_INF;
        for (int64_t s = 0; s < ns; ++s) top = std::max(top, lse[(unit * ns + s) * unit_rows + r]);
        const int64_t out_row = (tile.row0 + r / g) * hq + h * g + r % g;
        float* dst = o + out_row * d;
        float* sum = P.rotation ? merged.data() : dst;  // rotated back into dst at the end
        std::fill(dst, dst + d, 0.f);
        std::fill(sum, sum + d, 0.f);
        if (lse_rows) lse_rows[out_row] = NEG_INF;
        if (top == NEG_INF) continue;  // no tokens at all
        float total = 0.f;
        for (int64_t s = 0; s < ns; ++s) {
          const int64_t item = unit * ns + s;
          const float w = std::exp(lse[item * unit_rows + r] - top);
          total += w;
          const float* src = &part[(item * unit_rows + r) * d];
          for (int64_t j = 0; j < d; ++j) sum[j] += w * src[j];
        }
        for (int64_t j = 0; j < d; ++j) sum[j] /= total;
        if (P.rotation) combine_rows(P.rotation, sum, static_cast<int>(d), 1.f, dst);
        if (lse_rows) lse_rows[out_row] = top + std::log(total);
      }
    }
  });
  return out;
}

}  // namespace tq

TORCH_LIBRARY_FRAGMENT(TQ_OPS, m) {
  m.def(
      "attention(Tensor q, Tensor qs, Tensor kv_cache, Tensor block_table, "
      "Tensor query_start_loc, Tensor seq_lens, Tensor key_centroids, Tensor value_centroids, "
      "int[] layout, float qjl_coef, int rows_per_tile, int num_splits, "
      "Tensor? outlier_centroids=None, float sparse_v=0.0, int sliding_window=0, "
      "Tensor(a!)? lse_out=None, bool bf16_dots=False, Tensor? rotation=None, "
      "Tensor? rotation_t=None, bool rotate_queries=False, float scale=1.0) -> Tensor");
}

TORCH_LIBRARY_IMPL(TQ_OPS, CPU, m) { m.impl("attention", &tq::attention); }
