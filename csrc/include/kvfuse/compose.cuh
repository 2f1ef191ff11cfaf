// compose copy: gather the listed source slots into the destination slots, rotating K and copying V,
// all layers, in one pass:
//   k[l, dst[i], h, :] = R(table_idx[i]) k[l, src[i], h, :]   (dims >= rd copied unchanged)
//   v[l, dst[i], h, :] = v[l, src[i], h, :]
// Source and destination slots must not overlap.
#pragma once

#include "kvfuse/rotary.cuh"

namespace kvfuse {

// p: the slot engine's parameters (`k`, `v`, `src_slots`, `dst_slots` of one integer type).
template <typename T>
cudaError_t compose_copy(const SlotRotateParams& p, bool interleaved, cudaStream_t stream) {
  return launch_slot_rotate<T, true>(p, interleaved, stream);
}

}  // namespace kvfuse
