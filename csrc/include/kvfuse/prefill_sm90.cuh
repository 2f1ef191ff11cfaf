// Segment-masked prefill attention over a paged K/V pool for Hopper (sm_90a): warp-specialised,
// wgmma on both products, the accumulators in registers (the FlashAttention-3 structure).
//
// Why this shape. Prefill does ~2 x 2 x 128 FLOP per K/V byte per 128 query rows: it is bound by the
// tensor cores, which on Hopper are fed by wgmma (one warpgroup, operands from shared memory, the
// accumulators in registers) rather than mma.sync. To keep them busy the loads must never wait on
// the math and the math never on the loads, so the two run in different warps.
//
// Block: three warpgroups (384 threads), one block per (work item, KV head, row block of 128 rows),
//   the work items taken last first (under a causal mask the last query tiles see the most keys).
//   Rows are (query, head) pairs of the work item's query tile that share the KV head, row = query *
//   G + head (G = Hq / Hkv), so one K/V tile serves the whole GQA group.
//   warpgroup 0, the producer, fills a ring of kStages (K, V) stages with the work item's key tiles
//     (kt_index, block_k = kBlockK keys). A tile inside the sequence, when pages hold a multiple of 8
//     rows and nest with the tile, arrives by TMA: the thread of page j of the tile (lane j of warp 0,
//     or at d >= 128 spread over the four warps: one warp alone issued too slowly at page 16) looks its
//     page up before the stage is free (the next tile's index a tile ahead) and issues one box per
//     64-column block, the bytes counted on the stage's "full" mbarriers; K goes as soon as its stage
//     is free, V as soon as its own is. Other tiles (other page sizes, the sequence's last partial
//     tile) are gathered row by row with 16-byte cp.async by all 128 threads, zero-filled past the
//     sequence's end; each thread waits for its copies, fences to the async proxy and arrives. Every
//     producer thread waits on the stage's "empty" mbarriers before touching it and arrives on "full"
//     for every tile, so none runs a phase ahead. It keeps 40 registers (setmaxnreg).
//   warpgroups 1 and 2, the consumers, own 64 rows each (232 registers each): per tile
//     S[64, kBlockK] = Q K^T   wgmma_ss (Q and K from shared memory, K-major)
//     online softmax in base 2 on the S registers (mask code only on partial tiles / the last tile)
//     O[64, D] += P V           wgmma_rs (P from registers: the S accumulator layout, packed to 16
//                               bits, is the A fragment layout; V MN-major from shared memory)
//     and release K once S is in registers, V once its product is done ("empty" K / V barriers).
//     At d 128 and 256 two tiles are in flight (kOverlap, FlashAttention-3's intra-warpgroup
//     overlap): S(t) is issued, O rescaled for t-1, O += P(t-1) V(t-1) issued, and tile t's softmax
//     runs while that product is on the tensor cores.
// Shared memory: every tile is stored as D / 64 column blocks of [rows][64] 16-bit elements in the
// 128-byte swizzle (16-byte chunk c of row r at chunk c ^ (r % 8)), the canonical layout the wgmma
// descriptors name; each block is 1024-byte aligned.
//
// Mask, LSE, soft-capping and the sliding window are the decode kernel's (attention.cuh); a query
// that sees nothing gets output 0 and LSE -inf.
//
// Measured (H200, bf16, Hq 32, Hkv 8, d 128, bench/RESULTS.md section 3), effective TFLOP/s at
// P=4K T=4 / P=8K T=8, page 16: cp.async gathers only 226 / 237; + TMA page boxes 439 / 461; + page
// look-ups by lane before the stage wait 489-526 (pages 16 and 128); + the overlapped loop, 3
// stages and the spread TMA issue 531 / 563 at page 16, 524 / 559 at page 128 (the serial loop
// 493 / 517 and 496 / 516 in the same run). The overlap alone gained only at page 128 (522 / 550):
// at page 16 the producer's one warp then could not issue the 32 boxes of a tile in time. At d 256,
// page 16, the spread issue took 504 / 520 to 564 / 590.
// Tried at d 128 and not used, each against this kernel in the same run: a ping-pong of the two
// consumers around [Q K^T, softmax, P V issue] (387-403); FlashAttention-3's ping-pong (named
// barriers around the issue of the two products only) 504-531 against 515-548; a persistent grid
// (the kernel looping over work items, one block per SM): the loop alone took 504-541 to 475-495,
// persistent or not; the tile index and full flag read a tile ahead, a further 1-4% slower; one box
// per producer thread (524 / 523 against 519 / 552). Not built: 2-CTA clusters with TMA multicast.
#pragma once

