// Segment-masked decode attention over a paged K/V pool, split over the keys (flash-decoding).
//
// One block per (work item = one query tile of one sequence, KV head, row block, split). The block's
// rows are the (query, head) pairs of that tile that share the KV head (GQA: every K/V page is read
// once for the whole group). Its keys are a contiguous share of the work item's non-empty key tiles
// (from the plan: kt_index, ascending; kt_full marks tiles that need no mask). Inside the block, a
// group of D/8 lanes owns one key at a time and holds 8 dims (16 bytes) of it; each group keeps an
// online softmax per row over UNROLL keys per step (K and V loads of all UNROLL keys in flight), and
// the groups are merged through shared memory at the end. With several splits, each writes a float32
// partial (output, LSE) that merge_splits_kernel combines.
//
// Mask: query token i sees key token j iff ancestors[b, seg_i, seg_j] or (seg_i == seg_j and j <= i).
// Queries of sequence b are its last q_len tokens. LSE is float32 natural log; a query that sees
// nothing gets output 0 and LSE -inf.
#pragma once

#include "kvfuse/common.cuh"

namespace kvfuse {

struct DecodeArgs {
  const void* q;              // [total_q, Hq, D] contiguous
  const void* k_cache;        // [P, page_size, Hkv, D] contiguous
  const void* v_cache;
  const int32_t* block_table; // [B, bt_stride]
  long long bt_stride;
  const int32_t* kv_lens;     // [B]
  const int32_t* qo_indptr;   // [B + 1]
  const int32_t* token_seg;   // [B, seg_stride]
  long long seg_stride;
  const uint8_t* ancestors;   // [B, S, S]
  int num_segs;
  const int32_t* work_seq;    // [W]
  const int32_t* work_qtile;  // [W]
  const int32_t* kt_indptr;   // [W + 1]
  const int32_t* kt_index;    // non-empty key tiles
  const int8_t* kt_full;
  int num_work, block_q, block_k;
  int page_size, num_qo_heads, num_kv_heads;
  float scale_log2;           // sm_scale * log2(e)
  int num_splits, num_row_blocks;
  int total_q;
  void* out;                  // [total_q, Hq, D]
  float* lse;                 // [total_q, Hq]
  float* part_o;              // [num_splits, total_q, Hq, D] (num_splits > 1)
  float* part_lse;            // [num_splits, total_q, Hq]
};

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = 32 * kDecodeWarps;
constexpr int kDecodeUnroll = 4;
constexpr int kDecodeMaxRows = 4;  // rows (query x head pairs) of one block; more rows use more blocks
constexpr float kLn2 = 0.69314718055994530942f;

template <typename T, int D, int RT>
__global__ void __launch_bounds__(kDecodeThreads)
decode_attention_kernel(DecodeArgs a) {
  constexpr int VEC = 16 / sizeof(T);
  constexpr int TPK = D / VEC;              // lanes per key
  static_assert(TPK <= 32 && 32 % TPK == 0, "head_dim / 8 must divide 32");
  constexpr int KPW = 32 / TPK;             // keys per warp at a time
  constexpr int NG = kDecodeWarps * KPW;    // key groups per block
  constexpr int U = kDecodeUnroll;

  __shared__ float s_acc[NG][RT][D];
  __shared__ float s_m[NG][RT];
  __shared__ float s_l[NG][RT];

  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int gid = warp * KPW + lane / TPK;  // key group
  const int lig = lane % TPK;               // lane in group: dims [lig * VEC, lig * VEC + VEC)

  const int w = blockIdx.x;
  const int kvh = blockIdx.y / a.num_row_blocks;
  const int rb = blockIdx.y - kvh * a.num_row_blocks;
  const int split = blockIdx.z;
  const int G = a.num_qo_heads / a.num_kv_heads;

  const int b = a.work_seq[w];
  const int n = a.kv_lens[b];
  const int q0 = a.qo_indptr[b];
  const int qlen = a.qo_indptr[b + 1] - q0;
  const int qi0 = a.work_qtile[w] * a.block_q;
  const int rows = min(a.block_q, qlen - qi0) * G;

  // Rows of this block: (query qi, head g) with row = qi * G + g.
  float q[RT][VEC];
  int qpos[RT], qseg[RT];
  bool rvalid[RT];
  const T* qp = static_cast<const T*>(a.q);
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    const int rg = rb * RT + r;
    rvalid[r] = rg < rows;
    const int qi = rg / G, g = rg - (rg / G) * G;
    qpos[r] = n - qlen + qi0 + qi;
    qseg[r] = rvalid[r] ? a.token_seg[b * a.seg_stride + qpos[r]] : 0;
    Vec<T, VEC> x{};
    if (rvalid[r])
      x = load_vec<T, VEC>(qp + (static_cast<long long>(q0 + qi0 + qi) * a.num_qo_heads + kvh * G + g) * D +
                           lig * VEC);
#pragma unroll
    for (int i = 0; i < VEC; ++i) q[r][i] = to_float(x.v[i]) * a.scale_log2;
  }

