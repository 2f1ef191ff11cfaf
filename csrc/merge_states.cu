// merge_states: torch entry point (checks + dtype dispatch) of kvfuse/merge_states.cuh.
#include "kvfuse/merge_states.cuh"
#include "torch_utils.h"

std::tuple<at::Tensor, at::Tensor> merge_states(at::Tensor v_a, at::Tensor s_a, at::Tensor v_b, at::Tensor s_b) {
  KVFUSE_CHECK_CUDA(v_a);
  KVFUSE_CHECK(v_a.dim() == 3 && v_b.sizes() == v_a.sizes(), "v_a/v_b must be [N, H, D] of one shape");
  KVFUSE_CHECK(v_b.scalar_type() == v_a.scalar_type(), "v_a and v_b must have one dtype");
  for (const at::Tensor* s : {&s_a, &s_b}) {
    KVFUSE_CHECK_DTYPE((*s), at::kFloat);
    KVFUSE_CHECK(s->sizes() == v_a.sizes().slice(0, 2), "s_a/s_b must be [N, H]");
  }
  for (const at::Tensor* t : {&v_b, &s_a, &s_b}) KVFUSE_CHECK(t->device() == v_a.device(), "inputs on one device");
  const at::Tensor va = v_a.contiguous(), vb = v_b.contiguous(), sa = s_a.contiguous(), sb = s_b.contiguous();
  at::Tensor v = at::empty_like(va);
  at::Tensor s = at::empty_like(sa);
  if (v.numel() == 0) return {v, s};
  const c10::cuda::CUDAGuard guard(v_a.device());
  kvfuse::MergeStatesArgs a{};
  a.v_a = va.data_ptr();
  a.s_a = sa.data_ptr<float>();
  a.v_b = vb.data_ptr();
  a.s_b = sb.data_ptr<float>();
  a.v_out = v.data_ptr();
  a.s_out = s.data_ptr<float>();
  a.rows = va.size(0) * va.size(1);
  a.head_dim = static_cast<int>(va.size(2));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  KVFUSE_DISPATCH_FLOAT(v_a.scalar_type(), "merge_states",
                        [&] { KVFUSE_CUDA_OK(kvfuse::merge_states<scalar_t>(a, stream)); });
  return {v, s};
}
