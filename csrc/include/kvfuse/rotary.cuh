// The slot engine shared by rerotate and compose: for every listed slot, every layer and every
// head, rotate the key (NeoX or interleaved pairs, first `rotary_dim` dims) from the source slot into
// the destination slot, and (compose only) copy the key's other dims and the value.
//
// Work is cut into "units" of one vector (VEC elements, 16 bytes when the shapes allow): a NeoX unit
// holds VEC pairs (i, i + rotary_dim/2), read as two vectors; an interleaved unit holds VEC/2 pairs
// (2i, 2i+1), one vector; a copy unit one vector. A block takes a chunk of slots, stages their
// cos/sin rows in shared memory, then each thread issues UNROLL units' loads before any compute.
#pragma once

#include "kvfuse/common.cuh"

namespace kvfuse {

struct SlotRotateParams {
  void* k;                    // [L, slots, H, D], rotated (in place when src == dst)
  void* v;                    // same shape, copied src -> dst; nullptr for rerotate
  const void* src_slots;      // [n] int32 or int64
  const void* dst_slots;      // [n]; equals src_slots for rerotate
  const int32_t* table_idx;   // [n] rows of cos / sin
  const float* cos;           // [U, rotary_dim / 2]
  const float* sin;
  long long n;                // slots listed
  long long layer_stride;     // elements between layers (slots * H * D)
  int num_layers, num_heads, head_dim, rotary_dim;
  int slots_per_chunk;
};

constexpr int kRotaryThreads = 256;
constexpr int kRotaryUnroll = 4;
constexpr int kRotarySmemBytes = 16 * 1024;  // cos/sin rows of one chunk

template <typename T, int VEC, bool INTERLEAVED, bool COMPOSE, typename IdxT>
__global__ void __launch_bounds__(kRotaryThreads)
slot_rotate_kernel(SlotRotateParams p) {
  extern __shared__ float4 smem_raw[];
  const int half = p.rotary_dim / 2;
  float* s_cos = reinterpret_cast<float*>(smem_raw);
  float* s_sin = s_cos + p.slots_per_chunk * half;
  long long* s_src = reinterpret_cast<long long*>(s_sin + p.slots_per_chunk * half);
  long long* s_dst = s_src + p.slots_per_chunk;

  T* __restrict__ k = static_cast<T*>(p.k);
  T* __restrict__ v = static_cast<T*>(p.v);
  const IdxT* __restrict__ src_slots = static_cast<const IdxT*>(p.src_slots);
  const IdxT* __restrict__ dst_slots = static_cast<const IdxT*>(p.dst_slots);

  const int n_rot = INTERLEAVED ? p.rotary_dim / VEC : half / VEC;
  const int n_pass = COMPOSE ? (p.head_dim - p.rotary_dim) / VEC : 0;
  const int n_v = COMPOSE ? p.head_dim / VEC : 0;
  const int row_units = n_rot + n_pass + n_v;
  const int slot_units = p.num_layers * p.num_heads * row_units;
  const long long row_stride = static_cast<long long>(p.num_heads) * p.head_dim;

  for (long long s0 = static_cast<long long>(blockIdx.x) * p.slots_per_chunk; s0 < p.n;
       s0 += static_cast<long long>(gridDim.x) * p.slots_per_chunk) {
    const int cnt = static_cast<int>(min(static_cast<long long>(p.slots_per_chunk), p.n - s0));
    __syncthreads();  // the previous chunk is done with shared memory
    for (int i = threadIdx.x; i < cnt * half; i += blockDim.x) {
      const int sl = i / half;
      const long long row = static_cast<long long>(__ldg(p.table_idx + s0 + sl)) * half + (i - sl * half);
      s_cos[i] = __ldg(p.cos + row);
      s_sin[i] = __ldg(p.sin + row);
    }
    for (int i = threadIdx.x; i < cnt; i += blockDim.x) {
      s_src[i] = static_cast<long long>(src_slots[s0 + i]);
      s_dst[i] = COMPOSE ? static_cast<long long>(dst_slots[s0 + i]) : s_src[i];
    }
    __syncthreads();

    const int total = cnt * slot_units;
    for (int base = threadIdx.x; base < total; base += blockDim.x * kRotaryUnroll) {
      Vec<T, VEC> a[kRotaryUnroll], b[kRotaryUnroll];
      T* dst_a[kRotaryUnroll];
      int kind[kRotaryUnroll];  // -1 idle, 0 copy, 1 rotate
      int sl_of[kRotaryUnroll], j_of[kRotaryUnroll];
      // Issue every load of the UNROLL units first.
#pragma unroll
      for (int x = 0; x < kRotaryUnroll; ++x) {
        const int e = base + x * blockDim.x;
        kind[x] = -1;
        dst_a[x] = nullptr;
        sl_of[x] = 0;
        j_of[x] = 0;
        if (e < total) {
          const int sl = e / slot_units;
          const int r = e - sl * slot_units;
          const int lh = r / row_units;
          const int u = r - lh * row_units;
          const int l = lh / p.num_heads;
          const int h = lh - l * p.num_heads;
          const long long head = static_cast<long long>(l) * p.layer_stride + h * static_cast<long long>(p.head_dim);
          const long long src = head + s_src[sl] * row_stride;
          const long long dst = head + s_dst[sl] * row_stride;
          sl_of[x] = sl;
          if (u < n_rot) {
            kind[x] = 1;
            const int off = u * VEC;
            j_of[x] = INTERLEAVED ? off / 2 : off;
            a[x] = load_vec<T, VEC>(k + src + off);
            if (!INTERLEAVED) b[x] = load_vec<T, VEC>(k + src + off + half);
            dst_a[x] = k + dst + off;
          } else if (u < n_rot + n_pass) {
            kind[x] = 0;
            const int off = p.rotary_dim + (u - n_rot) * VEC;
            a[x] = load_vec<T, VEC>(k + src + off);
            dst_a[x] = k + dst + off;
          } else {
            kind[x] = 0;
            const int off = (u - n_rot - n_pass) * VEC;
            a[x] = load_vec<T, VEC>(v + src + off);
            dst_a[x] = v + dst + off;
          }
        }
      }
#pragma unroll
      for (int x = 0; x < kRotaryUnroll; ++x) {
        if (kind[x] < 0) continue;
        if (kind[x] == 1) {
          const float* c = s_cos + sl_of[x] * half + j_of[x];
          const float* s = s_sin + sl_of[x] * half + j_of[x];
          if (INTERLEAVED) {
#pragma unroll
            for (int i = 0; i < VEC / 2; ++i) {
              const float x1 = to_float(a[x].v[2 * i]), x2 = to_float(a[x].v[2 * i + 1]);
              a[x].v[2 * i] = from_float<T>(x1 * c[i] - x2 * s[i]);
              a[x].v[2 * i + 1] = from_float<T>(x2 * c[i] + x1 * s[i]);
            }
          } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              const float x1 = to_float(a[x].v[i]), x2 = to_float(b[x].v[i]);
              a[x].v[i] = from_float<T>(x1 * c[i] - x2 * s[i]);
              b[x].v[i] = from_float<T>(x2 * c[i] + x1 * s[i]);
            }
            store_vec<T, VEC>(dst_a[x] + half, b[x]);
          }
        }
        store_vec<T, VEC>(dst_a[x], a[x]);
      }
    }
  }
}

