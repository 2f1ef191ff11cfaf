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
  kvfuse::RerotateArgs a{};
  a.k_cache = k_cache.data_ptr();
  a.slots = s.data_ptr();
  a.slots64 = s.scalar_type() == at::kLong;
  a.table_idx = table_idx.data_ptr<int32_t>();
  a.cos = cos.data_ptr<float>();
  a.sin = sin.data_ptr<float>();
  a.n = n;
  a.num_layers = static_cast<int>(d[0]);
  a.slots_per_layer = d[1];
  a.num_heads = static_cast<int>(d[2]);
  a.head_dim = static_cast<int>(d[3]);
  a.rotary_dim = static_cast<int>(rotary_dim);
  a.interleaved = interleaved;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  KVFUSE_DISPATCH_FLOAT(k_cache.scalar_type(), "rerotate_",
                        [&] { KVFUSE_CUDA_OK(kvfuse::rerotate<scalar_t>(a, stream)); });
}