#include <cuda.h>  // CUtensorMap (the encode function is fetched from the driver at run time)

#include <atomic>
#include <type_traits>

#include "kvfuse/attention.cuh"
#include "kvfuse/wgmma.cuh"

namespace kvfuse {

constexpr int kPrefillThreads = 384;
constexpr int kPrefillRows = 128;  // rows of a block: two consumer warpgroups of 64

template <int D>
struct PrefillConfig {
  static_assert(D == 64 || D == 128 || D == 256, "head_dim must be 64, 128 or 256");
  static constexpr int kBlockK = D <= 128 ? 128 : 64;  // keys per tile (= the plan's block_k)
  // Measured on the H200 (bf16, Hq 32, Hkv 8; bench/RESULTS.md section 3): the overlapped consumer
  // loop and the TMA issue spread over four warps gain 6-9% at d 128 (3 stages) and the spread
  // 12-13% at d 256, page 16; at d 64 the serial loop is 4% faster, at d 256 the loops are even.
  static constexpr bool kOverlap = D != 64;   // two tiles in flight per consumer warpgroup
  static constexpr bool kSpread = D >= 128;   // TMA boxes issued by all four producer warps
  static constexpr int kStages = D == 256 ? 2 : 3;
  static constexpr int kRowChunks = D / 8;                     // 16-byte chunks of a row
  static constexpr int kQBytes = kPrefillRows * D * 2;         // both consumers' Q
  static constexpr int kTileBytes = kBlockK * D * 2;           // K (or V) of one stage
  static constexpr int kStageBytes = 2 * kTileBytes;
  static constexpr int kSmemBytes = kQBytes + kStages * kStageBytes + 1024;  // + alignment slack
  static_assert(kSmemBytes <= 227 * 1024, "shared memory per block");
};

namespace sm90 {

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
#else
  (void)bar, (void)count;
#endif
}

__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
#else
  (void)bar;
#endif
}

// Wait until the phase of parity `parity` of the barrier has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "{\n.reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
#else
  (void)bar, (void)parity;
#endif
}

// Make this thread's generic-proxy writes to shared memory (cp.async, st.shared) visible to the
// async proxy (wgmma's operand reads) once a barrier orders them.
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void fence_barrier_init() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// Named barrier ID (1..15) among the 128 threads of a warpgroup.
template <int ID>
__device__ __forceinline__ void warpgroup_sync() {
  asm volatile("bar.sync %0, 128;\n" ::"n"(ID) : "memory");
}

template <int R>
__device__ __forceinline__ void setmaxnreg_inc() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R));
#endif
}

template <int R>
__device__ __forceinline__ void setmaxnreg_dec() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R));
#endif
}

// mbarrier arrive that also expects `bytes` more bytes of asynchronous (TMA) copies in this phase.
__device__ __forceinline__ void mbar_arrive_expect_tx(uint32_t bar, uint32_t bytes) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
#else
  (void)bar, (void)bytes;
#endif
}

// Bulk tensor copy (TMA) of the box at (c0, c1, c2) of the 3-D tensor map to shared memory; the
// bytes are counted on the mbarrier `bar` when they land.
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2,
                                            uint32_t bar) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n" ::
          "r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
      : "memory");
#else
  (void)dst, (void)map, (void)c0, (void)c1, (void)c2, (void)bar;
#endif
}

