// The slot engine shared by rerotate and compose: for every listed slot, every layer and every
// head, rotate the key (NeoX or interleaved pairs, first `rotary_dim` dims) from the source slot into
// the destination slot, and (compose only) copy the key's other dims and the value.
//
// Work is organised by rows. A row is one (layer, listed slot): the H * D contiguous elements of
// every head of that slot in that layer. The row is cut into "items" of one or two vectors (VEC
// elements: 16 bytes when the shapes allow), numbered the same way in every row:
//   [0, H * CPH)                rotation items: NeoX, VEC pairs (j, j + rd/2) read as two vectors;
//                               interleaved, VEC/2 pairs (2j, 2j+1) in one vector
//   [.., + H * CPT)             (compose) copies of the key's dims >= rotary_dim
//   [.., + H * CPV)             (compose) copies of the value
// (a copy item is two vectors, x and x + span/2, when the span halves into whole vectors). A row is
// handled by `cols` threads; thread `col` always takes the items col + cols * m, m < K. So which
// items a thread moves, where they sit in the row and which cos/sin columns they need are the same in
// every row: they are worked out once, before the loop, and the hot loop has no division and no
// per-vector index decode. The launcher makes cols a multiple of CPH (or K = 1), so all rotation
// items of a thread are the same pair chunk of different heads: the thread reads its cos/sin columns
// of a row once and uses them for all its heads.
//
// Per iteration a thread takes ROWS = slot_rows(K) rows (slots of the list a block-row apart, so a
// warp covers consecutive slots: neighbouring addresses for a page-ordered list). It issues all data
// loads (8 x 16 bytes for NeoX K 4) and the cos/sin loads before any compute, then loads the next
// iteration's slot ids and table indices (so that the dependent slot id -> address round trip is off
// the critical path), then rotates and stores. One block per tile of rows (the grid-stride loop runs
// once), blockIdx.y the layer. Index math: one 64-bit row base per row; offsets inside a row are 32-bit.
//
// Rows too wide for K <= 4 items per thread with cols <= 256 are split into `npass` passes over the
// rows, each with a different item subset (same code; only very wide rows need it).
//
// Launch, as measured on the H200 (bench/TARGETS.md sections 1 / 2, TB/s of rerotate / compose): a
// persistent grid of one wave of resident blocks 3.79 / 3.83; one block per tile 3.95 / 3.81; two
// rows per thread and iteration for K 4 plans 3.78 / 3.81; both 3.82 / 3.97. So: blocks of about 128
// threads, one block per tile; compose's K 4 plans (e.g. section 2) run slot_rotate_wide_kernel (two
// rows per iteration, 16 x 16 B loads in flight per thread for NeoX, under a higher register cap).
#pragma once

#include "kvfuse/common.cuh"

