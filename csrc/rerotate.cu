// rerotate_: torch entry point (checks + dtype dispatch) of kvfuse/rerotate.cuh.
#include "kvfuse/rerotate.cuh"
#include "torch_utils.h"

void rerotate_(at::Tensor k_cache, at::Tensor slots, at::Tensor table_idx, at::Tensor cos, at::Tensor sin,
               int64_t rotary_dim, bool interleaved) {
  const auto d = kvfuse::pool_dims(k_cache, "k_cache");
  KVFUSE_CHECK(slots.dim() == 1, "slots must be 1-D");
  KVFUSE_CHECK(slots.scalar_type() == at::kInt || slots.scalar_type() == at::kLong, "slots must be int32/int64");
  KVFUSE_CHECK_SAME_DEVICE(slots, k_cache);
  const int64_t n = slots.size(0);
  kvfuse::check_table(table_idx, cos, sin, n, rotary_dim, d[3], k_cache);
  if (n == 0) return;
  const at::Tensor s = slots.contiguous();
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const kvfuse::SlotRotateParams p = kvfuse::slot_params(k_cache, nullptr, s, s, table_idx, cos, sin, rotary_dim);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  KVFUSE_DISPATCH_FLOAT(k_cache.scalar_type(), "rerotate_",
                        [&] { KVFUSE_CUDA_OK(kvfuse::rerotate<scalar_t>(p, interleaved, stream)); });
}
