// compose_copy_: torch entry point (checks + dtype dispatch) of kvfuse/compose.cuh.
#include "kvfuse/compose.cuh"
#include "torch_utils.h"

void compose_copy_(at::Tensor k_cache, at::Tensor v_cache, at::Tensor src_slots, at::Tensor dst_slots,
                   at::Tensor table_idx, at::Tensor cos, at::Tensor sin, int64_t rotary_dim, bool interleaved) {
  const auto d = kvfuse::pool_dims(k_cache, "k_cache");
  kvfuse::pool_dims(v_cache, "v_cache");
  KVFUSE_CHECK(v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == k_cache.scalar_type() &&
                  v_cache.device() == k_cache.device(),
              "k_cache and v_cache must have the same shape, dtype and device");
  KVFUSE_CHECK(src_slots.dim() == 1 && dst_slots.sizes() == src_slots.sizes(), "src_slots/dst_slots must be [N]");
  for (const at::Tensor* t : {&src_slots, &dst_slots}) {
    KVFUSE_CHECK(t->scalar_type() == at::kInt || t->scalar_type() == at::kLong, "slots must be int32/int64");
    KVFUSE_CHECK(t->device() == k_cache.device(), "slots must be on the cache's device");
  }
  const int64_t n = src_slots.size(0);
  kvfuse::check_table(table_idx, cos, sin, n, rotary_dim, d[3], k_cache);
  if (n == 0) return;
  const bool same = src_slots.scalar_type() == dst_slots.scalar_type();
  const at::Tensor src = (same ? src_slots : src_slots.to(at::kLong)).contiguous();
  const at::Tensor dst = (same ? dst_slots : dst_slots.to(at::kLong)).contiguous();
  const c10::cuda::CUDAGuard guard(k_cache.device());
  const kvfuse::SlotRotateParams p =
      kvfuse::slot_params(k_cache, v_cache.data_ptr(), src, dst, table_idx, cos, sin, rotary_dim);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  KVFUSE_DISPATCH_FLOAT(k_cache.scalar_type(), "compose_copy_",
                        [&] { KVFUSE_CUDA_OK(kvfuse::compose_copy<scalar_t>(p, interleaved, stream)); });
}