namespace kvfuse {

struct SlotRotateParams {
  void* k;                    // [L, slots, H, D], rotated (in place when src == dst)
  void* v;                    // same shape, copied src -> dst; nullptr for rerotate
  const void* src_slots;      // [n] int32 or int64 (slots64)
  const void* dst_slots;      // [n]; equals src_slots for rerotate
  bool slots64;
  const int32_t* table_idx;   // [n] rows of cos / sin
  const float* cos;           // [U, rotary_dim / 2]
  const float* sin;
  long long n;                // slots listed
  long long layer_stride;     // elements between layers (slots * H * D)
  int num_layers, num_heads, head_dim, rotary_dim;
  int cols;                   // threads per row (set by the launcher)
  int npass;                  // passes over the rows (set by the launcher)
};

constexpr int kRotaryThreads = 256;  // at most; a block holds a whole number of rows of `cols` threads
constexpr int kRotaryBlock = 128;    // the block size aimed at
constexpr int kRotaryItems = 4;      // items per thread per iteration: K per row x ROWS rows

// Rows a thread takes per iteration when it has K items per row: 4 items in all, except K 1 (rows
// narrower than a few heads), where every row brings its own cos/sin chunk (2 x VEC floats for NeoX,
// twice the bytes of the data): 2 rows keep it under 128 registers.
constexpr int slot_rows(int K) { return K == 1 ? 2 : kRotaryItems / K; }

namespace detail {

enum : int { kItemNone = 0, kItemRot = 1, kItemCopyK = 2, kItemCopyV = 3 };

__device__ __forceinline__ long long load_slot(const void* slots, bool s64, long long i) {
  return s64 ? static_cast<long long>(__ldg(static_cast<const long long*>(slots) + i))
             : static_cast<long long>(__ldg(static_cast<const int*>(slots) + i));
}

template <typename T, int VEC, bool INTERLEAVED>
__device__ __forceinline__ void rotate_vec(Vec<T, VEC>& a, Vec<T, VEC>& b, const float* c, const float* s) {
  if constexpr (INTERLEAVED) {
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) {
      const float x1 = to_float(a.v[2 * i]), x2 = to_float(a.v[2 * i + 1]);
      a.v[2 * i] = from_float<T>(x1 * c[i] - x2 * s[i]);
      a.v[2 * i + 1] = from_float<T>(x2 * c[i] + x1 * s[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const float x1 = to_float(a.v[i]), x2 = to_float(b.v[i]);
      a.v[i] = from_float<T>(x1 * c[i] - x2 * s[i]);
      b.v[i] = from_float<T>(x2 * c[i] + x1 * s[i]);
    }
  }
}

}  // namespace detail

// Copy items (compose) of a span of `span` elements per head: two vectors (x, x + span / 2) when the
// span halves into whole vectors, so that every thread moves 32 bytes per item; else one vector.
__host__ __device__ inline int copy_items(int span, int vec) {
  return span % (2 * vec) == 0 ? span / (2 * vec) : span / vec;
}
__host__ __device__ inline int copy_second(int span, int vec) { return span % (2 * vec) == 0 ? span / 2 : 0; }

// Register cap of a kernel. Without one ptxas either spills a few bytes (when it picks its own cap at
// 40 / 64 registers) or takes up to 142; with it the hot rerotate kernels (NeoX bf16 K 4: 8 x 16 B
// loads in flight) fit 96 registers, i.e. 20 resident warps per SM instead of 16, without spilling;
// K 2 (two rows, each with its cos/sin) and compose (more kinds of items) need more.
constexpr int slot_max_regs(bool compose, int K) { return (compose ? 112 : 96) + (K == 2 ? 16 : 0); }
#if defined(__CUDACC_VER_MAJOR__) && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 4))
#define KVFUSE_SLOT_REGS(n) __maxnreg__(n)
#else
#define KVFUSE_SLOT_REGS(n) __launch_bounds__(kRotaryThreads, 1)
#endif

// Cap of slot_rotate_wide_kernel (K 4, two rows per iteration: twice the data and cos/sin registers).
// NeoX bf16 VEC 8 needs 168 (at 128 / 144 ptxas spilled ~100 bytes), so 3 blocks of 128 threads
// (12 warps, each thread 16 x 16 B loads in flight) per SM.
constexpr int slot_wide_max_regs(bool) { return 168; }

namespace detail {

// The kernel body; ROWS rows per thread and iteration (slot_rows(K), or twice that for the wide
// kernel).
template <typename T, int VEC, bool INTERLEAVED, bool COMPOSE, int K, int ROWS>
__device__ __forceinline__ void slot_rotate_body(const SlotRotateParams& p) {
  static_assert(K == 1 || K == 2 || K == 4, "K is 1, 2 or 4");
  constexpr int CV = INTERLEAVED ? VEC / 2 : VEC;  // cos/sin values per rotation item
  static_assert(CV >= 1, "interleaved items need VEC >= 2");
  const int half = p.rotary_dim / 2;
  const int D = p.head_dim, H = p.num_heads;
  const int cph = (INTERLEAVED ? p.rotary_dim : half) / VEC;
  const int tail = D - p.rotary_dim;
  const int cpt = COMPOSE ? copy_items(tail, VEC) : 0, tail_b = copy_second(tail, VEC);
  const int cpv = COMPOSE ? copy_items(D, VEC) : 0, v_b = copy_second(D, VEC);
  const int n_rot = H * cph, n_tail = H * cpt, n_items = n_rot + n_tail + H * cpv;
  const int cols = p.cols;
  const int col = static_cast<int>(threadIdx.x) % cols;
  const int row_in_block = static_cast<int>(threadIdx.x) / cols;
  const int rows_per_block = static_cast<int>(blockDim.x) / cols;
  const long long row_stride = static_cast<long long>(H) * D;
  const int n = static_cast<int>(p.n);  // < 2^31 (checked by the launcher); slot ids are 64-bit
  const int tile_rows = rows_per_block * ROWS;
  const int tiles = (n + tile_rows - 1) / tile_rows;

  for (int pass = 0; pass < p.npass; ++pass) {
    // This thread's items: offset in the row, kind, cos/sin column. Once per pass, not per row.
    // The launcher makes cols a multiple of CPH (or K 1), so all rotation items of a thread are the
    // same pair chunk `cs` of different heads.
    // boff: offset of the item's second vector (NeoX: x[j + rd/2]; copies: the other half of the
    // span), 0 when it has one vector.
    int off[K], boff[K], kind[K];
    int cs = 0;
    bool any_rot = false;
#pragma unroll
    for (int m = 0; m < K; ++m) {
      const int q = col + cols * (m + K * pass);
      off[m] = 0;
      boff[m] = 0;
      kind[m] = detail::kItemNone;
      if (q < n_rot) {
        const int h = q / cph, c = q - h * cph;
        off[m] = h * D + c * VEC;
        boff[m] = INTERLEAVED ? 0 : half;
        cs = INTERLEAVED ? c * (VEC / 2) : c * VEC;
        kind[m] = detail::kItemRot;
        any_rot = true;
      } else if constexpr (COMPOSE) {
        if (q < n_rot + n_tail) {
          const int r = q - n_rot, h = r / cpt, c = r - h * cpt;
          off[m] = h * D + p.rotary_dim + c * VEC;
          boff[m] = tail_b;
          kind[m] = detail::kItemCopyK;
        } else if (q < n_items) {
          const int r = q - n_rot - n_tail, h = r / cpv, c = r - h * cpv;
          off[m] = h * D + c * VEC;
          boff[m] = v_b;
          kind[m] = detail::kItemCopyV;
        }
      }
    }

    for (int layer = blockIdx.y; layer < p.num_layers; layer += gridDim.y) {
      T* __restrict__ k = static_cast<T*>(p.k) + layer * p.layer_stride;
      T* __restrict__ v = COMPOSE ? static_cast<T*>(p.v) + layer * p.layer_stride : nullptr;
      // Row metadata of the current tile (src < 0: past the end of the list), prefetched one tile
      // ahead.
      long long src[ROWS], dst[ROWS];
      int ti[ROWS];
      auto fetch = [&](int tile, long long* s, long long* d, int* t) {
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          // (tile < tiles first: then i < n + tile_rows cannot overflow)
          const int i = tile < tiles ? tile * tile_rows + r * rows_per_block + row_in_block : n;
          s[r] = -1;
          d[r] = -1;
          t[r] = 0;
          if (i < n) {
            s[r] = detail::load_slot(p.src_slots, p.slots64, i);
            d[r] = COMPOSE ? detail::load_slot(p.dst_slots, p.slots64, i) : s[r];
            t[r] = any_rot ? __ldg(p.table_idx + i) : 0;
          }
        }
      };
      fetch(blockIdx.x, src, dst, ti);

      for (int tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
        Vec<T, VEC> a[ROWS][K], b[ROWS][K];
        Vec<float, CV> c[ROWS], s[ROWS];
        // 1. every load of the iteration. Loads are not branched on (a branch around them costs
        // ~30 registers here): a row past the end of the list reads row 0 and an idle item reads
        // item 0 of its row, and neither is stored.
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const long long sb = (src[r] < 0 ? 0 : src[r]) * row_stride;
          if (any_rot) {
            const long long cr = static_cast<long long>(ti[r]) * half + cs;
            c[r] = load_vec<float, CV>(p.cos + cr);
            s[r] = load_vec<float, CV>(p.sin + cr);
          }
#pragma unroll
          for (int m = 0; m < K; ++m) {
            const T* from = (COMPOSE && kind[m] == detail::kItemCopyV ? v : k) + sb + off[m];
            a[r][m] = load_vec<T, VEC>(from);
            // (a compose item with one vector reads it twice: an L1 hit, and no branch)
            if (COMPOSE || !INTERLEAVED) b[r][m] = load_vec<T, VEC>(from + (COMPOSE ? boff[m] : half));
          }
        }
        // 2. the next tile's slot ids while the data is in flight
        long long nsrc[ROWS], ndst[ROWS];
        int nti[ROWS];
        fetch(tile + static_cast<int>(gridDim.x), nsrc, ndst, nti);
        // 3. rotate and store
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          const long long db = dst[r] * row_stride;
#pragma unroll
          for (int m = 0; m < K; ++m) {
            if (!COMPOSE || kind[m] == detail::kItemRot)
              detail::rotate_vec<T, VEC, INTERLEAVED>(a[r][m], b[r][m], c[r].v, s[r].v);
            if (src[r] < 0 || kind[m] == detail::kItemNone) continue;
            T* to = (COMPOSE && kind[m] == detail::kItemCopyV ? v : k) + db + off[m];
            store_vec<T, VEC>(to, a[r][m]);
            if (COMPOSE ? boff[m] != 0 : !INTERLEAVED) store_vec<T, VEC>(to + (COMPOSE ? boff[m] : half), b[r][m]);
          }
        }
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          src[r] = nsrc[r];
          dst[r] = ndst[r];
          ti[r] = nti[r];
        }
      }
    }
  }
}

}  // namespace detail

