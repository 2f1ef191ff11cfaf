// The slot engine shared by rerotate and compose: for every listed slot, every layer and every
// head, rotate the key (NeoX or interleaved pairs, first `rotary_dim` dims) from the source slot into
// the destination slot, and (compose only) copy the key's other dims and the value.
//
// Work is cut into "units" of one vector (VEC elements, 16 bytes when the shapes allow): a NeoX unit
// holds VEC pairs (i, i + rotary_dim/2), read as two vectors; an interleaved unit holds VEC/2 pairs
// (2i, 2i+1), one vector; a copy unit one vector. Units are numbered slot-major (slot, layer, head,
// unit), so a warp reads whole rows. Each thread takes UNROLL units at a time and issues all their
// data loads before any compute; the cos/sin rows are then read into registers (a slot's row is
// shared by all its heads and layers, so after the first head they are L1 hits).
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
};

constexpr int kRotaryThreads = 256;
constexpr int kRotaryUnroll = 4;

template <typename T, int VEC, bool INTERLEAVED, bool COMPOSE, typename IdxT, typename CountT>
__global__ void __launch_bounds__(kRotaryThreads)
slot_rotate_kernel(SlotRotateParams p) {
  constexpr int CV = INTERLEAVED ? (VEC / 2 > 0 ? VEC / 2 : 1) : VEC;  // cos/sin values per unit
  const int half = p.rotary_dim / 2;
  T* __restrict__ k = static_cast<T*>(p.k);
  T* __restrict__ v = static_cast<T*>(p.v);
  const IdxT* __restrict__ src_slots = static_cast<const IdxT*>(p.src_slots);
  const IdxT* __restrict__ dst_slots = static_cast<const IdxT*>(p.dst_slots);

  const int n_rot = INTERLEAVED ? p.rotary_dim / VEC : half / VEC;
  const int n_pass = COMPOSE ? (p.head_dim - p.rotary_dim) / VEC : 0;
  const int n_v = COMPOSE ? p.head_dim / VEC : 0;
  const int row_units = n_rot + n_pass + n_v;
  const CountT slot_units = static_cast<CountT>(p.num_layers) * p.num_heads * row_units;
  const CountT total = static_cast<CountT>(p.n) * slot_units;
  const long long row_stride = static_cast<long long>(p.num_heads) * p.head_dim;
  const CountT stride = static_cast<CountT>(gridDim.x) * blockDim.x;

  for (CountT base = static_cast<CountT>(blockIdx.x) * blockDim.x + threadIdx.x; base < total;
       base += stride * kRotaryUnroll) {
    Vec<T, VEC> a[kRotaryUnroll], b[kRotaryUnroll];
    long long crow[kRotaryUnroll];
    T* dst_a[kRotaryUnroll];
    int kind[kRotaryUnroll];  // -1 idle, 0 copy, 1 rotate
    // Issue every load of the UNROLL units first.
#pragma unroll
    for (int x = 0; x < kRotaryUnroll; ++x) {
      const CountT e = base + x * stride;
      kind[x] = -1;
      dst_a[x] = nullptr;
      crow[x] = 0;
      if (e < total) {
        const CountT sl = e / slot_units;
        const int r = static_cast<int>(e - sl * slot_units);
        const int lh = r / row_units;
        const int u = r - lh * row_units;
        const int l = lh / p.num_heads;
        const int h = lh - l * p.num_heads;
        const long long head = static_cast<long long>(l) * p.layer_stride + h * static_cast<long long>(p.head_dim);
        const long long src_slot = static_cast<long long>(__ldg(src_slots + sl));
        const long long dst_slot = COMPOSE ? static_cast<long long>(__ldg(dst_slots + sl)) : src_slot;
        const long long src = head + src_slot * row_stride;
        const long long dst = head + dst_slot * row_stride;
        if (u < n_rot) {
          kind[x] = 1;
          const int off = u * VEC;
          crow[x] = static_cast<long long>(__ldg(p.table_idx + sl)) * half + (INTERLEAVED ? off / 2 : off);
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
        // The slot's cos/sin row is shared by all its heads and layers: an L1 hit after the first.
        const Vec<float, CV> c = load_vec<float, CV>(p.cos + crow[x]);
        const Vec<float, CV> s = load_vec<float, CV>(p.sin + crow[x]);
        if (INTERLEAVED) {
#pragma unroll
          for (int i = 0; i < VEC / 2; ++i) {
            const float x1 = to_float(a[x].v[2 * i]), x2 = to_float(a[x].v[2 * i + 1]);
            a[x].v[2 * i] = from_float<T>(x1 * c.v[i] - x2 * s.v[i]);
            a[x].v[2 * i + 1] = from_float<T>(x2 * c.v[i] + x1 * s.v[i]);
          }
        } else {
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const float x1 = to_float(a[x].v[i]), x2 = to_float(b[x].v[i]);
            a[x].v[i] = from_float<T>(x1 * c.v[i] - x2 * s.v[i]);
            b[x].v[i] = from_float<T>(x2 * c.v[i] + x1 * s.v[i]);
          }
          store_vec<T, VEC>(dst_a[x] + half, b[x]);
        }
      }
      store_vec<T, VEC>(dst_a[x], a[x]);
    }
  }
}

// Host launcher shared by rerotate and compose. T: float, __half or __nv_bfloat16; IdxT: int32_t or
// int64_t slot ids. Returns the launch error, if any.
template <typename T, bool COMPOSE, typename IdxT>
cudaError_t launch_slot_rotate(SlotRotateParams p, bool interleaved, cudaStream_t stream) {
  if (p.n == 0) return cudaSuccess;
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
  const int row_units = (interleaved ? p.rotary_dim / vec : half / vec) +
                        (COMPOSE ? (p.head_dim - p.rotary_dim) / vec + p.head_dim / vec : 0);
  const long long total = p.n * p.num_layers * p.num_heads * static_cast<long long>(row_units);
  const bool small = total < (1LL << 31) - static_cast<long long>(kRotaryThreads) * (1 << 20);

  auto go = [&](auto kernel) {
    const long long want = (total + kRotaryThreads * kRotaryUnroll - 1) / (kRotaryThreads * kRotaryUnroll);
    const int grid = static_cast<int>(std::min(want, static_cast<long long>(resident_blocks(kernel, kRotaryThreads, 0))));
    kernel<<<grid, kRotaryThreads, 0, stream>>>(p);
    return cudaGetLastError();
  };
  auto pick = [&](auto kernel32, auto kernel64) { return small ? go(kernel32) : go(kernel64); };
  constexpr int kMax = 16 / sizeof(T);
#define KVFUSE_ROT_KERNELS(V, I) \
  pick(slot_rotate_kernel<T, V, I, COMPOSE, IdxT, unsigned>, slot_rotate_kernel<T, V, I, COMPOSE, IdxT, long long>)
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
