// segment_attention: torch entry point (checks + dtype dispatch) of the decode kernel
// (kvfuse/attention.cuh) and the Hopper prefill kernel (kvfuse/prefill_sm90.cuh).
#include "kvfuse/attention.cuh"
#include "kvfuse/prefill_sm90.cuh"
#include "torch_utils.h"

namespace {
void check_i32(const at::Tensor& t, const char* name, const at::Tensor& like) {
  KVFUSE_CHECK(t.scalar_type() == at::kInt, name, " must be int32, got ", t.scalar_type());
  KVFUSE_CHECK(t.device() == like.device(), name, " must be on ", like.device());
  KVFUSE_CHECK(t.is_contiguous(), name, " must be contiguous");
}
}  // namespace

std::tuple<at::Tensor, at::Tensor> segment_attention(
    at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_table, at::Tensor kv_lens,
    at::Tensor qo_indptr, at::Tensor token_seg, at::Tensor ancestors, at::Tensor q_token, at::Tensor token_pos,
    at::Tensor work_seq, at::Tensor work_qtile, at::Tensor kt_indptr, at::Tensor kt_index, at::Tensor kt_full,
    int64_t block_q, int64_t block_k, double sm_scale, double softcap, int64_t window) {
  KVFUSE_CHECK_CUDA(q);
  KVFUSE_CHECK(q.dim() == 3, "q must be [total_q, Hq, D]");
  KVFUSE_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(), "k_cache/v_cache must be [P, page_size, Hkv, D]");
  for (const at::Tensor* c : {&k_cache, &v_cache}) {
    KVFUSE_CHECK(c->scalar_type() == q.scalar_type(), "k_cache/v_cache must have q's dtype");
    KVFUSE_CHECK(c->device() == q.device(), "k_cache/v_cache must be on q's device");
    KVFUSE_CHECK(c->is_contiguous(), "k_cache/v_cache must be contiguous");
  }
  const int64_t total_q = q.size(0), hq = q.size(1), d = q.size(2);
  const int64_t page_size = k_cache.size(1), hkv = k_cache.size(2);
  KVFUSE_CHECK(k_cache.size(3) == d, "head_dim of q and the caches differ");
  KVFUSE_CHECK(d == 64 || d == 128 || d == 256, "head_dim must be 64, 128 or 256, got ", d);
  KVFUSE_CHECK(hq % hkv == 0, "Hq must be a multiple of Hkv");
  KVFUSE_CHECK(block_q >= 1 && block_k >= 1, "block_q/block_k must be positive");
  check_i32(block_table, "block_table", q);
  check_i32(kv_lens, "kv_lens", q);
  check_i32(qo_indptr, "qo_indptr", q);
  check_i32(token_seg, "token_seg", q);
  check_i32(q_token, "q_token", q);
  check_i32(token_pos, "token_pos", q);
  KVFUSE_CHECK(q_token.numel() == total_q, "q_token must hold one token index per query row");
  KVFUSE_CHECK(token_pos.sizes() == token_seg.sizes(), "token_pos must be shaped like token_seg");
  KVFUSE_CHECK(softcap >= 0 && window >= 0, "softcap and window must be >= 0 (0: off)");
  check_i32(work_seq, "work_seq", q);
  check_i32(work_qtile, "work_qtile", q);
  check_i32(kt_indptr, "kt_indptr", q);
  check_i32(kt_index, "kt_index", q);
  KVFUSE_CHECK(kt_full.numel() == kt_index.numel() && kt_full.element_size() == 1, "kt_full must be int8 [T]");
  KVFUSE_CHECK(ancestors.dim() == 3 && ancestors.element_size() == 1 && ancestors.size(1) == ancestors.size(2),
              "ancestors must be uint8/bool [B, S, S]");
  const int64_t B = block_table.size(0);
  KVFUSE_CHECK(kv_lens.numel() == B && qo_indptr.numel() == B + 1 && token_seg.size(0) == B &&
                  ancestors.size(0) == B, "batch sizes of the plan tensors differ");
  KVFUSE_CHECK(kt_indptr.numel() == work_seq.numel() + 1 && work_qtile.numel() == work_seq.numel(),
              "work_seq/work_qtile/kt_indptr sizes differ");

  for (const at::Tensor* t : {&q, &k_cache, &v_cache})  // the kernels copy 16-byte chunks
    KVFUSE_CHECK(reinterpret_cast<std::uintptr_t>(t->data_ptr()) % 16 == 0,
                 "q, k_cache and v_cache must start on a 16-byte boundary (a view at an odd offset is not)");
  const at::Tensor qc = q.contiguous();
  const at::Tensor anc = ancestors.contiguous();
  const at::Tensor full = kt_full.contiguous();
  at::Tensor out = at::empty_like(qc);
  at::Tensor lse = at::empty({total_q, hq}, q.options().dtype(at::kFloat));
  if (total_q == 0) return {out, lse};
  const c10::cuda::CUDAGuard guard(q.device());

  const int G = static_cast<int>(hq / hkv);
  // a tile map of more than kDecodeMaxQ queries per tile is a prefill plan (kvfuse/backends/cuda.py)
  const bool prefill = block_q > kvfuse::kDecodeMaxQ;
  if (prefill) {
    KVFUSE_CHECK(kvfuse::prefill_sm90_available(q.device().index()) == 1,
                 "the CUDA prefill kernel needs a Hopper GPU (compute capability 9.0) and an extension built "
                 "for sm_90a (TORCH_CUDA_ARCH_LIST with 9.0a)");
    const int bk = d == 64 ? kvfuse::PrefillConfig<64>::kBlockK
                           : (d == 128 ? kvfuse::PrefillConfig<128>::kBlockK : kvfuse::PrefillConfig<256>::kBlockK);
    KVFUSE_CHECK(block_k == bk, "the CUDA prefill kernel takes ", bk, "-key tiles at head_dim ", d, ", the plan has ",
                 block_k);
  }
  kvfuse::AttentionArgs a{};
  a.q = qc.data_ptr();
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.block_table = block_table.data_ptr<int32_t>();
  a.bt_stride = block_table.size(1);
  a.kv_lens = kv_lens.data_ptr<int32_t>();
  a.qo_indptr = qo_indptr.data_ptr<int32_t>();
  a.token_seg = token_seg.data_ptr<int32_t>();
  a.seg_stride = token_seg.size(1);
  a.ancestors = static_cast<const uint8_t*>(anc.data_ptr());
  a.num_segs = static_cast<int>(anc.size(1));
  a.work_seq = work_seq.data_ptr<int32_t>();
  a.work_qtile = work_qtile.data_ptr<int32_t>();
  a.kt_indptr = kt_indptr.data_ptr<int32_t>();
  a.kt_index = kt_index.data_ptr<int32_t>();
  a.kt_full = static_cast<const int8_t*>(full.data_ptr());
  a.num_work = static_cast<int>(work_seq.numel());
  a.block_q = static_cast<int>(block_q);
  a.block_k = static_cast<int>(block_k);
  a.page_size = static_cast<int>(page_size);
  a.num_qo_heads = static_cast<int>(hq);
  a.num_kv_heads = static_cast<int>(hkv);
  a.scale_log2 = static_cast<float>(sm_scale * 1.4426950408889634);
  a.q_token = q_token.data_ptr<int32_t>();
  a.token_pos = token_pos.data_ptr<int32_t>();
  a.window = static_cast<int>(window);
  a.softcap_pre = softcap > 0 ? static_cast<float>(sm_scale / softcap) : 0.f;
  a.softcap_mul = softcap > 0 ? static_cast<float>(softcap * 1.4426950408889634) : 0.f;
  a.num_row_blocks = prefill ? kvfuse::prefill_row_blocks(a.block_q, G) : kvfuse::decode_row_blocks(a.block_q, G);
  a.total_q = static_cast<int>(total_q);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (prefill) {
    a.num_splits = 1;
    a.out = out.data_ptr();
    a.lse = lse.data_ptr<float>();
    KVFUSE_DISPATCH_HALF(q.scalar_type(), "segment_attention", [&] {
      KVFUSE_CUDA_OK(kvfuse::prefill_attention_sm90<scalar_t>(a, static_cast<int>(d), k_cache.size(0), stream));
    });
    return {out, lse};
  }
  int sms = 1;
  KVFUSE_CUDA_OK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, q.device().index()));
  constexpr int per_sm = 8;  // blocks per multiprocessor the split-K plan aims at
  a.num_splits =
      kvfuse::decode_plan_splits(kt_index.numel(), a.num_work, a.num_kv_heads, a.num_row_blocks, per_sm * sms);
  at::Tensor part_o, part_lse;
  if (a.num_splits > 1) {
    part_o = at::empty({a.num_splits, total_q, hq, d}, q.options().dtype(at::kFloat));
    part_lse = at::empty({a.num_splits, total_q, hq}, q.options().dtype(at::kFloat));
    a.part_o = part_o.data_ptr<float>();
    a.part_lse = part_lse.data_ptr<float>();
  }
  a.out = out.data_ptr();
  a.lse = lse.data_ptr<float>();
  KVFUSE_DISPATCH_HALF(q.scalar_type(), "segment_attention", [&] {
    KVFUSE_CUDA_OK(kvfuse::decode_attention<scalar_t>(a, static_cast<int>(d), stream));
  });
  return {out, lse};
}

int64_t prefill_sm90_available(int64_t device) {
  return kvfuse::prefill_sm90_available(static_cast<int>(device));
}
