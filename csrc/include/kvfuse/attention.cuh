// Segment-masked decode attention over a paged K/V pool on tensor cores, split over the keys
// (flash-decoding). Needs sm_80 or newer (mma.sync, ldmatrix, cp.async).
//
// Why this shape. Decode reads every visible K/V byte once and does ~2 FLOP per byte per row: it is
// bound by memory bandwidth, so the kernel is organised around keeping enough bytes in flight and
// reading each K/V row once per KV-head group; tensor work is cheap and partly wasted on purpose.
//
// Grid: one block per (work item, KV head, row block of 16 rows) x split. A work item is one query tile
// of one sequence (plan: work_seq / work_qtile); its rows are the (query, head) pairs of that tile that
// share the KV head, row = query * G + head (G = Hq / Hkv), packed into the M = 16 rows of
// mma.m16n8k16 (GQA 4 with one query fills 4 of 16 rows; more than 16 rows use more row blocks, which
// run next to each other and re-read K/V from L2). A split takes a contiguous share of the work item's
// non-empty key tiles (kt_index, ascending; kt_full marks tiles that need no mask).
//
// Pipeline: the block walks its keys in chunks of 64 (16 per warp; a plan tile of block_k keys is
// ceil(block_k / 64) chunks). The 128 threads copy each chunk's K and V rows from the paged pool into
// shared memory with 16-byte cp.async (zero-filled past the end), STAGES chunks deep (96 KiB for
// head_dim 128, two blocks per SM: ~128 KiB of loads in flight per SM); page ids of the next chunk to
// issue are fetched one iteration early. Shared rows are swizzled (16-byte chunk c of row r stored at
// c ^ (r % 8)) so the 8 row addresses of every ldmatrix phase hit 8 different bank groups.
//
// Math, per warp and chunk (its 16 keys), everything in mma.m16n8k16 fragments (f32 accumulate):
//   S[16 rows, 16 keys] = Q K^T: A = Q (ldmatrix, kept in registers for all of head_dim), B = K rows
//     [key][d] straight from shared memory (ldmatrix, non-transposed: a K row is a B column).
//   online softmax per row in base 2 (sm_scale * log2 e folded into one multiply), row max over the
//     quad of lanes that hold a row (shuffles), row sum kept per lane and reduced at the end.
//   O[16 rows, D] += P V: A = P (the two 8-key C fragments of S re-packed to 16-bit, the register
//     layouts coincide), B = V rows [key][d] via ldmatrix.trans.
// The four warps' (m, l, O) are merged through shared memory; with several splits each block writes
// a float32 partial (O, LSE) that merge_splits_kernel combines.
//
// Mask: query token i sees key token j iff ancestors[b, seg_i, seg_j] or (seg_i == seg_j and j <= i),
// and with a sliding window, pos_i - pos_j < window; applied only in chunks of partial tiles
// (kt_full == 0) and chunks that run past kv_len (the plan classifies a tile full only when the window
// holds for all its pairs). Query row r of sequence b is token q_token[r]. Soft-capping (softcap_mul
// != 0) replaces the scaled score s by softcap * tanh(s / softcap). LSE is float32 natural log; a
// query that sees nothing gets output 0 and LSE -inf.
//
// Latency trims (measured on the H200, bench/TARGETS.md section 4, 32 x 32768 tokens, bf16, page 16: 4.17 /
// 4.09 TB/s without / with the cross-thread mask, against 3.29 / 3.23 for the straightforward
// schedule and 4.03 / 3.97 with a third block per SM): S = Q K^T in 4 independent mma chains (2
// partial sums per key tile), K (and Q) fragments loaded one k-step ahead, V's first two fragments
// before the softmax and the rest two steps ahead, the O rescale skipped when no row max of the warp
// moved, page ids by shift/mask when page_size is a power of two.
#pragma once

#include <climits>

#include "kvfuse/common.cuh"