__device__ __forceinline__ float ex2(float x) {  // 2^x, flushing denormals (one MUFU op)
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// wgmma shared-memory matrix descriptor of a 128-byte-swizzled operand starting at `addr` (shared
// address; its swizzle atom 1024-byte aligned): `lbo` / `sbo` the leading / stride byte offsets.
//   K-major (rows of 64 elements along K): sbo = 1024 (the next 8 rows), lbo unused.
//   MN-major: lbo = the next 64 elements along MN, sbo = 1024 (the next 8 elements along K).
__device__ __forceinline__ uint64_t desc_sw128(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  uint64_t d = static_cast<uint64_t>((addr & 0x3FFFF) >> 4);
  d |= static_cast<uint64_t>((lbo >> 4) & 0x3FFF) << 16;
  d |= static_cast<uint64_t>((sbo >> 4) & 0x3FFF) << 32;
  d |= static_cast<uint64_t>(1) << 62;  // layout type 1: 128-byte swizzle
  return d;
}

// Byte offset of 16-byte chunk `c` of row `r` in a tile of `rows` rows stored as column blocks of
// [rows][64] 16-bit elements, 128-byte swizzled.
__device__ __forceinline__ uint32_t sw128_offset(int rows, int r, int c) {
  return static_cast<uint32_t>((c >> 3) * rows * 128 + r * 128 + (((c & 7) ^ (r & 7)) << 4));
}

}  // namespace sm90

// The K and V pools as 3-D tensors [P * page_size rows][Hkv][D] for TMA: boxes of 64 columns x 1
// head x `box_rows` rows, 128-byte swizzled (prefill_maps). use = 0: gather every tile with cp.async.
struct PrefillMaps {
  CUtensorMap k, v;
  int use;
  int box_rows;  // min(page_size, block_k): rows of one box
};