  float acc[RT][VEC], m[RT], l[RT];
#pragma unroll
  for (int r = 0; r < RT; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int i = 0; i < VEC; ++i) acc[r][i] = 0.f;
  }

  const int t_beg = a.kt_indptr[w], t_end = a.kt_indptr[w + 1];
  const int per = (t_end - t_beg + a.num_splits - 1) / a.num_splits;
  const int my_beg = t_beg + split * per;
  const int my_end = min(t_end, my_beg + per);
  const T* kp = static_cast<const T*>(a.k_cache);
  const T* vp = static_cast<const T*>(a.v_cache);
  const int32_t* bt = a.block_table + b * a.bt_stride;
  const int32_t* seg = a.token_seg + b * a.seg_stride;
  const uint8_t* anc = a.ancestors + static_cast<long long>(b) * a.num_segs * a.num_segs;
  const long long head_off = static_cast<long long>(kvh) * D + lig * VEC;

  for (int t = my_beg; t < my_end; ++t) {
    const int kt = a.kt_index[t];
    const bool full = a.kt_full[t] != 0;
    const int k0 = kt * a.block_k;
    const int kend = min(k0 + a.block_k, n);
    for (int base = k0; base < kend; base += NG * U) {
      Vec<T, VEC> kv[U], vv[U];
      int key[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        key[u] = base + gid + u * NG;
        if (key[u] < kend) {
          const int page = bt[key[u] / a.page_size];
          const long long off =
              (static_cast<long long>(page) * a.page_size + key[u] % a.page_size) * a.num_kv_heads * D + head_off;
          kv[u] = load_vec<T, VEC>(kp + off);
          vv[u] = load_vec<T, VEC>(vp + off);
        }
      }
      float s[U][RT];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        int kseg = 0;
        if (!full && key[u] < kend) kseg = seg[key[u]];
#pragma unroll
        for (int r = 0; r < RT; ++r) {
          float d = 0.f;
          if (key[u] < kend) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) d = fmaf(q[r][i], to_float(kv[u].v[i]), d);
          }
#pragma unroll
          for (int o = TPK / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
          bool vis = rvalid[r] && key[u] < kend;
          if (vis && !full)
            vis = (kseg == qseg[r] && key[u] <= qpos[r]) || anc[qseg[r] * a.num_segs + kseg] != 0;
          s[u][r] = vis ? d : -INFINITY;
        }
      }
#pragma unroll
      for (int r = 0; r < RT; ++r) {
        float mx = m[r];
#pragma unroll
        for (int u = 0; u < U; ++u) mx = fmaxf(mx, s[u][r]);
        if (mx == -INFINITY) continue;  // nothing visible yet for this row
        const float corr = exp2f(m[r] - mx);
        float p[U];
        float psum = 0.f;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          p[u] = exp2f(s[u][r] - mx);
          psum += p[u];
        }
        l[r] = l[r] * corr + psum;
        m[r] = mx;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          float x = acc[r][i] * corr;
#pragma unroll
          for (int u = 0; u < U; ++u)
            if (key[u] < kend) x = fmaf(p[u], to_float(vv[u].v[i]), x);
          acc[r][i] = x;
        }
      }
    }
  }

  // Merge the key groups.
#pragma unroll
  for (int r = 0; r < RT; ++r) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) s_acc[gid][r][lig * VEC + i] = acc[r][i];
    if (lig == 0) {
      s_m[gid][r] = m[r];
      s_l[gid][r] = l[r];
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < RT * D; e += kDecodeThreads) {
    const int r = e / D, d = e - (e / D) * D;
    const int rg = rb * RT + r;
    if (rg >= rows) continue;
    float M = -INFINITY;
#pragma unroll
    for (int g = 0; g < NG; ++g) M = fmaxf(M, s_m[g][r]);
    float L = 0.f, O = 0.f;
    if (M != -INFINITY) {
#pragma unroll
      for (int g = 0; g < NG; ++g) {
        const float wgt = exp2f(s_m[g][r] - M);
        L += s_l[g][r] * wgt;
        O += s_acc[g][r][d] * wgt;
      }
    }
    const float o = L > 0.f ? O / L : 0.f;
    const float lse = L > 0.f ? (M + log2f(L)) * kLn2 : -INFINITY;
    const int qi = rg / G, g = rg - (rg / G) * G;
    const long long row = static_cast<long long>(q0 + qi0 + qi) * a.num_qo_heads + kvh * G + g;
    if (a.num_splits == 1) {
      static_cast<T*>(a.out)[row * D + d] = from_float<T>(o);
      if (d == 0) a.lse[row] = lse;
    } else {
      const long long prow = static_cast<long long>(split) * a.total_q * a.num_qo_heads + row;
      a.part_o[prow * D + d] = o;
      if (d == 0) a.part_lse[prow] = lse;
    }
  }
}