namespace kvfuse {

struct AttentionArgs {
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
  const int32_t* q_token;     // [total_q] token index of each query row
  const int32_t* token_pos;   // [B, seg_stride] RoPE position of each token (read with a window)
  int window;                 // sliding window in positions, 0: none
  float softcap_pre;          // sm_scale / softcap (softcap_mul != 0)
  float softcap_mul;          // softcap * log2(e); 0: no soft-capping
  int num_work, block_q, block_k;
  int page_size, num_qo_heads, num_kv_heads;
  float scale_log2;           // sm_scale * log2(e)
  int num_splits;             // decode_plan_splits
  int num_row_blocks;         // decode_row_blocks(block_q, Hq / Hkv)
  int total_q;
  void* out;                  // [total_q, Hq, D]
  float* lse;                 // [total_q, Hq]
  float* part_o;              // [num_splits, total_q, Hq, D] (num_splits > 1)
  float* part_lse;            // [num_splits, total_q, Hq]
};

// The block's share of the plan: block x = (work item * num_kv_heads + KV head) * num_row_blocks +
// row block, each row block `rows` (query, head) rows of the work item's query tile. `last_first`
// takes the work items in reverse order.
struct WorkItem {
  int rb, kvh, w, G;     // row block, KV head, work item, GQA group
  int b, n, q0, qlen;    // sequence, its keys, its first query row, its query count
  int qi0, nrows, row0;  // the tile's first query, its (query, head) rows, the block's first row
};

__device__ __forceinline__ WorkItem work_item(const AttentionArgs& a, int bx, int rows, bool last_first) {
  WorkItem t;
  t.rb = bx % a.num_row_blocks;
  bx /= a.num_row_blocks;
  t.kvh = bx % a.num_kv_heads;
  t.w = last_first ? a.num_work - 1 - bx / a.num_kv_heads : bx / a.num_kv_heads;
  t.G = a.num_qo_heads / a.num_kv_heads;
  t.b = a.work_seq[t.w];
  t.n = a.kv_lens[t.b];
  t.q0 = a.qo_indptr[t.b];
  t.qlen = a.qo_indptr[t.b + 1] - t.q0;
  t.qi0 = a.work_qtile[t.w] * a.block_q;
  t.nrows = min(a.block_q, t.qlen - t.qi0) * t.G;
  t.row0 = t.rb * rows;
  return t;
}

constexpr int kDecodeMaxQ = 8;  // queries per tile of a decode plan; more: a prefill plan (prefill_sm90.cuh)
constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = 32 * kDecodeWarps;
constexpr int kDecodeRows = 16;                  // rows of a block: M of mma.m16n8k16
constexpr int kDecodeChunk = 16 * kDecodeWarps;  // keys of one pipeline stage, 16 per warp
constexpr float kLn2 = 0.69314718055994530942f;

template <int D>
struct DecodeConfig {
  static_assert(D == 64 || D == 128 || D == 256, "head_dim must be 64, 128 or 256");
  static constexpr int kRowChunks = D / 8;  // 16-byte chunks of one K/V/Q row (>= 8: the swizzle needs 8)
  static constexpr int kStages = D == 64 ? 4 : (D == 128 ? 3 : 2);
  static constexpr int kTileBytes = kDecodeChunk * D * 2;  // K (or V) of one stage
  static constexpr int kStageBytes = 2 * kTileBytes;
  // Q's A fragments stay in registers for head_dim <= 128; Q then lives in the last stage until they
  // are loaded (that stage is first written by the main loop's first issue, after a barrier). At
  // head_dim 256 the fragments would take 64 more registers (ptxas spilled), so Q keeps its own
  // shared rows and is re-read with ldmatrix for every chunk (cheap next to the K/V traffic).
  static constexpr bool kQInRegs = D <= 128;
  static constexpr int kQOffset = kQInRegs ? (kStages - 1) * kStageBytes : kStages * kStageBytes;
  static constexpr int kPipeBytes = kStages * kStageBytes + (kQInRegs ? 0 : kDecodeRows * D * 2);
  static constexpr int kMergeStride = D + 8;  // floats per row of the warps' merge buffer (padded)
  static constexpr int kMergeBytes = kDecodeWarps * kDecodeRows * (kMergeStride + 2) * 4;
  static constexpr int kSmemBytes = kPipeBytes > kMergeBytes ? kPipeBytes : kMergeBytes;
  static constexpr int kMinBlocks = D <= 128 ? 2 : 1;
  static_assert(kStages >= 2, "the pipeline needs two stages");
};

namespace detail {

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared, asynchronously; zero-filled when !valid (src is not read then).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const int bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
#else
  (void)dst, (void)src, (void)valid;
  __trap();
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Wait until at most N of this thread's cp.async groups are pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Four 8x8 16-bit matrices; lanes 8i..8i+7 give the row addresses of matrix i, register i receives
// matrix i with lane L holding row L/4, elements 2(L%4), 2(L%4)+1 (transposed: column L/4, rows
// 2(L%4), 2(L%4)+1).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#else
  (void)addr;
  r[0] = r[1] = r[2] = r[3] = 0;
  __trap();
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], uint32_t addr) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#else
  (void)addr;
  r[0] = r[1] = r[2] = r[3] = 0;
  __trap();
