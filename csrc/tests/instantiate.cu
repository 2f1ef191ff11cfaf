// Instantiates every kernel launcher for every dtype, so that a compile alone checks them all
// (CMake target kvfuse_instantiations, csrc/check_compile.sh).
#include "kvfuse/attention.cuh"
#include "kvfuse/compose.cuh"
#include "kvfuse/merge_states.cuh"
#include "kvfuse/prefill_sm90.cuh"
#include "kvfuse/rerotate.cuh"

namespace kvfuse {
#define KVFUSE_POOL_TYPES(X) X(float) X(__half) X(__nv_bfloat16)
#define KVFUSE_INST_POOL(T)                                                       \
  template cudaError_t rerotate<T>(SlotRotateParams, bool, cudaStream_t);          \
  template cudaError_t compose_copy<T>(const SlotRotateParams&, bool, cudaStream_t); \
  template cudaError_t merge_states<T>(const MergeStatesArgs&, cudaStream_t);
KVFUSE_POOL_TYPES(KVFUSE_INST_POOL)
template cudaError_t decode_attention<__half>(const AttentionArgs&, int, cudaStream_t);
template cudaError_t decode_attention<__nv_bfloat16>(const AttentionArgs&, int, cudaStream_t);
template cudaError_t prefill_attention_sm90<__half>(const AttentionArgs&, int, long long, cudaStream_t);
template cudaError_t prefill_attention_sm90<__nv_bfloat16>(const AttentionArgs&, int, long long, cudaStream_t);
}  // namespace kvfuse
