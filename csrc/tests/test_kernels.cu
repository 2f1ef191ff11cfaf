// Unit tests of the torch-free kernels against plain C++ loops (run by ctest; needs a GPU).
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "kvfuse/attention.cuh"
#include "kvfuse/compose.cuh"
#include "kvfuse/merge_states.cuh"
#include "kvfuse/prefill_sm90.cuh"
#include "kvfuse/rerotate.cuh"

#define CK(x)                                                                             \
  do {                                                                                    \
    cudaError_t e_ = (x);                                                                 \
    if (e_ != cudaSuccess) {                                                              \
      std::printf("%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));     \
      std::exit(2);                                                                       \
    }                                                                                     \
  } while (0)

namespace {

std::mt19937 rng(1234);
float randn() { return std::normal_distribution<float>(0.f, 1.f)(rng); }

template <typename T> T h_from(float x);
template <> float h_from<float>(float x) { return x; }
template <> __half h_from<__half>(float x) { return __float2half(x); }
template <> __nv_bfloat16 h_from<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
float h_to(float x) { return x; }
float h_to(__half x) { return __half2float(x); }
float h_to(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
struct Dev {
  T* p = nullptr;
  std::size_t n = 0;
  explicit Dev(const std::vector<T>& h) : n(h.size()) {
    CK(cudaMalloc(&p, std::max<std::size_t>(1, n) * sizeof(T)));
    CK(cudaMemcpy(p, h.data(), n * sizeof(T), cudaMemcpyHostToDevice));
  }
  std::vector<T> get() const {
    std::vector<T> h(n);
    CK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
  ~Dev() { cudaFree(p); }
};

int failures = 0;
void expect(bool ok, const char* what, double err) {
  std::printf("%-48s %s (max err %.3g)\n", what, ok ? "ok" : "FAILED", err);
  if (!ok) ++failures;
}

// Rotation of one row (NeoX or interleaved) in float, the reference for both slot kernels.
void rotate_row(const float* x, float* y, const float* c, const float* s, int D, int rd, bool inter) {
  for (int i = 0; i < D; ++i) y[i] = x[i];
  for (int j = 0; j < rd / 2; ++j) {
    const int a = inter ? 2 * j : j, b = inter ? 2 * j + 1 : j + rd / 2;
    y[a] = x[a] * c[j] - x[b] * s[j];
    y[b] = x[b] * c[j] + x[a] * s[j];
  }
}

// Rerotate (in place) or compose (src -> dst) of a shuffled third of the slots; every byte outside the
// rotated keys must be bit-identical (compose: the copied key dims and the values exact too).
template <typename T>
void test_slot_kernels(bool compose, bool inter, int L, int P, int ps, int H, int D, int rd, const char* name,
                       bool slots64 = true) {
  const long long slots = static_cast<long long>(P) * ps;
  const std::size_t size = static_cast<std::size_t>(L) * slots * H * D;
  std::vector<T> k(size), v(size);
  for (auto& x : k) x = h_from<T>(randn());
  for (auto& x : v) x = h_from<T>(randn());
  std::vector<int64_t> perm(slots);
  for (long long i = 0; i < slots; ++i) perm[i] = i;
  std::shuffle(perm.begin(), perm.end(), rng);
  const long long n = slots / 3;
  std::vector<int64_t> src(perm.begin(), perm.begin() + n), dst(perm.begin() + n, perm.begin() + 2 * n);
  const int U = 5;
  std::vector<float> cs(U * rd / 2), sn(U * rd / 2);
  for (int u = 0; u < U; ++u)
    for (int j = 0; j < rd / 2; ++j) {
      const double ang = (u * 977.0 - 1234.5) * std::pow(10000.0, -2.0 * j / rd);
      cs[u * rd / 2 + j] = static_cast<float>(std::cos(ang));
      sn[u * rd / 2 + j] = static_cast<float>(std::sin(ang));
    }
  std::vector<int32_t> ti(n);
  for (auto& x : ti) x = static_cast<int32_t>(rng() % U);

  Dev<T> dk(k), dv(v);
  Dev<int64_t> dsrc(src), ddst(dst);
  std::vector<int32_t> src32(src.begin(), src.end()), dst32(dst.begin(), dst.end());
  Dev<int32_t> dsrc32(src32), ddst32(dst32);
  const void* sp = slots64 ? static_cast<const void*>(dsrc.p) : static_cast<const void*>(dsrc32.p);
  const void* dp = slots64 ? static_cast<const void*>(ddst.p) : static_cast<const void*>(ddst32.p);
  Dev<int32_t> dti(ti);
  Dev<float> dc(cs), ds(sn);
  kvfuse::SlotRotateParams p{};
  p.k = dk.p;
  p.v = compose ? dv.p : nullptr;
  p.src_slots = sp;
  p.dst_slots = compose ? dp : sp;
  p.slots64 = slots64;
  p.table_idx = dti.p;
  p.cos = dc.p;
  p.sin = ds.p;
  p.n = n;
  p.layer_stride = slots * H * D;
  p.num_layers = L;
  p.num_heads = H;
  p.head_dim = D;
  p.rotary_dim = rd;
  CK(compose ? kvfuse::compose_copy<T>(p, inter, nullptr) : kvfuse::rerotate<T>(p, inter, nullptr));
  CK(cudaDeviceSynchronize());
  std::vector<T> gk = dk.get(), gv = dv.get();
  std::vector<T> wk = k, wv = v;
  std::vector<char> rotated(size, 0);  // key elements the kernel rotates (compared with a tolerance)
  std::vector<float> x(D), y(D);
  for (int l = 0; l < L; ++l)
    for (long long i = 0; i < n; ++i)
      for (int h = 0; h < H; ++h) {
        const std::size_t so = ((l * slots + src[i]) * H + h) * static_cast<std::size_t>(D);
        const std::size_t to = ((l * slots + (compose ? dst[i] : src[i])) * H + h) * static_cast<std::size_t>(D);
        for (int d = 0; d < D; ++d) x[d] = h_to(k[so + d]);
        rotate_row(x.data(), y.data(), &cs[ti[i] * rd / 2], &sn[ti[i] * rd / 2], D, rd, inter);
        for (int d = 0; d < D; ++d) wk[to + d] = d < rd ? h_from<T>(y[d]) : k[so + d];
        for (int d = 0; d < rd; ++d) rotated[to + d] = 1;
        if (compose)
          for (int d = 0; d < D; ++d) wv[to + d] = v[so + d];
      }
  double err = 0;
  bool exact_rest = true;
  const float tol = sizeof(T) == 4 ? 1e-5f : (sizeof(T) == 2 ? 2e-2f : 0.f);
  for (std::size_t i = 0; i < size; ++i) {
    if (rotated[i]) {
      err = std::max(err, static_cast<double>(std::fabs(h_to(gk[i]) - h_to(wk[i]))));
    } else if (std::memcmp(&gk[i], &wk[i], sizeof(T)) != 0) {
      exact_rest = false;
    }
    if (std::memcmp(&gv[i], &wv[i], sizeof(T)) != 0) exact_rest = false;
  }
  expect(err <= tol * 4 && exact_rest, name, err);
}

void test_merge_states() {
  const int N = 37, H = 3, D = 64;
  std::vector<float> va(N * H * D), vb(N * H * D), sa(N * H), sb(N * H);
  for (auto& x : va) x = randn();
  for (auto& x : vb) x = randn();
  for (auto& x : sa) x = 3 * randn();
  for (auto& x : sb) x = 3 * randn();
  sa[0] = -INFINITY;
  sb[1] = -INFINITY;
  sa[2] = sb[2] = -INFINITY;
  Dev<float> dva(va), dvb(vb), dsa(sa), dsb(sb), dvo(va), dso(sa);
  kvfuse::MergeStatesArgs a{dva.p, dsa.p, dvb.p, dsb.p, dvo.p, dso.p, N * H, D};
  CK(kvfuse::merge_states<float>(a, nullptr));
  CK(cudaDeviceSynchronize());
  std::vector<float> vo = dvo.get(), so = dso.get();
  double err = 0;
  for (int r = 0; r < N * H; ++r) {
    float m = std::max(sa[r], sb[r]);
    if (std::isinf(m)) m = 0;
    const float wa = std::exp(sa[r] - m), wb = std::exp(sb[r] - m), t = wa + wb;
    const float s = m + std::log(t);
    if (!(std::isinf(s) && std::isinf(so[r]))) err = std::max(err, static_cast<double>(std::fabs(s - so[r])));
    for (int d = 0; d < D; ++d) {
      const float want = t > 0 ? (va[r * D + d] * wa + vb[r * D + d] * wb) / t : 0.f;
      err = std::max(err, static_cast<double>(std::fabs(want - vo[r * D + d])));
    }
  }
  expect(err < 1e-4, "merge_states f32", err);
}

// Decode attention against a float64 loop. Each sequence has three segments (prefix, thread A,
// thread B: B sees the prefix and its own causal past, not A); its queries are its last q_len tokens
// (they may straddle A and B). The tile map lists, per work item (one query tile), the key tiles
// with any visible pair, flagged full where every pair with a key below kv_len is visible, as the
// plan does; `empty_last` lists none for the last sequence, whose queries must then see nothing
// (output 0, LSE -inf). Outputs are poisoned before the call. `window` > 0 adds a sliding window over
// positions (token positions are shifted by 3 per segment so they differ from the token indices);
// `softcap` > 0 soft-caps the scores.
struct DecodeCase {
  int D, Hq, Hkv, qlen, ps, bq, bk, splits_hint;
  std::vector<int> lens;
  bool empty_last;
  int window = 0;
  float softcap = 0.f;
  bool sm90 = false;  // run the Hopper prefill kernel (block_k must be its PrefillConfig<D>::kBlockK)
};

template <typename T>
void test_decode(const DecodeCase& t, const char* name) {
  const int B = static_cast<int>(t.lens.size());
  const int D = t.D, Hq = t.Hq, Hkv = t.Hkv, G = Hq / Hkv, qlen = t.qlen, ps = t.ps, bk = t.bk;
  int bq = t.bq;
  if (bq == 0)
    for (bq = 1; bq < qlen; bq *= 2) {
    }
  const int max_kv = *std::max_element(t.lens.begin(), t.lens.end());
  const int max_pages = (max_kv + ps - 1) / ps;
  const int P = B * max_pages + 3;
  std::vector<int32_t> bt(B * max_pages);
  std::vector<int> pages(P);
  for (int i = 0; i < P; ++i) pages[i] = i;
  std::shuffle(pages.begin(), pages.end(), rng);
  for (int i = 0; i < B * max_pages; ++i) bt[i] = pages[i];
  const std::size_t pool = static_cast<std::size_t>(P) * ps * Hkv * D;
  std::vector<T> kc(pool), vc(pool);
  for (auto& x : kc) x = h_from<T>(randn());
  for (auto& x : vc) x = h_from<T>(randn());
  // poison every slot no sequence holds (the pages no table lists, the tails of last pages): a kernel
  // that reads one as a key gets NaN into its output
  {
    std::vector<char> used(static_cast<std::size_t>(P) * ps, 0);
    for (int b = 0; b < B; ++b)
      for (int j = 0; j < t.lens[b]; ++j) used[static_cast<std::size_t>(bt[b * max_pages + j / ps]) * ps + j % ps] = 1;
    for (std::size_t slot = 0; slot < used.size(); ++slot)
      if (!used[slot])
        for (std::size_t e = slot * Hkv * D; e < (slot + 1) * Hkv * D; ++e) kc[e] = vc[e] = h_from<T>(NAN);
  }
  const int S = 3;
  std::vector<int32_t> seg(B * max_kv, -1), pos(B * max_kv, 0), kv_lens(B), qo(B + 1, 0), qtok;
  std::vector<uint8_t> anc(B * S * S, 0);
  for (int b = 0; b < B; ++b) {
    const int n = t.lens[b], p0 = n / 3, a1 = p0 + (n - p0) / 2;
    for (int j = 0; j < n; ++j) {
      seg[b * max_kv + j] = j < p0 ? 0 : (j < a1 ? 1 : 2);
      pos[b * max_kv + j] = j + 3 * seg[b * max_kv + j];
    }
    anc[b * S * S + 1 * S + 0] = anc[b * S * S + 2 * S + 0] = 1;
    kv_lens[b] = n;
    qo[b + 1] = qo[b] + qlen;
    for (int qi = 0; qi < qlen; ++qi) qtok.push_back(n - qlen + qi);
  }
  auto visible = [&](int b, int qp, int j) {
    const int sq = seg[b * max_kv + qp], sk = seg[b * max_kv + j];
    const bool in_window = t.window == 0 || pos[b * max_kv + qp] - pos[b * max_kv + j] < t.window;
    return ((sk == sq && j <= qp) || anc[b * S * S + sq * S + sk] != 0) && in_window;
  };
  const int total_q = qo[B];
  std::vector<T> q(static_cast<std::size_t>(total_q) * Hq * D);
  for (auto& x : q) x = h_from<T>(randn());
  std::vector<int32_t> ws, wq, indptr{0}, idx;
  std::vector<int8_t> full;
  std::vector<std::vector<char>> listed(B);  // per sequence and query tile: key tile listed
  for (int b = 0; b < B; ++b) {
    const int n = t.lens[b], nt = (n + bk - 1) / bk, nqt = (qlen + bq - 1) / bq;
    listed[b].assign(static_cast<std::size_t>(nqt) * nt, 0);
    for (int qt = 0; qt < nqt; ++qt) {
      ws.push_back(b);
      wq.push_back(qt);
      for (int kt = 0; kt < nt && !(t.empty_last && b == B - 1); ++kt) {
        bool any = false, all = true;
        for (int qi = qt * bq; qi < std::min(qlen, qt * bq + bq); ++qi)
          for (int j = kt * bk; j < std::min(n, kt * bk + bk); ++j) {
            const bool v = visible(b, n - qlen + qi, j);
            any = any || v;
            all = all && v;
          }
        if (!any) continue;
        listed[b][qt * nt + kt] = 1;
        idx.push_back(kt);
        full.push_back(all ? 1 : 0);
      }
      indptr.push_back(static_cast<int32_t>(idx.size()));
    }
  }
  if (idx.empty()) {  // keep the device arrays non-empty
    idx.push_back(0);
    full.push_back(0);
  }
  const float scale = 1.f / std::sqrt(static_cast<float>(D));
  Dev<T> dq(q), dk(kc), dv(vc);
  Dev<int32_t> dbt(bt), dlen(kv_lens), dqo(qo), dseg(seg), dws(ws), dwq(wq), dip(indptr), didx(idx), dqt(qtok),
      dpos(pos);
  Dev<uint8_t> danc(anc);
  Dev<int8_t> dfull(full);
  std::vector<T> out_h(q.size(), h_from<T>(12345.f));
  std::vector<float> lse_h(static_cast<std::size_t>(total_q) * Hq, NAN);
  Dev<T> dout(out_h);
  Dev<float> dlse(lse_h);
  kvfuse::AttentionArgs a{};
  a.q = dq.p; a.k_cache = dk.p; a.v_cache = dv.p; a.block_table = dbt.p; a.bt_stride = max_pages;
  a.kv_lens = dlen.p; a.qo_indptr = dqo.p; a.token_seg = dseg.p; a.seg_stride = max_kv;
  a.ancestors = danc.p; a.num_segs = S; a.work_seq = dws.p; a.work_qtile = dwq.p; a.kt_indptr = dip.p;
  a.kt_index = didx.p; a.kt_full = dfull.p; a.num_work = static_cast<int>(ws.size()); a.block_q = bq;
  a.block_k = bk; a.page_size = ps; a.num_qo_heads = Hq; a.num_kv_heads = Hkv;
  a.scale_log2 = scale * 1.4426950408889634f;
  a.q_token = dqt.p; a.token_pos = dpos.p; a.window = t.window;
  a.softcap_pre = t.softcap > 0 ? scale / t.softcap : 0.f;
  a.softcap_mul = t.softcap > 0 ? t.softcap * 1.4426950408889634f : 0.f;
  a.num_row_blocks = t.sm90 ? kvfuse::prefill_row_blocks(bq, G) : kvfuse::decode_row_blocks(bq, G);
  a.total_q = total_q;
  a.num_splits = t.sm90 ? 1
                        : kvfuse::decode_plan_splits(static_cast<long long>(indptr.back()), a.num_work, Hkv,
                                                     a.num_row_blocks, t.splits_hint);
  std::vector<float> po(static_cast<std::size_t>(a.num_splits) * total_q * Hq * D, NAN);
  std::vector<float> pl(static_cast<std::size_t>(a.num_splits) * total_q * Hq, NAN);
  Dev<float> dpo(po), dpl(pl);
  a.part_o = dpo.p; a.part_lse = dpl.p; a.out = dout.p; a.lse = dlse.p;
  if (t.sm90)
    CK(kvfuse::prefill_attention_sm90<T>(a, D, P, nullptr));
  else
    CK(kvfuse::decode_attention<T>(a, D, nullptr));
  CK(cudaDeviceSynchronize());
  out_h = dout.get();
  lse_h = dlse.get();
  double err = 0;
  bool empty_ok = true;
  for (int b = 0; b < B; ++b) {
    const int n = t.lens[b], nt = (n + bk - 1) / bk;
    for (int qi = 0; qi < qlen; ++qi) {
      const int qp = n - qlen + qi;
      for (int h = 0; h < Hq; ++h) {
        const std::size_t qrow = (static_cast<std::size_t>(qo[b] + qi) * Hq + h) * D;
        std::vector<double> sc(n, -INFINITY);
        double m = -INFINITY;
        for (int j = 0; j < n; ++j) {
          if (!visible(b, qp, j) || !listed[b][(qi / bq) * nt + j / bk]) continue;
          const std::size_t ko = ((static_cast<std::size_t>(bt[b * max_pages + j / ps]) * ps + j % ps) * Hkv + h / G) * D;
          double d = 0;
          for (int e = 0; e < D; ++e) d += static_cast<double>(h_to(q[qrow + e])) * h_to(kc[ko + e]);
          sc[j] = t.softcap > 0 ? t.softcap * std::tanh(d * scale / t.softcap) : d * scale;
          m = std::max(m, sc[j]);
        }
        const float got_lse = lse_h[(qo[b] + qi) * Hq + h];
        if (std::isinf(m)) {  // sees nothing
          for (int e = 0; e < D; ++e) empty_ok = empty_ok && h_to(out_h[qrow + e]) == 0.f;
          empty_ok = empty_ok && std::isinf(got_lse) && got_lse < 0;
          continue;
        }
        double l = 0;
        std::vector<double> o(D, 0.0);
        for (int j = 0; j < n; ++j) {
          if (std::isinf(sc[j])) continue;
          const double p = std::exp(sc[j] - m);
          l += p;
          const std::size_t vo = ((static_cast<std::size_t>(bt[b * max_pages + j / ps]) * ps + j % ps) * Hkv + h / G) * D;
          for (int e = 0; e < D; ++e) o[e] += p * h_to(vc[vo + e]);
        }
        for (int e = 0; e < D; ++e) {
          const double x = std::fabs(o[e] / l - h_to(out_h[qrow + e]));
          err = std::max(err, std::isnan(x) ? INFINITY : x);
        }
        const double x = std::fabs(m + std::log(l) - got_lse);
        err = std::max(err, std::isnan(x) ? INFINITY : x);
      }
    }
  }
  char label[160];
  std::snprintf(label, sizeof(label), "%s (splits %d, row blocks %d)", name, a.num_splits, a.num_row_blocks);
  expect(err < 2e-2 && empty_ok, label, err);
}

}  // namespace

namespace {

void run_slot_and_decode_tests() {
  // Rerotate / compose. Comments: how the launcher cuts the rows (K items per thread per row, see
  // slot_plan in rotary.cuh) where a case is there for it.
  test_slot_kernels<__nv_bfloat16>(false, false, 1, 7, 16, 8, 128, 128, "rerotate bf16 neox d128 (K 4)");
  test_slot_kernels<__nv_bfloat16>(false, false, 1, 7, 16, 8, 128, 128, "rerotate bf16 neox d128 i32 slots", false);
  test_slot_kernels<__nv_bfloat16>(false, true, 1, 9, 16, 8, 128, 128, "rerotate bf16 interleaved d128");
  test_slot_kernels<__half>(false, true, 2, 5, 5, 3, 64, 64, "rerotate f16 interleaved stacked ps5 (K 1)");
  test_slot_kernels<float>(false, false, 1, 40, 1, 1, 64, 16, "rerotate f32 neox partial16 ps1");
  test_slot_kernels<__nv_bfloat16>(false, false, 1, 9, 3, 2, 64, 24, "rerotate bf16 neox partial24 (vec 4)");
  test_slot_kernels<__nv_bfloat16>(false, false, 1, 11, 7, 2, 128, 128, "rerotate bf16 neox 2 heads ps7 (K 2)");
  test_slot_kernels<float>(false, true, 3, 4, 16, 2, 256, 256, "rerotate f32 interleaved d256 stacked");
  test_slot_kernels<__nv_bfloat16>(false, false, 2, 6, 16, 8, 256, 256, "rerotate bf16 d256 stacked i32", false);
  test_slot_kernels<__nv_bfloat16>(false, false, 1, 8, 16, 8, 64, 64, "rerotate bf16 neox d64");
  test_slot_kernels<__nv_bfloat16>(false, false, 1, 9, 3, 5, 72, 72, "rerotate bf16 neox d72 (vec 4) 5 heads");
  test_slot_kernels<__half>(false, true, 1, 9, 5, 4, 36, 36, "rerotate f16 interleaved d36 (vec 4)");
  test_slot_kernels<__half>(false, false, 1, 9, 5, 4, 36, 36, "rerotate f16 neox d36 (vec 2)");
  test_slot_kernels<__half>(false, false, 1, 6, 3, 3, 33, 16, "rerotate f16 neox d33 partial16 (vec 1)");
  test_slot_kernels<__nv_bfloat16>(false, false, 1, 3, 4, 72, 128, 128, "rerotate bf16 72 heads");
  test_slot_kernels<__half>(true, false, 1, 9, 16, 2, 128, 64, "compose f16 neox partial64");
  test_slot_kernels<__nv_bfloat16>(true, false, 1, 7, 16, 8, 128, 128, "compose bf16 neox d128 (K 4)");
  test_slot_kernels<__nv_bfloat16>(true, false, 2, 7, 16, 8, 128, 128, "compose bf16 neox stacked i32 slots", false);
  test_slot_kernels<__nv_bfloat16>(true, true, 2, 6, 5, 3, 64, 64, "compose bf16 interleaved stacked ps5");
  test_slot_kernels<float>(true, false, 1, 30, 1, 1, 64, 64, "compose f32 neox ps1");
  test_slot_kernels<__nv_bfloat16>(true, false, 1, 9, 3, 4, 72, 48, "compose bf16 neox d72 partial48 (1-vec copies)");
  test_slot_kernels<__half>(true, true, 1, 9, 7, 2, 36, 20, "compose f16 interleaved d36 partial20 (vec 4)");
  test_slot_kernels<float>(true, false, 1, 8, 3, 2, 33, 20, "compose f32 neox d33 partial20 (vec 1)");
  test_slot_kernels<__nv_bfloat16>(true, false, 1, 4, 4, 72, 128, 64, "compose bf16 72 heads (several passes)");
  test_merge_states();
  using BF = __nv_bfloat16;
  // {D, Hq, Hkv, q_len, page, block_q (0: next pow2 of q_len), block_k, splits hint, lens, empty_last}
  test_decode<BF>({128, 32, 8, 1, 16, 0, 64, 1, {301, 150}, false}, "decode bf16 d128 gqa4 q1");
  test_decode<BF>({128, 32, 8, 1, 16, 0, 64, 2048, {301, 150}, false}, "decode bf16 d128 gqa4 q1 split");
  test_decode<BF>({128, 8, 2, 1, 16, 0, 64, 8, {2048, 1000, 77}, false}, "decode bf16 d128 gqa4 long, few splits");
  test_decode<__half>({128, 32, 8, 1, 16, 0, 64, 2048, {301, 150}, false}, "decode f16 d128 gqa4 q1 split");
  test_decode<__half>({64, 6, 2, 3, 5, 0, 64, 2048, {301, 150}, false}, "decode f16 d64 gqa3 q3 ps5 split");
  test_decode<BF>({256, 4, 1, 8, 16, 0, 64, 64, {301, 150}, false}, "decode bf16 d256 mqa4 q8 (2 row blocks)");
  test_decode<__half>({256, 4, 2, 4, 3, 0, 64, 256, {301, 150, 40}, false}, "decode f16 d256 gqa2 q4 ps3");
  test_decode<BF>({64, 3, 3, 1, 1, 0, 64, 64, {301, 150}, false}, "decode bf16 d64 mha q1 ps1");
  test_decode<__half>({128, 16, 2, 2, 1, 0, 64, 512, {301, 150}, false}, "decode f16 d128 gqa8 q2 ps1 (16 rows)");
  test_decode<BF>({128, 16, 1, 1, 7, 0, 64, 512, {301, 150}, false}, "decode bf16 d128 gqa16 q1 ps7");
  test_decode<BF>({128, 16, 2, 8, 16, 0, 64, 512, {301, 150, 17}, false}, "decode bf16 d128 gqa8 q8 (4 row blocks)");
  test_decode<__half>({64, 8, 2, 8, 16, 4, 64, 64, {301, 150}, false}, "decode f16 d64 gqa4 q8 block_q 4");
  test_decode<BF>({64, 4, 1, 1, 16, 0, 32, 64, {301, 150}, false}, "decode bf16 d64 block_k 32");
  test_decode<BF>({128, 8, 2, 2, 16, 0, 128, 64, {301, 150}, false}, "decode bf16 d128 block_k 128 (2 chunks)");
  test_decode<__half>({128, 8, 2, 3, 5, 0, 64, 64, {1500, 301, 150}, false}, "decode f16 d128 gqa4 q3 ps5 split");
  test_decode<BF>({128, 4, 4, 1, 4, 0, 64, 1, {3000, 33}, false}, "decode bf16 d128 mha ps4 long, no split");
  test_decode<__half>({128, 32, 8, 1, 16, 0, 64, 2048, {301, 150}, true}, "decode f16 d128 query sees nothing");
  test_decode<BF>({128, 8, 2, 1, 16, 0, 64, 1, {301, 150}, true}, "decode bf16 d128 sees nothing, no split");
  test_decode<BF>({128, 32, 8, 1, 16, 0, 64, 64, {301, 150}, false, 70}, "decode bf16 d128 window 70");
  test_decode<__half>({64, 8, 2, 3, 5, 0, 64, 512, {1500, 301}, false, 129}, "decode f16 d64 q3 ps5 window 129");
  test_decode<BF>({256, 4, 1, 2, 16, 0, 64, 64, {301, 150}, false, 0, 2.f}, "decode bf16 d256 softcap 2");
  test_decode<__half>({128, 8, 2, 1, 16, 0, 64, 2048, {301, 150}, false, 33, 50.f},
                      "decode f16 d128 window 33 softcap 50 split");
}

void run_prefill_tests() {
  using BF = __nv_bfloat16;
  int dev = 0, major = 0;
  CK(cudaGetDevice(&dev));
  CK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  if (major == 9) {
    // Hopper prefill: {D, Hq, Hkv, q_len, page, block_q, block_k (PrefillConfig<D>::kBlockK), -, lens, empty_last,
    // window, softcap, sm90}; sequences longer than q_len are chunked prefills (their last q_len tokens)
    test_decode<BF>({128, 8, 2, 150, 16, 32, 128, 1, {301, 150}, false, 0, 0.f, true}, "prefill sm90 bf16 d128 gqa4");
    test_decode<__half>({128, 2, 2, 300, 1, 128, 128, 1, {300, 333}, false, 0, 0.f, true}, "prefill sm90 f16 d128 mha ps1");
    test_decode<BF>({64, 6, 2, 200, 5, 42, 128, 1, {257, 200}, false, 0, 0.f, true}, "prefill sm90 bf16 d64 gqa3 ps5");
    test_decode<__half>({256, 4, 2, 130, 16, 64, 64, 1, {301, 130}, false, 0, 0.f, true}, "prefill sm90 f16 d256 gqa2");
    test_decode<BF>({128, 16, 2, 200, 16, 32, 128, 1, {420, 200, 233}, false, 0, 0.f, true},
                    "prefill sm90 bf16 d128 gqa8 (2 row blocks)");
    test_decode<BF>({128, 16, 1, 100, 7, 8, 128, 1, {230, 100}, false, 0, 0.f, true}, "prefill sm90 bf16 d128 gqa16 ps7");
    test_decode<BF>({128, 32, 1, 64, 16, 4, 128, 1, {129, 64}, false, 0, 0.f, true}, "prefill sm90 bf16 d128 gqa32");
    test_decode<BF>({128, 8, 2, 180, 16, 32, 128, 1, {301, 180}, false, 70, 0.f, true}, "prefill sm90 bf16 window 70");
    test_decode<__half>({64, 8, 2, 150, 16, 32, 128, 1, {301, 150}, false, 0, 30.f, true}, "prefill sm90 f16 d64 softcap");
    test_decode<BF>({256, 4, 1, 100, 16, 32, 64, 1, {301, 100}, false, 45, 20.f, true},
                    "prefill sm90 bf16 d256 window softcap");
    test_decode<BF>({128, 8, 2, 150, 16, 32, 128, 1, {301, 150}, true, 0, 0.f, true}, "prefill sm90 sees nothing");
    test_decode<BF>({128, 8, 8, 333, 256, 128, 128, 1, {700, 333}, false, 0, 0.f, true}, "prefill sm90 bf16 mha ps256");
    test_decode<__half>({64, 4, 1, 17, 3, 32, 128, 1, {17, 40, 500}, false, 0, 0.f, true},
                        "prefill sm90 f16 d64 mqa4 q17 ps3");
    // TMA boxes of other page sizes: 16 / 4 / 2 / 1 lanes per tile, a page size that nests only with
    // the 64-key tile of head_dim 256 (192 = 3 x 64), and groups whose 128 // G rows leave a remainder
    test_decode<BF>({128, 8, 2, 300, 8, 32, 128, 1, {555, 300}, false, 0, 0.f, true}, "prefill sm90 bf16 ps8");
    test_decode<BF>({128, 8, 2, 300, 32, 32, 128, 1, {555, 300}, false, 0, 0.f, true}, "prefill sm90 bf16 ps32");
    test_decode<__half>({128, 8, 2, 300, 64, 32, 128, 1, {555, 300}, false, 0, 0.f, true}, "prefill sm90 f16 ps64");
    test_decode<BF>({128, 8, 2, 300, 128, 32, 128, 1, {555, 300}, false, 0, 0.f, true}, "prefill sm90 bf16 ps128");
    test_decode<BF>({256, 4, 2, 300, 192, 64, 64, 1, {700, 300}, false, 0, 0.f, true}, "prefill sm90 bf16 d256 ps192");
    test_decode<BF>({128, 18, 2, 150, 16, 14, 128, 1, {301, 150}, false, 0, 0.f, true}, "prefill sm90 bf16 gqa9");
    test_decode<BF>({64, 40, 2, 100, 16, 16, 128, 1, {301, 100}, false, 0, 0.f, true}, "prefill sm90 bf16 gqa20");
  } else {
    std::printf("prefill sm90: skipped (compute capability %d, needs 9)\n", major);
  }
}

}  // namespace

int main(int argc, char** argv) {
  // `test_kernels prefill`: the Hopper prefill cases alone (for compute-sanitizer)
  const bool prefill_only = argc > 1 && std::strcmp(argv[1], "prefill") == 0;
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;  // ctest SKIP_RETURN_CODE
  }
  if (!prefill_only) run_slot_and_decode_tests();
  run_prefill_tests();
  std::printf("%d failure(s)\n", failures);
  return failures ? 1 : 0;
}
