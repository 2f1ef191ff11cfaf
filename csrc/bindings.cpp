// The Python module kvfuse._C: one function per operation (csrc/<op>.cu holds each).
#include <torch/extension.h>

void rerotate_(at::Tensor k_cache, at::Tensor slots, at::Tensor table_idx, at::Tensor cos, at::Tensor sin,
               int64_t rotary_dim, bool interleaved);
void compose_copy_(at::Tensor k_cache, at::Tensor v_cache, at::Tensor src_slots, at::Tensor dst_slots,
                   at::Tensor table_idx, at::Tensor cos, at::Tensor sin, int64_t rotary_dim, bool interleaved);
std::tuple<at::Tensor, at::Tensor> merge_states(at::Tensor v_a, at::Tensor s_a, at::Tensor v_b, at::Tensor s_b);
std::tuple<at::Tensor, at::Tensor> segment_attention(
    at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_table, at::Tensor kv_lens,
    at::Tensor qo_indptr, at::Tensor token_seg, at::Tensor ancestors, at::Tensor q_token, at::Tensor token_pos,
    at::Tensor work_seq, at::Tensor work_qtile, at::Tensor kt_indptr, at::Tensor kt_index, at::Tensor kt_full,
    int64_t block_q, int64_t block_k, double sm_scale, double softcap, int64_t window);
int64_t prefill_sm90_available(int64_t device);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "kvfuse CUDA kernels (see kvfuse/backends/cuda.py for the Python side)";
  m.def("rerotate_", &rerotate_, "Rotate the keys of the listed slots in place, all layers");
  m.def("compose_copy_", &compose_copy_, "k[dst] = R k[src], v[dst] = v[src], all layers");
  m.def("merge_states", &merge_states, "Merge two partial attention results (natural-log LSE)");
  m.def("segment_attention", &segment_attention,
        "Segment-masked paged attention: decode (split over keys) or, for tiles of more than 8 queries, "
        "the Hopper prefill kernel");
  m.def("prefill_sm90_available", &prefill_sm90_available,
        "Whether the Hopper prefill kernel runs on this device (compute capability 9.0, sm_90a code): "
        "1 yes, 0 no, -1 the probe could not run (not during CUDA-graph capture)");
}
