// Input checks and dtype dispatch shared by the torch entry points (csrc/<op>.cu).
#pragma once

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/types.h>

#include <stdexcept>
#include <string>
#include <type_traits>

#include "kvfuse/rotary.cuh"

// Error messages are built with std::string / std::to_string, never with an ostream: TORCH_CHECK
// formats its arguments through std::ostringstream inside this extension, and on a machine whose
// C++ runtime differs from the one the extension was compiled against, inserting a number into that
// stream crashed (SIGSEGV in basic_ostream::_M_insert<long>) instead of raising. A failed check
// raises ValueError in Python (std::invalid_argument), a failed CUDA call RuntimeError.
namespace kvfuse::msg {
inline void put(std::string& s, const char* x) { s += x; }
inline void put(std::string& s, const std::string& x) { s += x; }
inline void put(std::string& s, bool x) { s += x ? "true" : "false"; }
template <typename T, std::enable_if_t<std::is_integral_v<T> && !std::is_same_v<T, bool>, int> = 0>
inline void put(std::string& s, T x) {
  s += std::to_string(x);
}
inline void put(std::string& s, at::ScalarType t) { s += c10::toString(t); }
inline void put(std::string& s, const c10::Device& d) { s += d.str(); }
inline void put(std::string& s, c10::IntArrayRef r) {
  s += "[";
  for (size_t i = 0; i < r.size(); ++i) s += (i ? ", " : "") + std::to_string(r[i]);
  s += "]";
}
template <typename... A>
std::string cat(const A&... a) {
  std::string s;
  (put(s, a), ...);
  return s;
}
}  // namespace kvfuse::msg

#define KVFUSE_CHECK(cond, ...)                                                       \
  do {                                                                                \
    if (!(cond)) throw std::invalid_argument(::kvfuse::msg::cat(__VA_ARGS__));        \
  } while (0)

#define KVFUSE_CHECK_CUDA(x) KVFUSE_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
#define KVFUSE_CHECK_CONTIGUOUS(x) KVFUSE_CHECK((x).is_contiguous(), #x " must be contiguous")
#define KVFUSE_CHECK_DTYPE(x, dt) KVFUSE_CHECK((x).scalar_type() == (dt), #x " must be " #dt ", got ", (x).scalar_type())
#define KVFUSE_CHECK_SAME_DEVICE(x, y) KVFUSE_CHECK((x).device() == (y).device(), #x " and " #y " must be on one device")

#define KVFUSE_CUDA_OK(expr)                                                          \
  do {                                                                                \
    cudaError_t kvfuse_err_ = (expr);                                                 \
    if (kvfuse_err_ != cudaSuccess)                                                   \
      throw std::runtime_error(::kvfuse::msg::cat("kvfuse CUDA: ", #expr, " failed: ", \
                                                  cudaGetErrorString(kvfuse_err_)));  \
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
      default: KVFUSE_CHECK(false, name, ": unsupported dtype ", dtype);               \
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
      default: KVFUSE_CHECK(false, name, ": unsupported dtype ", dtype, " (fp16/bf16 only)"); \
    }                                                                                 \
  }()

namespace kvfuse {

// A pool [(L,) P, page_size, H, D]: returns {L, P * page_size, H, D}.
inline std::array<int64_t, 4> pool_dims(const at::Tensor& cache, const char* name) {
  KVFUSE_CHECK(cache.dim() == 4 || cache.dim() == 5, name, " must be [(L,) P, page_size, H, D], got ",
              cache.sizes());
  KVFUSE_CHECK_CUDA(cache);
  KVFUSE_CHECK(cache.is_contiguous(), name, " must be contiguous");
  const int64_t L = cache.dim() == 5 ? cache.size(0) : 1;
  const int o = cache.dim() == 5 ? 1 : 0;
  return {L, cache.size(o) * cache.size(o + 1), cache.size(o + 2), cache.size(o + 3)};
}

inline void check_table(const at::Tensor& table_idx, const at::Tensor& cos, const at::Tensor& sin,
                        int64_t n, int64_t rotary_dim, int64_t head_dim, const at::Tensor& like) {
  KVFUSE_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim,
              "rotary_dim must be even and in (0, head_dim], got ", rotary_dim);
  KVFUSE_CHECK_DTYPE(table_idx, at::kInt);
  KVFUSE_CHECK_DTYPE(cos, at::kFloat);
  KVFUSE_CHECK_DTYPE(sin, at::kFloat);
  for (const at::Tensor* t : {&table_idx, &cos, &sin}) {
    KVFUSE_CHECK(t->device() == like.device(), "table_idx/cos/sin must be on the cache's device");
    KVFUSE_CHECK(t->is_contiguous(), "table_idx/cos/sin must be contiguous");
  }
  KVFUSE_CHECK(table_idx.dim() == 1 && table_idx.size(0) == n, "table_idx must be [", n, "]");
  KVFUSE_CHECK(cos.dim() == 2 && cos.size(1) == rotary_dim / 2 && sin.sizes() == cos.sizes(),
              "cos/sin must be [U, rotary_dim / 2 = ", rotary_dim / 2, "]");
}

// The slot engine's parameters for the pools (k, and v for compose), slot lists of one integer type
// (dst: the same as src for an in-place rotation) and the checked cos/sin tables.
inline SlotRotateParams slot_params(const at::Tensor& k_cache, void* v, const at::Tensor& src, const at::Tensor& dst,
                                    const at::Tensor& table_idx, const at::Tensor& cos, const at::Tensor& sin,
                                    int64_t rotary_dim) {
  const auto d = pool_dims(k_cache, "k_cache");
  SlotRotateParams p{};
  p.k = k_cache.data_ptr();
  p.v = v;
  p.src_slots = src.data_ptr();
  p.dst_slots = dst.data_ptr();
  p.slots64 = src.scalar_type() == at::kLong;
  p.table_idx = table_idx.data_ptr<int32_t>();
  p.cos = cos.data_ptr<float>();
  p.sin = sin.data_ptr<float>();
  p.n = src.size(0);
  p.layer_stride = d[1] * d[2] * d[3];
  p.num_layers = static_cast<int>(d[0]);
  p.num_heads = static_cast<int>(d[2]);
  p.head_dim = static_cast<int>(d[3]);
  p.rotary_dim = static_cast<int>(rotary_dim);
  return p;
}

}  // namespace kvfuse
