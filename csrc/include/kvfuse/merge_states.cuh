// merge_states: combine two attention outputs over disjoint key sets.
//   s = log(exp(s_a) + exp(s_b)),  v = (exp(s_a - s) v_a + exp(s_b - s) v_b)
// s_* are float32 natural-log LSE; a side at -inf contributes nothing; both at -inf give v = 0,
// s = -inf.
#pragma once

#include "kvfuse/common.cuh"

namespace kvfuse {

struct MergeStatesArgs {
  const void* v_a;     // [rows, D] (rows = N * H), contiguous
  const float* s_a;    // [rows]
  const void* v_b;
  const float* s_b;
  void* v_out;
  float* s_out;
  long long rows;
  int head_dim;
};

constexpr int kMergeThreads = 256;

template <typename T, int VEC>
__global__ void __launch_bounds__(kMergeThreads) merge_states_kernel(MergeStatesArgs a) {
  const int per_row = a.head_dim / VEC;
  const long long total = a.rows * per_row;
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long row = e / per_row;
    const int off = static_cast<int>(e - row * per_row) * VEC;
    const float sa = a.s_a[row], sb = a.s_b[row];
    float m = fmaxf(sa, sb);
    if (isinf(m)) m = 0.f;  // both empty (-inf), or an infinite score: keep the reference's guard
    const float wa = expf(sa - m), wb = expf(sb - m);
    const float tot = wa + wb;
    const float inv = tot > 0.f ? 1.f / tot : 1.f;
    const Vec<T, VEC> x = load_vec<T, VEC>(static_cast<const T*>(a.v_a) + row * a.head_dim + off);
    const Vec<T, VEC> y = load_vec<T, VEC>(static_cast<const T*>(a.v_b) + row * a.head_dim + off);
    Vec<T, VEC> o;
#pragma unroll
    for (int i = 0; i < VEC; ++i) o.v[i] = from_float<T>((to_float(x.v[i]) * wa + to_float(y.v[i]) * wb) * inv);
    store_vec<T, VEC>(static_cast<T*>(a.v_out) + row * a.head_dim + off, o);
    if (off == 0) a.s_out[row] = m + logf(tot);
  }
}

template <typename T>
cudaError_t merge_states(const MergeStatesArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  int vec = std::min(widest_vec<T>(a.v_a, a.head_dim), widest_vec<T>(a.v_b, a.head_dim));
  vec = std::min(vec, widest_vec<T>(a.v_out, a.head_dim));
  const long long total = a.rows * (a.head_dim / vec);
  auto go = [&](auto kernel) {
    const int grid = static_cast<int>(std::min(static_cast<long long>(ceil_div(total, kMergeThreads)),
                                               static_cast<long long>(resident_blocks(kernel, kMergeThreads, 0))));
    kernel<<<grid, kMergeThreads, 0, stream>>>(a);
    return cudaGetLastError();
  };
  constexpr int kMax = 16 / sizeof(T);
  if constexpr (kMax >= 8) {
    if (vec == 8) return go(merge_states_kernel<T, 8>);
  }
  if (vec == 4) return go(merge_states_kernel<T, 4>);
  if (vec == 2) return go(merge_states_kernel<T, 2>);
  return go(merge_states_kernel<T, 1>);
}

}  // namespace kvfuse
