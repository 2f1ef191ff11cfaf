// Input checks and dtype dispatch shared by the torch entry points (csrc/<op>.cu).
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/types.h>

#define KVFUSE_CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
#define KVFUSE_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define KVFUSE_CHECK_DTYPE(x, dt) TORCH_CHECK((x).scalar_type() == (dt), #x " must be " #dt ", got ", (x).scalar_type())
#define KVFUSE_CHECK_SAME_DEVICE(x, y) TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on one device")

#define KVFUSE_CUDA_OK(expr)                                                          \
  do {                                                                                \
    cudaError_t kvfuse_err_ = (expr);                                                 \
    TORCH_CHECK(kvfuse_err_ == cudaSuccess, "kvfuse CUDA: ", #expr, " failed: ",      \
                cudaGetErrorString(kvfuse_err_));                                     \
  } while (0)

// Runs `__VA_ARGS__` with `scalar_t` bound to the kernel element type of `dtype`.
#define KVFUSE_DISPATCH_FLOAT(dtype, name, ...)                                       \
  [&] {                                                                               \
    switch (dtype) {                                                                  \
      case at::ScalarType::Float: { using scalar_t = float; return __VA_ARGS__(); }   \
      case at::ScalarType::Half: { using scalar_t = __half; return __VA_ARGS__(); }   \
      case at::ScalarType::BFloat16: {                                                \
        using scalar_t = __nv_bfloat16;                                               \
        return __VA_ARGS__();                                                         \
      }                                                                               \
      default: TORCH_CHECK(false, name, ": unsupported dtype ", dtype);               \
    }                                                                                 \
  }()

#define KVFUSE_DISPATCH_HALF(dtype, name, ...)                                        \
  [&] {                                                                               \
    switch (dtype) {                                                                  \
      case at::ScalarType::Half: { using scalar_t = __half; return __VA_ARGS__(); }   \
      case at::ScalarType::BFloat16: {                                                \
        using scalar_t = __nv_bfloat16;                                               \
        return __VA_ARGS__();                                                         \
      }                                                                               \
      default: TORCH_CHECK(false, name, ": unsupported dtype ", dtype, " (fp16/bf16 only)"); \
    }                                                                                 \
  }()

namespace kvfuse {

// A pool [(L,) P, page_size, H, D]: returns {L, P * page_size, H, D}.
inline std::array<int64_t, 4> pool_dims(const at::Tensor& cache, const char* name) {
  TORCH_CHECK(cache.dim() == 4 || cache.dim() == 5, name, " must be [(L,) P, page_size, H, D], got ",
              cache.sizes());
  KVFUSE_CHECK_CUDA(cache);
  TORCH_CHECK(cache.is_contiguous(), name, " must be contiguous");
  const int64_t L = cache.dim() == 5 ? cache.size(0) : 1;
  const int o = cache.dim() == 5 ? 1 : 0;
  return {L, cache.size(o) * cache.size(o + 1), cache.size(o + 2), cache.size(o + 3)};
}

inline void check_table(const at::Tensor& table_idx, const at::Tensor& cos, const at::Tensor& sin,
                        int64_t n, int64_t rotary_dim, int64_t head_dim, const at::Tensor& like) {
  TORCH_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim,
              "rotary_dim must be even and in (0, head_dim], got ", rotary_dim);
  KVFUSE_CHECK_DTYPE(table_idx, at::kInt);
  KVFUSE_CHECK_DTYPE(cos, at::kFloat);
  KVFUSE_CHECK_DTYPE(sin, at::kFloat);
  for (const at::Tensor* t : {&table_idx, &cos, &sin}) {
    TORCH_CHECK(t->device() == like.device(), "table_idx/cos/sin must be on the cache's device");
    TORCH_CHECK(t->is_contiguous(), "table_idx/cos/sin must be contiguous");
  }
  TORCH_CHECK(table_idx.dim() == 1 && table_idx.size(0) == n, "table_idx must be [", n, "]");
  TORCH_CHECK(cos.dim() == 2 && cos.size(1) == rotary_dim / 2 && sin.sizes() == cos.sizes(),
              "cos/sin must be [U, rotary_dim / 2 = ", rotary_dim / 2, "]");
}

}  // namespace kvfuse