#endif
}

// c += A B, mma.m16n8k16 row.col, f32 accumulate. Fragments (g = lane / 4, t = lane % 4):
//   A 16x16: a[0] = (row g, cols 2t, 2t+1), a[1] = (row g+8, same), a[2] = (row g, cols 2t+8, 2t+9),
//            a[3] = (row g+8, cols 2t+8, 2t+9); the lower column in the low half of the register.
//   B 16x8:  b0 = (rows 2t, 2t+1, col g), b1 = (rows 2t+8, 2t+9, col g).
//   C 16x8:  c[0], c[1] = (row g, cols 2t, 2t+1), c[2], c[3] = (row g+8, cols 2t, 2t+1).
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  (void)c, (void)a, (void)b0, (void)b1;
  __trap();
#endif
}

template <>
__device__ __forceinline__ void mma16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  (void)c, (void)a, (void)b0, (void)b1;
  __trap();
#endif
}

// Two floats as one register of two 16-bit values, `lo` in the low half (the lower column).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// Byte offset of 16-byte chunk `c` of row `r` in a swizzled tile of rows of RC chunks.
template <int RC>
__device__ __forceinline__ uint32_t swz(int r, int c) {
  return static_cast<uint32_t>((r * RC + (c ^ (r & 7))) * 16);
}

}  // namespace detail