template <typename T, int VEC, bool INTERLEAVED, bool COMPOSE, int K>
__global__ void KVFUSE_SLOT_REGS(slot_max_regs(COMPOSE, K))
slot_rotate_kernel(SlotRotateParams p) {
  detail::slot_rotate_body<T, VEC, INTERLEAVED, COMPOSE, K, slot_rows(K)>(p);
}

// Compose's K 4 plans: two rows per thread and iteration.
template <typename T, int VEC, bool INTERLEAVED, bool COMPOSE>
__global__ void KVFUSE_SLOT_REGS(slot_wide_max_regs(COMPOSE))
slot_rotate_wide_kernel(SlotRotateParams p) {
  detail::slot_rotate_body<T, VEC, INTERLEAVED, COMPOSE, 4, 2 * slot_rows(4)>(p);
}

// How rows are cut among threads: K items per thread per row, `cols` threads per row, `npass`
// passes. Host side.
struct SlotPlan {
  int K, cols, npass;
};

// Picks K in {4, 2, 1} (ROWS = 4 / K rows per iteration) and cols = ceil(items / K) rounded up to a
// multiple of CPH (so that cos/sin are read once per row), preferring the fewest idle item slots and
// then the largest K (fewer rows in flight per thread: fewer registers for cos/sin). E.g. bf16,
// H 8, D 128, NeoX: 64 items, CPH 8 -> K 4, 16 threads per row (a thread: one pair chunk of 4
// heads, 8 x 16 B loads); compose of the same pool: 192 items -> K 4, 48 threads per row.
inline SlotPlan slot_plan(int items, int cph) {
  SlotPlan best{0, 0, 1};
  long long best_waste = -1;
  for (int K : {4, 2, 1}) {
    const int want = (items + K - 1) / K;
    const int cols = K == 1 ? want : (want + cph - 1) / cph * cph;  // K 1: one chunk per thread
    if (cols > kRotaryThreads) continue;
    const long long waste = static_cast<long long>(K) * cols - items;
    if (best_waste < 0 || waste < best_waste) {
      best = SlotPlan{K, cols, 1};
      best_waste = waste;
    }
  }
  if (best_waste >= 0) return best;
  // Rows wider than one block: one item per thread and row (K 1: then any cols keeps a single
  // cos/sin chunk per thread), the items in several passes over the rows.
  return SlotPlan{1, kRotaryThreads, (items + kRotaryThreads - 1) / kRotaryThreads};
}

