// rerotate: rotate the keys of the listed slots in place by per-slot cos/sin table rows, all layers.
//   k[l, slot[i], h, :rd] = R(table_idx[i]) k[l, slot[i], h, :rd]
// NeoX pairs (j, j + rd/2) or interleaved pairs (2j, 2j+1); dims >= rd are not touched.
#pragma once

#include "kvfuse/rotary.cuh"

namespace kvfuse {

// p: the slot engine's parameters with the keys to rotate in `k` and their slots in `src_slots`
// (`v` and `dst_slots` are ignored: the rotation is in place).
template <typename T>
cudaError_t rerotate(SlotRotateParams p, bool interleaved, cudaStream_t stream) {
  p.v = nullptr;
  p.dst_slots = p.src_slots;
  return launch_slot_rotate<T, false>(p, interleaved, stream);
}

}  // namespace kvfuse