template <typename T, int D>
__global__ void __launch_bounds__(kDecodeThreads, DecodeConfig<D>::kMinBlocks)
decode_attention_kernel(const AttentionArgs a) {
  using Cfg = DecodeConfig<D>;
  constexpr int S = Cfg::kStages;
  constexpr int RC = Cfg::kRowChunks;
  constexpr int KSTEPS = D / 16;                               // k16 steps of Q K^T, d16 steps of P V
  constexpr int LOADS = kDecodeChunk * RC / kDecodeThreads;    // 16-byte copies per thread per K (or V) chunk
  constexpr int KEY_STRIDE = kDecodeThreads / RC;              // keys between a thread's copies
  constexpr int QLOADS = kDecodeRows * RC / kDecodeThreads;    // 16-byte copies per thread of Q
  static_assert(kDecodeThreads % RC == 0 && LOADS * kDecodeThreads == kDecodeChunk * RC, "copy split");
  static_assert(QLOADS * kDecodeThreads == kDecodeRows * RC, "Q copy split");

  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ int s_meta[S][3];  // per stage: first key, end key, tile is full

  const int tid = threadIdx.x;
  const int lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;

  const WorkItem wi = work_item(a, blockIdx.x, kDecodeRows, false);
  const int kvh = wi.kvh, w = wi.w, G = wi.G, b = wi.b, n = wi.n, q0 = wi.q0, qi0 = wi.qi0, nrows = wi.nrows,
            row0 = wi.row0;
  const int split = blockIdx.y;
  if (row0 >= nrows) return;  // whole block uniform, before any barrier

  const uint32_t smem0 = detail::smem_addr(smem);
  const T* kp = static_cast<const T*>(a.k_cache);
  const T* vp = static_cast<const T*>(a.v_cache);
  const T* qp = static_cast<const T*>(a.q);

  // Q rows (zero past nrows) -> shared memory at kQOffset, as cp.async group 0.
  {
    const uint32_t qs = smem0 + Cfg::kQOffset;
#pragma unroll
    for (int i = 0; i < QLOADS; ++i) {
      const int p = tid + i * kDecodeThreads;
      const int r = p / RC, c = p % RC;
      const int rr = row0 + r;
      const bool ok = rr < nrows;
      const int qi = ok ? rr / G : 0, hg = ok ? rr - (rr / G) * G : 0;
      const T* src = qp + (static_cast<long long>(q0 + qi0 + qi) * a.num_qo_heads + kvh * G + hg) * D + c * 8;
      detail::cp_async16(qs + detail::swz<RC>(r, c), ok ? src : qp, ok);
    }
    detail::cp_async_commit();
  }

  // Key chunks of this split: tiles [my_beg, my_end) of the work item, nsub chunks each.
  const int t_beg = a.kt_indptr[w], t_end = a.kt_indptr[w + 1];
  const int per = (t_end - t_beg + a.num_splits - 1) / a.num_splits;
  const int my_beg = t_beg + split * per;
  const int my_end = min(t_end, my_beg + per);
  const int nsub = (a.block_k + kDecodeChunk - 1) / kDecodeChunk;
  const int nchunks = my_end > my_beg ? (my_end - my_beg) * nsub : 0;
  const int32_t* bt = a.block_table + b * a.bt_stride;
  const int32_t* seg = a.token_seg + b * a.seg_stride;
  const uint8_t* anc = a.ancestors + static_cast<long long>(b) * a.num_segs * a.num_segs;
  const int key_lo = tid / RC;  // this thread copies keys key_lo + i * KEY_STRIDE of a chunk
  const int chunk_c = tid % RC;

  // The chunk to issue next: its key range and this thread's pool slots (page * page_size + offset,
  // an int: a pool of 2^31 slots would hold >= 256 GiB; -1: past the end, zero-filled).
  const bool ps_pow2 = (a.page_size & (a.page_size - 1)) == 0;
  const int ps_shift = __ffs(a.page_size) - 1;
  int nx_k0 = 0, nx_kend = 0, nx_full = 1;
  int nx_slot[LOADS];
  auto fetch = [&](int c) {
    nx_k0 = 0;
    nx_kend = 0;
    nx_full = 1;
    if (c < nchunks) {
      const int ti = my_beg + c / nsub;
      const int sub = c - (c / nsub) * nsub;
      const int tb = a.kt_index[ti] * a.block_k;
      nx_k0 = tb + sub * kDecodeChunk;
      nx_kend = min(min(tb + a.block_k, n), nx_k0 + kDecodeChunk);
      nx_full = a.kt_full[ti] != 0;
    }
    if (ps_pow2) {  // block-uniform
#pragma unroll
      for (int i = 0; i < LOADS; ++i) {
        const int key = nx_k0 + key_lo + i * KEY_STRIDE;
        nx_slot[i] = key < nx_kend ? (bt[key >> ps_shift] << ps_shift) + (key & (a.page_size - 1)) : -1;
      }
    } else {
#pragma unroll
      for (int i = 0; i < LOADS; ++i) {
        const int key = nx_k0 + key_lo + i * KEY_STRIDE;
        nx_slot[i] = key < nx_kend ? bt[key / a.page_size] * a.page_size + key % a.page_size : -1;
      }
    }
  };
  auto issue = [&](int stage) {
    const uint32_t ks = smem0 + stage * Cfg::kStageBytes;
    const uint32_t vs = ks + Cfg::kTileBytes;
#pragma unroll
    for (int i = 0; i < LOADS; ++i) {
      const bool ok = nx_slot[i] >= 0;
      const long long off =
          ok ? (static_cast<long long>(nx_slot[i]) * a.num_kv_heads + kvh) * D + chunk_c * 8 : 0;
      const uint32_t dst = detail::swz<RC>(key_lo + i * KEY_STRIDE, chunk_c);
      detail::cp_async16(ks + dst, kp + off, ok);
      detail::cp_async16(vs + dst, vp + off, ok);
    }
    if (tid == 0) {
      s_meta[stage][0] = nx_k0;
      s_meta[stage][1] = nx_kend;
      s_meta[stage][2] = nx_full;
    }
  };

  // Prologue: chunks 0 .. S-2 into stages 0 .. S-2 (one group each, empty past the end).
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    fetch(s);
    if (s < nchunks) issue(s);
    detail::cp_async_commit();
  }
  fetch(S - 1);

  // Row metadata of this lane's two rows (g, g + 8): token index, segment, position.
  const int32_t* tpos = a.token_pos + b * a.seg_stride;
  int qpos[2], qseg[2], qrp[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int rr = row0 + g + 8 * h;
    if (rr < nrows) {
      qpos[h] = a.q_token[q0 + qi0 + rr / G];
      qseg[h] = seg[qpos[h]];
      qrp[h] = a.window ? tpos[qpos[h]] : 0;
    } else {
      qpos[h] = -1;
      qseg[h] = 0;
      qrp[h] = 0;
    }
  }

  // Q fragments (A operand) of k16 step kk: matrices rows 0-7 / 8-15 x columns 16kk / 16kk + 8.
  const uint32_t q_smem = smem0 + Cfg::kQOffset;
  const int q_row = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int q_csel = lane >> 4;
  constexpr int QF = Cfg::kQInRegs ? KSTEPS : 1;
  uint32_t qf[QF][4];
  detail::cp_async_wait<S - 1>();  // group 0 (Q) has landed for this thread ...
  __syncthreads();                 // ... and for every thread
  if constexpr (Cfg::kQInRegs) {
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) detail::ldmatrix_x4(qf[kk], q_smem + detail::swz<RC>(q_row, 2 * kk + q_csel));
  }

  float o[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

  // ldmatrix row / chunk of this lane inside its warp's 16 keys.
  const int k_row = warp * 16 + (lane & 7) + (lane >> 4) * 8;       // K: keys 0-7 / 8-15 x d 0-7 / 8-15
  const int k_csel = (lane >> 3) & 1;
  const int v_row = warp * 16 + (lane & 7) + ((lane >> 3) & 1) * 8;  // V: keys 0-7 / 8-15 x d 0-7 / 8-15
  const int v_csel = lane >> 4;

  for (int c = 0; c < nchunks; ++c) {
    detail::cp_async_wait<S - 2>();  // chunk c has landed (this thread's copies) ...
    __syncthreads();                 // ... everyone's; and stage (c - 1) % S is no longer read
    if (c + S - 1 < nchunks) issue((c + S - 1) % S);
    detail::cp_async_commit();
    fetch(c + S);

    const int st = c % S;
    const int k0 = s_meta[st][0], kend = s_meta[st][1];
    const bool full = s_meta[st][2] != 0;
    const int kw = k0 + warp * 16;  // first key of this warp
    if (kw >= kend) continue;       // warp-uniform: none of its keys exist
    const uint32_t ks = smem0 + st * Cfg::kStageBytes;
    const uint32_t vs = ks + Cfg::kTileBytes;

    // S = Q K^T for the warp's keys: s[j] covers keys kw + 8j .. kw + 8j + 7.
    float s[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    uint32_t vb[2][4];  // V fragments of the first two d16 steps, loaded before the softmax
    // Four independent chains (key tile j x parity of kk) instead of two; the K (and, without Q in
    // registers, Q) fragments of step kk + 1 are requested before the mmas of step kk.
    float s2[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
    uint32_t kb[2][4], qb[2][4];
    detail::ldmatrix_x4(kb[0], ks + detail::swz<RC>(k_row, k_csel));
    if constexpr (!Cfg::kQInRegs) detail::ldmatrix_x4(qb[0], q_smem + detail::swz<RC>(q_row, q_csel));
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
      const int cur = kk & 1;
      if (kk + 1 < KSTEPS) {
        detail::ldmatrix_x4(kb[cur ^ 1], ks + detail::swz<RC>(k_row, 2 * (kk + 1) + k_csel));
        if constexpr (!Cfg::kQInRegs)
          detail::ldmatrix_x4(qb[cur ^ 1], q_smem + detail::swz<RC>(q_row, 2 * (kk + 1) + q_csel));
      }
      const uint32_t(&qa)[4] = Cfg::kQInRegs ? qf[Cfg::kQInRegs ? kk : 0] : qb[cur];
      float(&acc)[2][4] = cur ? s2 : s;
      detail::mma16816<T>(acc[0], qa, kb[cur][0], kb[cur][1]);
      detail::mma16816<T>(acc[1], qa, kb[cur][2], kb[cur][3]);
    }
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] += s2[j][e];
    detail::ldmatrix_x4_trans(vb[0], vs + detail::swz<RC>(v_row, v_csel));  // V does not wait for P
    detail::ldmatrix_x4_trans(vb[1], vs + detail::swz<RC>(v_row, 2 + v_csel));
    if (a.softcap_mul != 0.f) {  // softcap * tanh(sm_scale * s / softcap), in base 2
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] = tanhf(s[j][e] * a.softcap_pre) * a.softcap_mul;
    } else {
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) s[j][e] *= a.scale_log2;
    }

    if (!full || kend - k0 < kDecodeChunk) {
#pragma unroll
      for (int j = 0; j < 2; ++j)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int key = kw + 8 * j + 2 * t4 + e;
          const bool in = key < kend;
          const int ks_ = in && !full ? seg[key] : 0;
          const int kp_ = in && !full && a.window ? tpos[key] : 0;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            bool vis = in;
            if (vis && !full)
              vis = ((ks_ == qseg[h] && key <= qpos[h]) || anc[qseg[h] * a.num_segs + ks_] != 0) &&
                    (a.window == 0 || qrp[h] - kp_ < a.window);
            if (!vis) s[j][2 * h + e] = -INFINITY;
          }
        }
    }

    // Online softmax (base 2). Row h of this lane: elements s[j][2h], s[j][2h+1].
    float corr[2], mu[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float mx = fmaxf(m[h], fmaxf(fmaxf(s[0][2 * h], s[0][2 * h + 1]), fmaxf(s[1][2 * h], s[1][2 * h + 1])));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      mu[h] = mx == -INFINITY ? 0.f : mx;  // nothing visible yet: every p is 0
      corr[h] = exp2f(m[h] - mu[h]);
      m[h] = mx;
    }
    float rs[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        s[j][e] = exp2f(s[j][e] - mu[e >> 1]);
        rs[e >> 1] += s[j][e];
      }