// Host launcher shared by rerotate and compose (kvfuse/rerotate.cuh, kvfuse/compose.cuh). T: float,
// __half or __nv_bfloat16. Returns the launch error, if any.
template <typename T, bool COMPOSE>
cudaError_t launch_slot_rotate(SlotRotateParams p, bool interleaved, cudaStream_t stream) {
  if (p.n == 0 || p.num_layers == 0 || p.num_heads == 0) return cudaSuccess;
  // Row counters are 32-bit: 2^31 listed slots would be 16 GiB of int64 slot ids alone.
  if (p.n > (1LL << 31) - (1LL << 20)) return cudaErrorInvalidValue;
  const int half = p.rotary_dim / 2;
  int vec = widest_vec<T>(p.k, p.head_dim, interleaved ? p.rotary_dim : half,
                          COMPOSE ? p.head_dim - p.rotary_dim : 0);
  if (COMPOSE) vec = std::min(vec, widest_vec<T>(p.v, p.head_dim));
  auto table_ok = [&](int v) {  // cos/sin rows are read as vectors of (interleaved ? v / 2 : v) floats
    const std::uintptr_t bytes = (interleaved ? std::max(1, v / 2) : v) * sizeof(float);
    return reinterpret_cast<std::uintptr_t>(p.cos) % bytes == 0 && reinterpret_cast<std::uintptr_t>(p.sin) % bytes == 0;
  };
  while (vec > 1 && !table_ok(vec)) vec /= 2;
  if (interleaved && vec < 2) return cudaErrorInvalidValue;
  const int cph = (interleaved ? p.rotary_dim : half) / vec;
  const int items =
      p.num_heads * (cph + (COMPOSE ? copy_items(p.head_dim - p.rotary_dim, vec) + copy_items(p.head_dim, vec) : 0));
  const SlotPlan plan = slot_plan(items, cph);
  p.cols = plan.cols;
  p.npass = plan.npass;
  // Blocks of about 128 threads (whole rows): at 90-128 registers a thread, 4-warp blocks pack an SM
  // more tightly (e.g. 20 warps at 94 registers) than 8-warp ones (16).
  const int threads = std::max(plan.cols, kRotaryBlock / plan.cols * plan.cols);
  const int rows_per_block = threads / plan.cols;
  const bool wide = COMPOSE && plan.K == 4;

  auto go = [&](auto kernel, int rows) {
    const long long tile_rows = static_cast<long long>(rows_per_block) * rows;
    const long long tiles = (p.n + tile_rows - 1) / tile_rows;
    const int gy = std::min(p.num_layers, 65535);
    // One block per tile; at most 2^20 blocks, so that tile + gridDim.x stays below 2^31 (n is).
    const long long gx = std::max(1LL, std::min(tiles, 1LL << 20));
    kernel<<<dim3(static_cast<unsigned>(std::min(gx, 2147483647LL)), gy), threads, 0, stream>>>(p);
    return cudaGetLastError();
  };
  auto pick_k = [&](auto k4w, auto k4, auto k2, auto k1) {
    return plan.K == 4 ? (wide ? go(k4w, 2 * slot_rows(4)) : go(k4, slot_rows(4)))
           : plan.K == 2 ? go(k2, slot_rows(2))
                         : go(k1, slot_rows(1));
  };
  constexpr int kMax = 16 / sizeof(T);
#define KVFUSE_ROT_KERNELS(V, I)                                                                \
  pick_k(slot_rotate_wide_kernel<T, V, I, COMPOSE>, slot_rotate_kernel<T, V, I, COMPOSE, 4>,    \
         slot_rotate_kernel<T, V, I, COMPOSE, 2>, slot_rotate_kernel<T, V, I, COMPOSE, 1>)
#define KVFUSE_ROT_CASE(V)                                                  \
  if (vec == V) {                                                           \
    if constexpr (V <= kMax) {                                              \
      if (interleaved) {                                                    \
        if constexpr (V >= 2) return KVFUSE_ROT_KERNELS(V, true);           \
      } else {                                                              \
        return KVFUSE_ROT_KERNELS(V, false);                                \
      }                                                                     \
    }                                                                       \
  }
  KVFUSE_ROT_CASE(8)
  KVFUSE_ROT_CASE(4)
  KVFUSE_ROT_CASE(2)
  KVFUSE_ROT_CASE(1)
#undef KVFUSE_ROT_CASE
#undef KVFUSE_ROT_KERNELS
  return cudaErrorInvalidValue;
}

}  // namespace kvfuse