// Combine the splits' partial results: out = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M).
template <typename T, int D>
__global__ void __launch_bounds__(D) merge_splits_kernel(DecodeArgs a) {
  const long long rows = static_cast<long long>(a.total_q) * a.num_qo_heads;
  const long long stride = rows;
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    float M = -INFINITY;
    for (int s = 0; s < a.num_splits; ++s) M = fmaxf(M, a.part_lse[s * stride + row]);
    float L = 0.f, O = 0.f;
    if (M != -INFINITY) {
      for (int s = 0; s < a.num_splits; ++s) {
        const float wgt = __expf(a.part_lse[s * stride + row] - M);
        L += wgt;
        O += wgt * a.part_o[(s * stride + row) * D + threadIdx.x];
      }
    }
    static_cast<T*>(a.out)[row * D + threadIdx.x] = from_float<T>(L > 0.f ? O / L : 0.f);
    if (threadIdx.x == 0) a.lse[row] = L > 0.f ? M + logf(L) : -INFINITY;
  }
}

// Rows (query x head pairs) a block takes for `rows` rows of a work item.
inline int decode_rows_per_block(int rows) {
  int rt = 1;
  while (rt < rows && rt < kDecodeMaxRows) rt *= 2;
  return rt;
}

// Launch. Before: a.num_splits and a.num_row_blocks set (decode_plan_splits), part_o/part_lse
// allocated when num_splits > 1. T: __half or __nv_bfloat16; head_dim 64, 128 or 256.
template <typename T>
cudaError_t decode_attention(DecodeArgs a, int head_dim, int rows_per_block, cudaStream_t stream) {
  if (a.num_work == 0 || a.total_q == 0) return cudaSuccess;
  const dim3 grid(a.num_work, a.num_kv_heads * a.num_row_blocks, a.num_splits);
  if (grid.y > 65535 || grid.z > 65535) return cudaErrorInvalidConfiguration;
  auto go = [&](auto kernel) {
    kernel<<<grid, kDecodeThreads, 0, stream>>>(a);
    return cudaGetLastError();
  };
  cudaError_t err = cudaErrorInvalidValue;
#define KVFUSE_DECODE_RT(DD, R) \
  if (head_dim == DD && rows_per_block == R) err = go(decode_attention_kernel<T, DD, R>);
#define KVFUSE_DECODE_D(DD) \
  KVFUSE_DECODE_RT(DD, 1) KVFUSE_DECODE_RT(DD, 2) KVFUSE_DECODE_RT(DD, 4)
  KVFUSE_DECODE_D(64)
  KVFUSE_DECODE_D(128)
  KVFUSE_DECODE_D(256)
#undef KVFUSE_DECODE_D
#undef KVFUSE_DECODE_RT
  if (err != cudaSuccess || a.num_splits == 1) return err;
  const long long rows = static_cast<long long>(a.total_q) * a.num_qo_heads;
  const int mgrid = static_cast<int>(std::min(rows, 65535LL * 16));
  if (head_dim == 64) merge_splits_kernel<T, 64><<<mgrid, 64, 0, stream>>>(a);
  if (head_dim == 128) merge_splits_kernel<T, 128><<<mgrid, 128, 0, stream>>>(a);
  if (head_dim == 256) merge_splits_kernel<T, 256><<<mgrid, 256, 0, stream>>>(a);
  return cudaGetLastError();
}

// Splits over the keys so that about `target_blocks` blocks run: with `num_tiles` non-empty key
// tiles over `num_work` work items, a split never gets less than one tile on average.
inline int decode_plan_splits(long long num_tiles, int num_work, int kv_heads, int row_blocks, int target_blocks) {
  if (num_work == 0) return 1;
  const long long base = static_cast<long long>(num_work) * kv_heads * row_blocks;
  long long splits = (target_blocks + base - 1) / base;
  const long long avg_tiles = std::max(1LL, num_tiles / num_work);
  splits = std::max(1LL, std::min({splits, avg_tiles, 256LL}));
  return static_cast<int>(splits);
}

}  // namespace kvfuse
