// compose copy: gather the listed source slots into the destination slots, rotating K and copying V,
// all layers, in one pass:
//   k[l, dst[i], h, :] = R(table_idx[i]) k[l, src[i], h, :]   (dims >= rd copied unchanged)
//   v[l, dst[i], h, :] = v[l, src[i], h, :]
// Source and destination slots must not overlap.
#pragma once

#include "kvfuse/rotary.cuh"

namespace kvfuse {

struct ComposeArgs {
  void* k_cache;              // [(L,) P, page_size, H, D] contiguous
  void* v_cache;              // same shape
  const void* src_slots;      // [n] int32 or int64 (slots64), both the same type
  const void* dst_slots;
  bool slots64;
  const int32_t* table_idx;   // [n]
  const float* cos;           // [U, rotary_dim / 2]
  const float* sin;
  long long n;
  int num_layers;
  long long slots_per_layer;
  int num_heads, head_dim, rotary_dim;
  bool interleaved;
};

// variant: launch variant of the slot engine (see rotary.cuh); -1: KVFUSE_CUDA_ROTARY_VARIANT.
template <typename T>
cudaError_t compose_copy(const ComposeArgs& a, cudaStream_t stream, int variant) {
  SlotRotateParams p{};
  p.k = a.k_cache;
  p.v = a.v_cache;
  p.src_slots = a.src_slots;
  p.dst_slots = a.dst_slots;
  p.slots64 = a.slots64;
  p.table_idx = a.table_idx;
  p.cos = a.cos;
  p.sin = a.sin;
  p.n = a.n;
  p.layer_stride = a.slots_per_layer * a.num_heads * a.head_dim;
  p.num_layers = a.num_layers;
  p.num_heads = a.num_heads;
  p.head_dim = a.head_dim;
  p.rotary_dim = a.rotary_dim;
  return launch_slot_rotate<T, true>(p, a.interleaved, stream, variant);
}

template <typename T>
cudaError_t compose_copy(const ComposeArgs& a, cudaStream_t stream) {
  return compose_copy<T>(a, stream, -1);
}

}  // namespace kvfuse
