// Shared helpers of the kvfuse kernels: vector types, float conversions, launch helpers.
// Header-only and torch-free: these headers compile with nvcc alone (see csrc/check_compile.sh).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>

namespace kvfuse {

// An aligned vector of N elements of T: one LDG/STG of N * sizeof(T) bytes (16 bytes at most).
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T, int N>
__device__ __forceinline__ Vec<T, N> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T, N>*>(p);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, N>& x) {
  *reinterpret_cast<Vec<T, N>*>(p) = x;
}

// Widest vector (in elements, a power of two, at most 16 bytes) that divides every extent given and
// keeps `ptr` aligned. Host side.
template <typename T>
inline int widest_vec(const void* ptr, int a, int b = 0, int c = 0) {
  int v = static_cast<int>(16 / sizeof(T));
  auto addr = reinterpret_cast<std::uintptr_t>(ptr);
  while (v > 1 && (a % v || b % v || c % v || addr % (v * sizeof(T)))) v /= 2;
  return v;
}

// Number of blocks that fill the current device once at the kernel's occupancy.
template <typename Kernel>
inline int resident_blocks(Kernel kernel, int threads, std::size_t smem) {
  int dev = 0, sms = 1, per_sm = 1;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem);
  return sms * (per_sm > 0 ? per_sm : 1);
}

inline int ceil_div(long long a, long long b) { return static_cast<int>((a + b - 1) / b); }

}  // namespace kvfuse