#pragma unroll
    for (int h = 0; h < 2; ++h) l[h] = l[h] * corr[h] + rs[h];
    // corr is exactly 1 where a row max did not move (exp2 of 0): skip the rescale when that holds for
    // every row of the warp (the common case once the max has settled).
    if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        o[i][0] *= corr[0];
        o[i][1] *= corr[0];
        o[i][2] *= corr[1];
        o[i][3] *= corr[1];
      }
    }
    // P as the A operand over the warp's 16 keys: the C layout of keys 0-7 / 8-15 is the A layout
    // of columns 0-7 / 8-15.
    const uint32_t pa[4] = {detail::pack2<T>(s[0][0], s[0][1]), detail::pack2<T>(s[0][2], s[0][3]),
                            detail::pack2<T>(s[1][0], s[1][1]), detail::pack2<T>(s[1][2], s[1][3])};
    // Steps kk and kk + 1 were loaded (before the softmax / the previous pair); step kk + 2 is
    // requested before their mmas.
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
      const int cur = kk & 1;
      uint32_t nxt[4];
      if (kk + 2 < KSTEPS) detail::ldmatrix_x4_trans(nxt, vs + detail::swz<RC>(v_row, 2 * (kk + 2) + v_csel));
      detail::mma16816<T>(o[2 * kk], pa, vb[cur][0], vb[cur][1]);
      detail::mma16816<T>(o[2 * kk + 1], pa, vb[cur][2], vb[cur][3]);
      if (kk + 2 < KSTEPS) {
#pragma unroll
        for (int e = 0; e < 4; ++e) vb[cur][e] = nxt[e];
      }
    }
  }

  // Merge the four warps through shared memory (the pipeline's stages are free after the wait).
  detail::cp_async_wait<0>();
  __syncthreads();
  float* s_o = reinterpret_cast<float*>(smem);                                  // [warp][row][kMergeStride]
  float* s_ml = s_o + kDecodeWarps * kDecodeRows * Cfg::kMergeStride;           // [warp][row][m, l]
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
    l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
  }
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float2* dst = reinterpret_cast<float2*>(s_o + (warp * kDecodeRows + g + 8 * h) * Cfg::kMergeStride + 8 * i +
                                              2 * t4);
      *dst = make_float2(o[i][2 * h], o[i][2 * h + 1]);
    }
  if (t4 == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      s_ml[(warp * kDecodeRows + g + 8 * h) * 2] = m[h];
      s_ml[(warp * kDecodeRows + g + 8 * h) * 2 + 1] = l[h];
    }
  }
  __syncthreads();
  for (int e = tid; e < kDecodeRows * D; e += kDecodeThreads) {
    const int r = e / D, d = e - (e / D) * D;
    const int rr = row0 + r;
    if (rr >= nrows) break;  // e grows with r
    float M = -INFINITY;
#pragma unroll
    for (int u = 0; u < kDecodeWarps; ++u) M = fmaxf(M, s_ml[(u * kDecodeRows + r) * 2]);
    float L = 0.f, O = 0.f;
    if (M != -INFINITY) {
#pragma unroll
      for (int u = 0; u < kDecodeWarps; ++u) {
        const float wgt = exp2f(s_ml[(u * kDecodeRows + r) * 2] - M);
        L += s_ml[(u * kDecodeRows + r) * 2 + 1] * wgt;
        O += s_o[(u * kDecodeRows + r) * Cfg::kMergeStride + d] * wgt;
      }
    }
    const float outv = L > 0.f ? O / L : 0.f;
    const float lse = L > 0.f ? (M + log2f(L)) * kLn2 : -INFINITY;
    const int qi = rr / G, hg = rr - (rr / G) * G;
    const long long row = static_cast<long long>(q0 + qi0 + qi) * a.num_qo_heads + kvh * G + hg;
    if (a.num_splits == 1) {
      static_cast<T*>(a.out)[row * D + d] = from_float<T>(outv);
      if (d == 0) a.lse[row] = lse;
    } else {
      const long long prow = static_cast<long long>(split) * a.total_q * a.num_qo_heads + row;
      a.part_o[prow * D + d] = outv;
      if (d == 0) a.part_lse[prow] = lse;
    }
  }
}

