// rerotate: rotate the keys of the listed slots in place by per-slot cos/sin table rows, all layers.
//   k[l, slot[i], h, :rd] = R(table_idx[i]) k[l, slot[i], h, :rd]
// NeoX pairs (j, j + rd/2) or interleaved pairs (2j, 2j+1); dims >= rd are not touched.
#pragma once

#include "kvfuse/rotary.cuh"

namespace kvfuse {

struct RerotateArgs {
  void* k_cache;              // [(L,) P, page_size, H, D] contiguous
  const void* slots;          // [n] slot ids, int32 or int64 (slots64)
  bool slots64;
  const int32_t* table_idx;   // [n]
  const float* cos;           // [U, rotary_dim / 2]
  const float* sin;
  long long n;
  int num_layers;
  long long slots_per_layer;  // P * page_size
  int num_heads, head_dim, rotary_dim;
  bool interleaved;
};

// variant: launch variant of the slot engine (see rotary.cuh); -1: KVFUSE_CUDA_ROTARY_VARIANT.
template <typename T>
cudaError_t rerotate(const RerotateArgs& a, cudaStream_t stream, int variant) {
  SlotRotateParams p{};
  p.k = a.k_cache;
  p.v = nullptr;
  p.src_slots = p.dst_slots = a.slots;
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
  return launch_slot_rotate<T, false>(p, a.interleaved, stream, variant);
}

template <typename T>
cudaError_t rerotate(const RerotateArgs& a, cudaStream_t stream) {
  return rerotate<T>(a, stream, -1);
}

}  // namespace kvfuse