template <typename T, int D>
__global__ void __launch_bounds__(kPrefillThreads, 1)
prefill_sm90_kernel(const AttentionArgs a, const __grid_constant__ PrefillMaps maps) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using Cfg = PrefillConfig<D>;
  constexpr bool kOverlap = Cfg::kOverlap, kSpread = Cfg::kSpread;
  constexpr int BK = Cfg::kBlockK;
  constexpr int S = Cfg::kStages;
  constexpr int RC = Cfg::kRowChunks;
  constexpr int NS = BK / 2;  // S accumulators per thread
  constexpr int NO = D / 2;   // O accumulators per thread

  extern __shared__ unsigned char smem_raw[];
  __shared__ __align__(8) uint64_t bars[4 * S];  // full K [S] | full V [S] | empty K [S] | empty V [S]

  const int tid = threadIdx.x;
  const int wg = tid >> 7;

  // last work items first: under a causal mask they see the most keys
  const WorkItem wi = work_item(a, blockIdx.x, kPrefillRows, true);
  const int kvh = wi.kvh, w = wi.w, G = wi.G, b = wi.b, n = wi.n, q0 = wi.q0, qi0 = wi.qi0, nrows = wi.nrows,
            row0 = wi.row0;
  if (row0 >= nrows) return;  // whole block uniform, before any barrier

  const uint32_t base = (detail::smem_addr(smem_raw) + 1023u) & ~1023u;
  const uint32_t q_smem = base;
  const uint32_t kv_smem = base + Cfg::kQBytes;
  const uint32_t bar0 = detail::smem_addr(bars);
  auto full_k = [&](int s) { return bar0 + 8u * s; };
  auto full_v = [&](int s) { return bar0 + 8u * (S + s); };
  auto empty_k = [&](int s) { return bar0 + 8u * (2 * S + s); };
  auto empty_v = [&](int s) { return bar0 + 8u * (3 * S + s); };
  if (tid == 0) {
    for (int s = 0; s < S; ++s) {
      sm90::mbar_init(full_k(s), 128);
      sm90::mbar_init(full_v(s), 128);
      sm90::mbar_init(empty_k(s), 256);
      sm90::mbar_init(empty_v(s), 256);
    }
    sm90::fence_barrier_init();
  }
  __syncthreads();

  const int t_beg = a.kt_indptr[w];
  const int ntiles = a.kt_indptr[w + 1] - t_beg;
  const int32_t* bt = a.block_table + b * a.bt_stride;

  if (wg == 0) {
    // ---------------------------------------------------------------- producer
    sm90::setmaxnreg_dec<40>();
    const T* kp = static_cast<const T*>(a.k_cache);
    const T* vp = static_cast<const T*>(a.v_cache);
    constexpr int KEY_STRIDE = 128 / RC;
    constexpr int LOADS = BK / KEY_STRIDE;
    const int key_lo = tid / RC, chunk = tid % RC;
    const int ps = a.page_size;
    const bool ps_pow2 = (ps & (ps - 1)) == 0;
    const int ps_shift = __ffs(ps) - 1;
    const int lane = tid & 31;
    const int rows = maps.box_rows;
    // TMA: this thread loads box row pj * rows of a tile if that is < BK (lane j of warp 0: page j, or
    // spread over the four warps: page warp + 4 * lane)
    const int pj = kSpread ? (tid >> 5) + 4 * lane : (tid < 32 ? lane : BK);
    int nxt_k0 = ntiles > 0 ? a.kt_index[t_beg] * BK : 0;
    for (int it = 0; it < ntiles; ++it) {
      const int st = it % S;
      const int k0 = nxt_k0;
      const int kend = min(k0 + BK, n);
      if (it + 1 < ntiles) nxt_k0 = a.kt_index[t_beg + it + 1] * BK;  // one tile ahead
      const bool whole = maps.use && kend - k0 == BK;
      // the tile's page rows are read before the wait, so their latency hides behind the consumers
      int row = 0;
      if (whole && pj * rows < BK) {
        const int key = k0 + pj * rows;
        row = ps_pow2 ? (bt[key >> ps_shift] << ps_shift) + (key & (ps - 1)) : bt[key / ps] * ps + key % ps;
      }
      const uint32_t free_ph = ((it / S) & 1) ^ 1;
      const uint32_t ks = kv_smem + st * Cfg::kStageBytes;
      if (whole) {
        // a whole tile: the thread of page pj issues a box per 64-column block, for K once its stage
        // is free, then for V once that one is (all 128 threads arrive on every tile, so no thread
        // runs a phase ahead)
#pragma unroll
        for (int m = 0; m < 2; ++m) {
          const uint32_t full = m == 0 ? full_k(st) : full_v(st);
          sm90::mbar_wait(m == 0 ? empty_k(st) : empty_v(st), free_ph);
          // thread 0's arrival carries the bytes to expect; the phase cannot complete before it
          if (tid == 0) sm90::mbar_arrive_expect_tx(full, Cfg::kTileBytes);
          if (pj * rows < BK) {
#pragma unroll
            for (int cb = 0; cb < D / 64; ++cb)
              sm90::tma_load_3d(ks + m * Cfg::kTileBytes + cb * BK * 128 + pj * rows * 128,
                                m == 0 ? &maps.k : &maps.v, cb * 64, kvh, row, full);
          }
          if (tid != 0) sm90::mbar_arrive(full);
        }
        continue;
      }
#pragma unroll 1
      for (int m = 0; m < 2; ++m) {
        const T* src0 = m == 0 ? kp : vp;
        const uint32_t dst0 = ks + m * Cfg::kTileBytes;
        sm90::mbar_wait(m == 0 ? empty_k(st) : empty_v(st), free_ph);
#pragma unroll 4
        for (int i = 0; i < LOADS; ++i) {
          const int r = key_lo + i * KEY_STRIDE;
          const int key = k0 + r;
          const bool ok = key < kend;
          long long slot = 0;
          if (ok)
            slot = ps_pow2 ? (static_cast<long long>(bt[key >> ps_shift]) << ps_shift) + (key & (ps - 1))
                           : static_cast<long long>(bt[key / ps]) * ps + key % ps;
          detail::cp_async16(dst0 + sm90::sw128_offset(BK, r, chunk),
                             src0 + (slot * a.num_kv_heads + kvh) * D + chunk * 8, ok);
        }
        detail::cp_async_commit();
      }
      detail::cp_async_wait<1>();  // K landed (this thread's copies)
      sm90::fence_proxy_async();
      sm90::mbar_arrive(full_k(st));
      detail::cp_async_wait<0>();  // V landed
      sm90::fence_proxy_async();
      sm90::mbar_arrive(full_v(st));
    }
  } else {
    // ---------------------------------------------------------------- consumers
    sm90::setmaxnreg_inc<232>();
    const int c = wg - 1;             // consumer: rows 64c .. 64c + 63 of the block
    const int ctid = tid - 128 * wg;  // 0..127
    const int warp = ctid >> 5, lane = tid & 31;
    const int g = lane >> 2, t4 = lane & 3;
    const uint32_t qs = q_smem + c * 64 * D * 2;

    // Q rows (zero past nrows) -> shared memory, swizzled.
    {
      const T* qp = static_cast<const T*>(a.q);
      constexpr int QLOADS = 64 * RC / 128;
#pragma unroll
      for (int i = 0; i < QLOADS; ++i) {
        const int p = ctid + i * 128;
        const int r = p / RC, ch = p % RC;
        const int rr = row0 + 64 * c + r;
        const bool ok = rr < nrows;
        const int qi = ok ? rr / G : 0, hg = ok ? rr - (rr / G) * G : 0;
        const T* src = qp + (static_cast<long long>(q0 + qi0 + qi) * a.num_qo_heads + kvh * G + hg) * D + ch * 8;
        detail::cp_async16(qs + sm90::sw128_offset(64, r, ch), ok ? src : qp, ok);
      }
      detail::cp_async_commit();
      detail::cp_async_wait<0>();
      sm90::fence_proxy_async();
      if (c == 0)
        sm90::warpgroup_sync<1>();
      else
        sm90::warpgroup_sync<2>();
    }

    // This thread's two rows (g, g + 8 of its warp's 16): token index, segment, position.
    const int32_t* seg = a.token_seg + b * a.seg_stride;
    const int32_t* tpos = a.token_pos + b * a.seg_stride;
    const uint8_t* anc = a.ancestors + static_cast<long long>(b) * a.num_segs * a.num_segs;
    int qtok[2], qseg[2], qrp[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int rr = row0 + 64 * c + 16 * warp + g + 8 * h;
      if (rr < nrows) {
        qtok[h] = a.q_token[q0 + qi0 + rr / G];
        qseg[h] = seg[qtok[h]];
        qrp[h] = a.window ? tpos[qtok[h]] : 0;
      } else {
        qtok[h] = -1;  // sees nothing; never written
        qseg[h] = 0;
        qrp[h] = 0;
      }
    }

    float o[NO];
#pragma unroll
    for (int i = 0; i < NO; ++i) o[i] = 0.f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    // descriptors of stage 0 / k step 0; a byte offset o adds o >> 4 (addresses stay below 2^18)
    const uint64_t dq0 = sm90::desc_sw128(qs, 16, 1024);
    const uint64_t dk0 = sm90::desc_sw128(kv_smem, 16, 1024);
    const uint64_t dv0 = sm90::desc_sw128(kv_smem + Cfg::kTileBytes, BK * 128, 1024);
    const float sc = a.softcap_mul != 0.f ? 1.f : a.scale_log2;  // scores -> base-2 logits

    // Tile `it`'s scores: optional soft-capping, the mask (partial / last tiles only), then the online
    // softmax in base 2 (logit = sc * s; row h of this thread: s[4j + 2h], s[4j + 2h + 1]). s becomes
    // the unnormalised probabilities, m the new row maxima; corr[h] rescales what came before, rs[h]
    // is the row sum of this tile.
    auto softmax = [&](float (&s)[NS], int it, float (&corr)[2], float (&rs)[2]) {
      const int k0 = a.kt_index[t_beg + it] * BK;
      const int kend = min(k0 + BK, n);
      const bool full = a.kt_full[t_beg + it] != 0 && kend - k0 == BK;
      if (a.softcap_mul != 0.f) {
#pragma unroll
        for (int i = 0; i < NS; ++i) s[i] = tanhf(s[i] * a.softcap_pre) * a.softcap_mul;
      }
      if (!full) {
#pragma unroll
        for (int j = 0; j < BK / 8; ++j)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int key = k0 + 8 * j + 2 * t4 + e;
            const bool in = key < kend;
            const int kseg = in ? seg[key] : 0;
            const int kpos = in && a.window ? tpos[key] : 0;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const bool vis = in && ((kseg == qseg[h] && key <= qtok[h]) || anc[qseg[h] * a.num_segs + kseg] != 0) &&
                               (a.window == 0 || qrp[h] - kpos < a.window) && qtok[h] >= 0;
              if (!vis) s[4 * j + 2 * h + e] = -INFINITY;
            }
          }
      }
      float mu[2];
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float mx = -INFINITY;
#pragma unroll
        for (int j = 0; j < BK / 8; ++j) mx = fmaxf(mx, fmaxf(s[4 * j + 2 * h], s[4 * j + 2 * h + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float mnew = fmaxf(m[h], mx * sc);
        mu[h] = mnew == -INFINITY ? 0.f : mnew;
        corr[h] = sm90::ex2(m[h] - mu[h]);
        m[h] = mnew;
      }
      rs[0] = rs[1] = 0.f;
#pragma unroll
      for (int i = 0; i < NS; ++i) {
        const int h = (i >> 1) & 1;
        s[i] = sm90::ex2(fmaf(s[i], sc, -mu[h]));
        rs[h] += s[i];
      }
    };
    // O rescaled by corr (skipped when no row max of the warp moved: corr is then exactly 1)
    auto rescale_o = [&](const float (&corr)[2]) {
      if (__any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f)) {
#pragma unroll
        for (int i = 0; i < NO; ++i) o[i] *= corr[(i >> 1) & 1];
      }
    };
    // P as A fragments: keys 16kk .. 16kk + 15 are n8 blocks 2kk, 2kk + 1 of S
    auto pack = [&](const float (&s)[NS], uint32_t (&pa)[BK / 16][4]) {
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        pa[kk][0] = detail::pack2<T>(s[8 * kk + 0], s[8 * kk + 1]);
        pa[kk][1] = detail::pack2<T>(s[8 * kk + 2], s[8 * kk + 3]);
        pa[kk][2] = detail::pack2<T>(s[8 * kk + 4], s[8 * kk + 5]);
        pa[kk][3] = detail::pack2<T>(s[8 * kk + 6], s[8 * kk + 7]);
      }
    };
    auto issue_qk = [&](float (&s)[NS], int st) {  // S = Q K^T of stage st (one commit group)
      const uint64_t stage = static_cast<uint64_t>(st * Cfg::kStageBytes) >> 4;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint64_t step = ((kk >> 2) * 64 * 128 + (kk & 3) * 32) >> 4;
        const uint64_t kstep = ((kk >> 2) * BK * 128 + (kk & 3) * 32) >> 4;
        sm90::wgmma_ss<T, BK>(s, dq0 + step, dk0 + stage + kstep, kk > 0);
      }
      sm90::wgmma_commit();
    };
    auto issue_pv = [&](const uint32_t (&pa)[BK / 16][4], int st) {  // O += P V of stage st (one group)
      const uint64_t stage = static_cast<uint64_t>(st * Cfg::kStageBytes) >> 4;
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) sm90::wgmma_rs<T, D>(o, pa[kk], dv0 + stage + ((kk * 16 * 128) >> 4), true);
      sm90::wgmma_commit();
    };
    auto pv_now = [&](const uint32_t (&pa)[BK / 16][4], int it) {  // O += P V of tile it, waited for
      const int st = it % S;
      sm90::mbar_wait(full_v(st), (it / S) & 1);
      sm90::fence_operands(o);
      sm90::wgmma_fence();
      issue_pv(pa, st);
      sm90::wgmma_wait<0>();
      sm90::fence_operands(o);
      sm90::mbar_arrive(empty_v(st));
    };

    float s[NS], corr[2], rs[2];
    uint32_t pa[BK / 16][4];
    if constexpr (kOverlap) {
      // Two tiles in flight per warpgroup (FlashAttention-3's intra-warpgroup overlap): S(t) = Q K(t)^T
      // is issued, O is rescaled for tile t-1 meanwhile, O += P(t-1) V(t-1) is issued, and tile t's
      // softmax runs while that product is on the tensor cores. K and V stages are released
      // separately: K once S is in registers, V once its product is done. P is packed after the
      // product's wait (packing while it runs serialises the wgmmas: ptxas C7513).
      if (ntiles > 0) {
        sm90::mbar_wait(full_k(0), 0);
        sm90::wgmma_fence();
        issue_qk(s, 0);
        sm90::wgmma_wait<0>();
        sm90::fence_operands(s);
        sm90::mbar_arrive(empty_k(0));
        softmax(s, 0, corr, rs);
        l[0] = rs[0], l[1] = rs[1];
        corr[0] = corr[1] = 1.f;  // O is still 0
        pack(s, pa);
      }
      for (int it = 1; it < ntiles; ++it) {
        const int st = it % S, pst = (it - 1) % S;
        sm90::mbar_wait(full_k(st), (it / S) & 1);
        sm90::wgmma_fence();
        issue_qk(s, st);
        rescale_o(corr);
        sm90::mbar_wait(full_v(pst), ((it - 1) / S) & 1);
        sm90::fence_operands(o);
        sm90::wgmma_fence();
        issue_pv(pa, pst);
        sm90::wgmma_wait<1>();  // S(t) done, P(t-1) V(t-1) may still run
        sm90::fence_operands(s);
        sm90::mbar_arrive(empty_k(st));
        softmax(s, it, corr, rs);
#pragma unroll
        for (int h = 0; h < 2; ++h) l[h] = l[h] * corr[h] + rs[h];
        sm90::wgmma_wait<0>();
        sm90::fence_operands(o);
        sm90::fence_operands(pa);
        sm90::mbar_arrive(empty_v(pst));
        pack(s, pa);
      }
      if (ntiles > 0) {
        rescale_o(corr);
        pv_now(pa, ntiles - 1);
      }
    } else {
      for (int it = 0; it < ntiles; ++it) {
        const int st = it % S;
        const uint32_t ph = (it / S) & 1;
        sm90::mbar_wait(full_k(st), ph);
        sm90::wgmma_fence();
        issue_qk(s, st);
        sm90::wgmma_wait<0>();
        sm90::fence_operands(s);
        sm90::mbar_arrive(empty_k(st));
        softmax(s, it, corr, rs);
#pragma unroll
        for (int h = 0; h < 2; ++h) l[h] = l[h] * corr[h] + rs[h];
        rescale_o(corr);
        pack(s, pa);
        pv_now(pa, it);
      }
    }

    // epilogue: normalise, write O and LSE straight from the registers
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      l[h] += __shfl_xor_sync(0xffffffffu, l[h], 1);
      l[h] += __shfl_xor_sync(0xffffffffu, l[h], 2);
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int rr = row0 + 64 * c + 16 * warp + g + 8 * h;
      if (rr >= nrows) continue;
      const int qi = rr / G, hg = rr - (rr / G) * G;
      const long long row = static_cast<long long>(q0 + qi0 + qi) * a.num_qo_heads + kvh * G + hg;
      const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
      T* out = static_cast<T*>(a.out) + row * D;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        const uint32_t v = detail::pack2<T>(o[4 * j + 2 * h] * inv, o[4 * j + 2 * h + 1] * inv);
        *reinterpret_cast<uint32_t*>(out + 8 * j + 2 * t4) = v;
      }
      if (t4 == 0) a.lse[row] = l[h] > 0.f ? (m[h] + log2f(l[h])) * kLn2 : -INFINITY;
    }
  }