// Combine the splits' partial results: out = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M).
template <typename T, int D>
__global__ void __launch_bounds__(D) merge_splits_kernel(AttentionArgs a) {
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

// Row blocks (of 16 rows) of a work item of block_q queries x `group` heads.
inline int decode_row_blocks(int block_q, int group) {
  return ceil_div(static_cast<long long>(block_q) * group, kDecodeRows);
}

// Launch. Before: a.num_splits (decode_plan_splits) and a.num_row_blocks (decode_row_blocks) set,
// part_o/part_lse allocated when num_splits > 1. T: __half or __nv_bfloat16; head_dim 64, 128 or 256.
// Needs compute capability 8.0 or newer (cudaErrorNotSupported otherwise).
template <typename T>
cudaError_t decode_attention(const AttentionArgs& a, int head_dim, cudaStream_t stream) {
  if (a.num_work == 0 || a.total_q == 0) return cudaSuccess;
  int dev = 0, major = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err != cudaSuccess) return err;
  if (major < 8) return cudaErrorNotSupported;
  const long long gx = static_cast<long long>(a.num_work) * a.num_kv_heads * a.num_row_blocks;
  if (gx < 1 || gx > INT_MAX || a.num_splits < 1 || a.num_splits > 65535) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(a.num_splits));
  auto go = [&](auto kernel, int smem) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    kernel<<<grid, kDecodeThreads, smem, stream>>>(a);
    return cudaGetLastError();
  };
  err = cudaErrorInvalidValue;
  if (head_dim == 64) err = go(decode_attention_kernel<T, 64>, DecodeConfig<64>::kSmemBytes);
  if (head_dim == 128) err = go(decode_attention_kernel<T, 128>, DecodeConfig<128>::kSmemBytes);
  if (head_dim == 256) err = go(decode_attention_kernel<T, 256>, DecodeConfig<256>::kSmemBytes);
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