// Host launcher shared by rerotate and compose. T: float, __half or __nv_bfloat16; IdxT: int32_t or
// int64_t slot ids. Returns the launch error, if any.
template <typename T, bool COMPOSE, typename IdxT>
cudaError_t launch_slot_rotate(SlotRotateParams p, bool interleaved, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
  const int half = p.rotary_dim / 2;
  const void* ptrs[2] = {p.k, COMPOSE ? p.v : p.k};
  int vec = widest_vec<T>(ptrs[0], p.head_dim, interleaved ? p.rotary_dim : half,
                          COMPOSE ? p.head_dim - p.rotary_dim : 0);
  vec = std::min(vec, widest_vec<T>(ptrs[1], p.head_dim));
  if (interleaved && vec < 2) return cudaErrorInvalidValue;
  const int row_units = (interleaved ? p.rotary_dim / vec : half / vec) +
                        (COMPOSE ? (p.head_dim - p.rotary_dim) / vec + p.head_dim / vec : 0);
  const long long slot_units = static_cast<long long>(p.num_layers) * p.num_heads * row_units;
  const int per_slot_smem = 2 * half * static_cast<int>(sizeof(float)) + 2 * static_cast<int>(sizeof(long long));
  long long spc = (kRotaryThreads * kRotaryUnroll) / slot_units;
  spc = std::max(1LL, std::min(spc, static_cast<long long>(kRotarySmemBytes / per_slot_smem)));
  if (slot_units * spc > (1LL << 30)) return cudaErrorInvalidValue;  // int32 unit counter per chunk
  p.slots_per_chunk = static_cast<int>(spc);
  const std::size_t smem = static_cast<std::size_t>(spc) * per_slot_smem;
  const long long chunks = (p.n + spc - 1) / spc;

  auto go = [&](auto kernel) {
    const int grid = static_cast<int>(std::min(chunks, static_cast<long long>(
                                                           resident_blocks(kernel, kRotaryThreads, smem))));
    kernel<<<grid, kRotaryThreads, smem, stream>>>(p);
    return cudaGetLastError();
  };
  constexpr int kMax = 16 / sizeof(T);
#define KVFUSE_ROT_CASE(V)                                                                  \
  if (vec == V) {                                                                           \
    if constexpr (V <= kMax) {                                                              \
      if (interleaved) {                                                                    \
        if constexpr (V >= 2) return go(slot_rotate_kernel<T, V, true, COMPOSE, IdxT>);     \
      } else {                                                                              \
        return go(slot_rotate_kernel<T, V, false, COMPOSE, IdxT>);                          \
      }                                                                                     \
    }                                                                                       \
  }
  KVFUSE_ROT_CASE(8)
  KVFUSE_ROT_CASE(4)
  KVFUSE_ROT_CASE(2)
  KVFUSE_ROT_CASE(1)
#undef KVFUSE_ROT_CASE
  return cudaErrorInvalidValue;
}

}  // namespace kvfuse