#else
  (void)a, (void)maps;
  __trap();
#endif
}

static __global__ void sm90a_probe_kernel(int* has) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  *has = 1;
#else
  *has = 0;
#endif
}

// Whether prefill_sm90_kernel runs on `device`: 1 yes (compute capability 9.0 and this binary carries
// its sm_90a code; a build for plain sm_90 compiles the kernel to a trap), 0 no, -1 the probe could not
// run (it allocates, launches and synchronises: not during a CUDA-graph capture; a failure is not
// cached). The answer is cached per device.
inline int prefill_sm90_available(int device) {
  static std::atomic<int> known[64];  // 0: not probed, 1: no, 2: yes
  if (device < 0 || device >= 64) return 0;
  const int k = known[device].load();
  if (k) return k == 2 ? 1 : 0;
  int major = 0, prev = 0, has = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) return -1;
  if (major != 9) {
    known[device] = 1;
    return 0;
  }
  if (cudaGetDevice(&prev) != cudaSuccess || cudaSetDevice(device) != cudaSuccess) return -1;
  int* d_has = nullptr;
  bool ok = cudaMalloc(&d_has, sizeof(int)) == cudaSuccess;
  if (ok) {
    sm90a_probe_kernel<<<1, 1>>>(d_has);
    ok = cudaGetLastError() == cudaSuccess && cudaMemcpy(&has, d_has, sizeof(int), cudaMemcpyDeviceToHost) == cudaSuccess;
  }
  if (d_has) cudaFree(d_has);
  cudaSetDevice(prev);
  if (!ok) return -1;
  known[device] = has ? 2 : 1;
  return has ? 1 : 0;
}

// Row blocks (of 128 rows) of a work item of block_q queries x `group` heads.
inline int prefill_row_blocks(int block_q, int group) {
  return ceil_div(static_cast<long long>(block_q) * group, kPrefillRows);
}

// Launch. Before: a.num_row_blocks = prefill_row_blocks(...), a.block_k = PrefillConfig<D>::kBlockK.
// T: __half or __nv_bfloat16; head_dim 64, 128 or 256. Needs compute capability 9.0 (sm_90a code):
// cudaErrorNotSupported otherwise.
namespace detail {

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled from the driver (no link against libcuda); nullptr where it is missing.
inline EncodeTiled encode_tiled() {
  static EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult status{};
#if CUDART_VERSION >= 12050
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &status) !=
        cudaSuccess)
      p = nullptr;
#else
    if (cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &status) != cudaSuccess) p = nullptr;
#endif
    if (status != cudaDriverEntryPointSuccess) p = nullptr;
    (void)cudaGetLastError();
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

// One pool as a TMA tensor map, or false (then the kernel gathers with cp.async).
template <typename T>
bool encode_pool_map(CUtensorMap* map, const void* pool, long long rows, int hkv, int d, int box_rows) {
  EncodeTiled fn = encode_tiled();
  if (fn == nullptr || reinterpret_cast<std::uintptr_t>(pool) % 16) return false;
  const CUtensorMapDataType type =
      std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const cuuint64_t dims[3] = {static_cast<cuuint64_t>(d), static_cast<cuuint64_t>(hkv),
                              static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[2] = {static_cast<cuuint64_t>(d) * 2, static_cast<cuuint64_t>(hkv) * d * 2};
  const cuuint32_t box[3] = {64, 1, static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t elem[3] = {1, 1, 1};
  return fn(map, type, 3, const_cast<void*>(pool), dims, strides, box, elem, CU_TENSOR_MAP_INTERLEAVE_NONE,
            CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) ==
         CUDA_SUCCESS;
}

}  // namespace detail

// The launch's tensor maps: TMA boxes of whole pages (or block_k rows of a larger page) when a page
// holds a multiple of 8 rows (a box then starts on a swizzle atom) and pages and tiles nest.
template <typename T>
PrefillMaps prefill_maps(const AttentionArgs& a, int head_dim, long long num_pages, int block_k) {
  PrefillMaps m{};
  const int ps = a.page_size;
  const bool nest = ps % 8 == 0 && ps <= 256 && (block_k % ps == 0 || ps % block_k == 0);
  if (!nest) return m;
  m.box_rows = std::min(ps, block_k);
  const long long rows = num_pages * ps;
  if (rows > INT_MAX) return m;  // TMA row coordinates are int32: gather with cp.async
  m.use = detail::encode_pool_map<T>(&m.k, a.k_cache, rows, a.num_kv_heads, head_dim, m.box_rows) &&
          detail::encode_pool_map<T>(&m.v, a.v_cache, rows, a.num_kv_heads, head_dim, m.box_rows);
  return m;
}

template <typename T>
cudaError_t prefill_attention_sm90(const AttentionArgs& a, int head_dim, long long num_pages, cudaStream_t stream) {
  if (a.num_work == 0 || a.total_q == 0) return cudaSuccess;
  int dev = 0, major = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
  if (err != cudaSuccess) return err;
  if (major != 9) return cudaErrorNotSupported;
  const long long gx = static_cast<long long>(a.num_work) * a.num_kv_heads * a.num_row_blocks;
  if (gx < 1 || gx > INT_MAX) return cudaErrorInvalidConfiguration;
  auto go = [&](auto kernel, int smem, int block_k) {
    if (a.block_k != block_k) return cudaErrorInvalidValue;
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
    const PrefillMaps maps = prefill_maps<T>(a, head_dim, num_pages, block_k);
    kernel<<<static_cast<unsigned>(gx), kPrefillThreads, smem, stream>>>(a, maps);
    return cudaGetLastError();
  };
  if (head_dim == 64) return go(prefill_sm90_kernel<T, 64>, PrefillConfig<64>::kSmemBytes, PrefillConfig<64>::kBlockK);
  if (head_dim == 128)
    return go(prefill_sm90_kernel<T, 128>, PrefillConfig<128>::kSmemBytes, PrefillConfig<128>::kBlockK);
  if (head_dim == 256)
    return go(prefill_sm90_kernel<T, 256>, PrefillConfig<256>::kSmemBytes, PrefillConfig<256>::kBlockK);
  return cudaErrorInvalidValue;
}

}  // namespace kvfuse
