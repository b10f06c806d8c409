#include "real_backend/cpu/reference.hpp"

#include "common/error.hpp"
#include "real_backend/cpu/kernels.hpp"

#include <cmath>
#include <cstddef>
#include <fmt/format.h>

namespace mop::real {

namespace {

std::size_t to_size(std::int64_t v) {
  return static_cast<std::size_t>(v);
}

void validate(const TinyConfig& c, const std::vector<ParamInfo>& layout, std::size_t nparams,
              const Batch& b) {
  if (c.hidden <= 0 || c.vocab <= 0 || c.heads <= 0 || c.kv_heads <= 0 || c.head_dim <= 0)
    throw InputError(fmt::format("model '{}' has a non-positive size (hidden {}, vocab {}, "
                                 "heads {}, KV heads {}, head dim {})",
                                 c.name, c.hidden, c.vocab, c.heads, c.kv_heads, c.head_dim));
  if (c.heads % c.kv_heads != 0)
    throw InputError(fmt::format("model '{}': {} attention heads do not divide into {} KV heads",
                                 c.name, c.heads, c.kv_heads));
  if (c.head_dim % 2 != 0)
    throw InputError(
        fmt::format("model '{}': RoPE needs an even head dim, not {}", c.name, c.head_dim));
  for (const auto& l : c.layers)
    if (l.moe && (c.experts <= 0 || c.top_k <= 0 || c.top_k > c.experts || c.expert_ffn <= 0))
      throw InputError(fmt::format("model '{}': an MoE layer needs 1 <= top-k <= experts and a "
                                   "positive expert size (experts {}, top-k {}, expert size {})",
                                   c.name, c.experts, c.top_k, c.expert_ffn));
  if (nparams != layout.size())
    throw InputError(fmt::format("model '{}' has {} parameter tensors; {} were given", c.name,
                                 layout.size(), nparams));
  if (b.sequences <= 0 || b.seq_len <= 0)
    throw InputError(fmt::format("a batch needs at least one sequence of at least one token, not "
                                 "{} sequences of {}",
                                 b.sequences, b.seq_len));
  const std::size_t n = to_size(b.sequences) * to_size(b.seq_len);
  if (b.tokens.size() != n || b.labels.size() != n)
    throw InputError(fmt::format("a batch of {} sequences of {} tokens needs {} tokens and labels; "
                                 "it has {} tokens and {} labels",
                                 b.sequences, b.seq_len, n, b.tokens.size(), b.labels.size()));
  bool labelled = false;
  for (std::size_t i = 0; i < n; ++i) {
    if (b.tokens[i] < 0 || b.tokens[i] >= c.vocab)
      throw InputError(fmt::format("token {} of the batch is {}, outside the vocabulary of {}", i,
                                   b.tokens[i], c.vocab));
    if (b.labels[i] >= c.vocab)
      throw InputError(fmt::format("label {} of the batch is {}, outside the vocabulary of {}", i,
                                   b.labels[i], c.vocab));
    labelled = labelled || b.labels[i] >= 0;
  }
  if (!labelled)
    throw InputError("the batch has no labelled token, so its mean loss is undefined");
}

// What the forward pass keeps for the backward pass of one decoder layer.
template <class T> struct Expert {
  std::vector<std::int32_t> tokens;     // routed tokens, increasing
  std::vector<std::int32_t> slots;      // their (token * top_k + choice) entries
  std::vector<T> x, gate, up, act, out; // gathered input, projections, SwiGLU, unscaled output
};
template <class T> struct LayerActs {
  std::vector<T> x_in, rstd1, xn1;
  std::vector<T> q_pre, k_pre, q_rstd, k_rstd; // projections before the q/k norms
  std::vector<T> q, k, v;                      // attention inputs (after q/k norm and RoPE)
  std::vector<T> attn, lse;
  std::vector<T> h, rstd2, xn2;
  std::vector<T> gate, up, act; // dense MLP
  std::vector<T> router_probs, route_w;
  std::vector<std::int32_t> route_idx;
  std::vector<Expert<T>> experts;
};

} // namespace

template <class T>
double reference_step(const TinyConfig& c, const std::vector<std::vector<T>>& params,
                      const Batch& batch, std::vector<std::vector<T>>* grads) {
  const auto layout = param_layout(c);
  validate(c, layout, params.size(), batch);
  for (std::size_t p = 0; p < layout.size(); ++p)
    if (params[p].size() != to_size(layout[p].numel()))
      throw InputError(fmt::format("parameter '{}' of model '{}' needs {} values; {} were given",
                                   layout[p].name, c.name, layout[p].numel(), params[p].size()));

  const int N = batch.sequences * batch.seq_len, S = batch.seq_len, H = c.hidden, V = c.vocab;
  const int D = c.head_dim, NH = c.heads, KH = c.kv_heads, QD = NH * D, KD = KH * D;
  const int K = c.top_k, E = c.experts;
  const std::size_t n = to_size(N);
  const auto P = [&](ParamRole r, int l) -> const T* {
    return params[to_size(find_param(layout, r, l))].data();
  };
  const auto G = [&](ParamRole r, int l) -> T* {
    return (*grads)[to_size(find_param(layout, r, l))].data();
  };

  std::vector<std::int64_t> pos(n);
  for (std::size_t t = 0; t < n; ++t)
    pos[t] = static_cast<std::int64_t>(t % to_size(S));
  AttentionParams ap;
  ap.heads = NH;
  ap.kv_heads = KH;
  ap.qk_dim = D;
  ap.v_dim = D;
  ap.causal = true;
  ap.scale = 1.0 / std::sqrt(static_cast<double>(D));

  // ---- forward ----
  std::vector<T> x(n * H);
  const T* emb = P(ParamRole::embedding, -1);
  for (std::size_t t = 0; t < n; ++t)
    for (int j = 0; j < H; ++j)
      x[t * H + j] = emb[to_size(batch.tokens[t]) * H + j];

  std::vector<LayerActs<T>> acts(to_size(c.num_layers()));
  for (int l = 0; l < c.num_layers(); ++l) {
    auto& a = acts[to_size(l)];
    a.x_in = x;
    a.rstd1.resize(n);
    a.xn1.resize(n * H);
    rmsnorm_fwd(N, H, x.data(), P(ParamRole::attn_norm, l), c.norm_eps, a.xn1.data(),
                a.rstd1.data());
    a.q_pre.resize(n * QD);
    a.k_pre.resize(n * KD);
    a.v.resize(n * KD);
    gemm(N, QD, H, a.xn1.data(), false, P(ParamRole::wq, l), false, a.q_pre.data(), false);
    gemm(N, KD, H, a.xn1.data(), false, P(ParamRole::wk, l), false, a.k_pre.data(), false);
    gemm(N, KD, H, a.xn1.data(), false, P(ParamRole::wv, l), false, a.v.data(), false);
    if (c.qk_norm) { // per-head RMSNorm before RoPE, as Qwen3 does
      a.q.resize(n * QD);
      a.k.resize(n * KD);
      a.q_rstd.resize(n * NH);
      a.k_rstd.resize(n * KH);
      rmsnorm_fwd(N * NH, D, a.q_pre.data(), P(ParamRole::q_norm, l), c.norm_eps, a.q.data(),
                  a.q_rstd.data());
      rmsnorm_fwd(N * KH, D, a.k_pre.data(), P(ParamRole::k_norm, l), c.norm_eps, a.k.data(),
                  a.k_rstd.data());
    } else {
      a.q = a.q_pre;
      a.k = a.k_pre;
    }
    rope(N, NH, D, pos.data(), c.rope_theta, a.q.data(), false);
    rope(N, KH, D, pos.data(), c.rope_theta, a.k.data(), false);
    a.attn.resize(n * QD);
    a.lse.resize(n * NH);
    ap.window = c.layers[to_size(l)].window;
    for (int s = 0; s < batch.sequences; ++s) {
      const std::size_t t0 = to_size(s) * S;
      attention_fwd(ap, S, S, a.q.data() + t0 * QD, a.k.data() + t0 * KD, a.v.data() + t0 * KD,
                    pos.data() + t0, pos.data() + t0, a.attn.data() + t0 * QD,
                    a.lse.data() + t0 * NH);
    }
    a.h = x;
    gemm(N, H, QD, a.attn.data(), false, P(ParamRole::wo, l), false, a.h.data(), true);

    a.rstd2.resize(n);
    a.xn2.resize(n * H);
    rmsnorm_fwd(N, H, a.h.data(), P(ParamRole::mlp_norm, l), c.norm_eps, a.xn2.data(),
                a.rstd2.data());
    x = a.h;
    if (!c.layers[to_size(l)].moe) {
      const int F = c.dense_ffn;
      a.gate.resize(n * F);
      a.up.resize(n * F);
      a.act.resize(n * F);
      gemm(N, F, H, a.xn2.data(), false, P(ParamRole::dense_gate, l), false, a.gate.data(), false);
      gemm(N, F, H, a.xn2.data(), false, P(ParamRole::dense_up, l), false, a.up.data(), false);
      swiglu_fwd(n * F, a.gate.data(), a.up.data(), a.act.data());
      gemm(N, H, F, a.act.data(), false, P(ParamRole::dense_down, l), false, x.data(), true);
    } else {
      const int F = c.expert_ffn;
      std::vector<T> logits(n * E);
      gemm(N, E, H, a.xn2.data(), false, P(ParamRole::router, l), false, logits.data(), false);
      a.router_probs.resize(n * E);
      a.route_idx.resize(n * K);
      a.route_w.resize(n * K);
      router_topk_fwd(N, E, K, c.normalize_top_k, logits.data(), a.router_probs.data(),
                      a.route_idx.data(), a.route_w.data());
      a.experts.resize(to_size(E));
      std::vector<T> scaled;
      for (int e = 0; e < E; ++e) {
        auto& ex = a.experts[to_size(e)];
        for (int t = 0; t < N; ++t)
          for (int s = 0; s < K; ++s)
            if (a.route_idx[to_size(t) * K + s] == e) {
              ex.tokens.push_back(t);
              ex.slots.push_back(t * K + s);
            }
        const int ne = static_cast<int>(ex.tokens.size());
        if (ne == 0)
          continue;
        const std::size_t off_in =
            to_size(e) * H * F; // [experts, hidden, ffn] and [experts, ffn, hidden]
        ex.x.resize(to_size(ne) * H);
        ex.gate.resize(to_size(ne) * F);
        ex.up.resize(to_size(ne) * F);
        ex.act.resize(to_size(ne) * F);
        ex.out.resize(to_size(ne) * H);
        gather_rows(ne, H, a.xn2.data(), ex.tokens.data(), ex.x.data());
        gemm(ne, F, H, ex.x.data(), false, P(ParamRole::expert_gate, l) + off_in, false,
             ex.gate.data(), false);
        gemm(ne, F, H, ex.x.data(), false, P(ParamRole::expert_up, l) + off_in, false, ex.up.data(),
             false);
        swiglu_fwd(to_size(ne) * F, ex.gate.data(), ex.up.data(), ex.act.data());
        gemm(ne, H, F, ex.act.data(), false, P(ParamRole::expert_down, l) + off_in, false,
             ex.out.data(), false);
        scaled = ex.out;
        for (int r = 0; r < ne; ++r)
          for (int j = 0; j < H; ++j)
            scaled[to_size(r) * H + j] *= a.route_w[to_size(ex.slots[to_size(r)])];
        scatter_add_rows(ne, H, scaled.data(), ex.tokens.data(), x.data());
      }
    }
  }

  std::vector<T> final_rstd(n), xf(n * H);
  rmsnorm_fwd(N, H, x.data(), P(ParamRole::final_norm, -1), c.norm_eps, xf.data(),
              final_rstd.data());
  std::vector<T> logits(n * V);
  if (c.tied_embeddings)
    gemm(N, V, H, xf.data(), false, emb, true, logits.data(), false);
  else
    gemm(N, V, H, xf.data(), false, P(ParamRole::lm_head, -1), false, logits.data(), false);
  int labelled = 0;
  for (auto lab : batch.labels)
    labelled += lab >= 0 ? 1 : 0;
  const double inv = 1.0 / labelled;
  std::vector<T> dlogits(grads ? n * V : 0);
  const double loss = cross_entropy(N, V, logits.data(), batch.labels.data(), inv,
                                    grads ? dlogits.data() : nullptr) *
                      inv;
  if (!grads)
    return loss;

  // ---- backward ----
  grads->assign(layout.size(), {});
  for (std::size_t p = 0; p < layout.size(); ++p)
    (*grads)[p].assign(to_size(layout[p].numel()), T(0));
  T* demb = G(ParamRole::embedding, -1);

  std::vector<T> dxf(n * H);
  if (c.tied_embeddings) {
    // logits = xf · emb^T: dxf = dlogits · emb, demb += dlogits^T · xf.
    gemm(N, H, V, dlogits.data(), false, emb, false, dxf.data(), false);
    gemm(V, H, N, dlogits.data(), true, xf.data(), false, demb, true);
  } else {
    gemm(N, H, V, dlogits.data(), false, P(ParamRole::lm_head, -1), true, dxf.data(), false);
    gemm(H, V, N, xf.data(), true, dlogits.data(), false, G(ParamRole::lm_head, -1), true);
  }
  std::vector<T> dx(n * H);
  rmsnorm_bwd(N, H, x.data(), P(ParamRole::final_norm, -1), final_rstd.data(), dxf.data(),
              dx.data(), G(ParamRole::final_norm, -1));

  std::vector<T> dbranch(n * H), dxn(n * H);
  for (int l = c.num_layers() - 1; l >= 0; --l) {
    auto& a = acts[to_size(l)];
    // x_out = h + mlp(norm(h)): dh = dx_out + norm_bwd(mlp_bwd(dx_out)).
    for (auto& d : dxn)
      d = 0;
    if (!c.layers[to_size(l)].moe) {
      const int F = c.dense_ffn;
      std::vector<T> dact(n * F), dgate(n * F), dup(n * F);
      gemm(N, F, H, dx.data(), false, P(ParamRole::dense_down, l), true, dact.data(), false);
      gemm(F, H, N, a.act.data(), true, dx.data(), false, G(ParamRole::dense_down, l), true);
      swiglu_bwd(n * F, a.gate.data(), a.up.data(), dact.data(), dgate.data(), dup.data());
      gemm(N, H, F, dgate.data(), false, P(ParamRole::dense_gate, l), true, dxn.data(), false);
      gemm(N, H, F, dup.data(), false, P(ParamRole::dense_up, l), true, dxn.data(), true);
      gemm(H, F, N, a.xn2.data(), true, dgate.data(), false, G(ParamRole::dense_gate, l), true);
      gemm(H, F, N, a.xn2.data(), true, dup.data(), false, G(ParamRole::dense_up, l), true);
    } else {
      const int F = c.expert_ffn;
      std::vector<T> dw(n * K, T(0));
      std::vector<T> dy, dact, dgate, dup, dxe;
      for (int e = 0; e < E; ++e) {
        const auto& ex = a.experts[to_size(e)];
        const int ne = static_cast<int>(ex.tokens.size());
        if (ne == 0)
          continue;
        const std::size_t off = to_size(e) * H * F;
        dy.resize(to_size(ne) * H);
        gather_rows(ne, H, dx.data(), ex.tokens.data(), dy.data());
        for (int r = 0; r < ne; ++r) {
          // y_t += w * out: dw = dy_t · out, d out = w dy_t.
          const std::size_t slot = to_size(ex.slots[to_size(r)]);
          T s = 0;
          for (int j = 0; j < H; ++j)
            s += dy[to_size(r) * H + j] * ex.out[to_size(r) * H + j];
          dw[slot] = s;
          for (int j = 0; j < H; ++j)
            dy[to_size(r) * H + j] *= a.route_w[slot];
        }
        dact.resize(to_size(ne) * F);
        dgate.resize(to_size(ne) * F);
        dup.resize(to_size(ne) * F);
        dxe.resize(to_size(ne) * H);
        gemm(ne, F, H, dy.data(), false, P(ParamRole::expert_down, l) + off, true, dact.data(),
             false);
        gemm(F, H, ne, ex.act.data(), true, dy.data(), false, G(ParamRole::expert_down, l) + off,
             true);
        swiglu_bwd(to_size(ne) * F, ex.gate.data(), ex.up.data(), dact.data(), dgate.data(),
                   dup.data());
        gemm(ne, H, F, dgate.data(), false, P(ParamRole::expert_gate, l) + off, true, dxe.data(),
             false);
        gemm(ne, H, F, dup.data(), false, P(ParamRole::expert_up, l) + off, true, dxe.data(), true);
        gemm(H, F, ne, ex.x.data(), true, dgate.data(), false, G(ParamRole::expert_gate, l) + off,
             true);
        gemm(H, F, ne, ex.x.data(), true, dup.data(), false, G(ParamRole::expert_up, l) + off,
             true);
        scatter_add_rows(ne, H, dxe.data(), ex.tokens.data(), dxn.data());
      }
      std::vector<T> dlogits_r(n * E);
      router_topk_bwd(N, E, K, c.normalize_top_k, a.router_probs.data(), a.route_idx.data(),
                      dw.data(), dlogits_r.data());
      gemm(H, E, N, a.xn2.data(), true, dlogits_r.data(), false, G(ParamRole::router, l), true);
      gemm(N, H, E, dlogits_r.data(), false, P(ParamRole::router, l), true, dxn.data(), true);
    }
    rmsnorm_bwd(N, H, a.h.data(), P(ParamRole::mlp_norm, l), a.rstd2.data(), dxn.data(),
                dbranch.data(), G(ParamRole::mlp_norm, l));
    for (std::size_t i = 0; i < n * H; ++i)
      dx[i] += dbranch[i]; // dx now holds dh

    // h = x_in + attn(norm(x_in)) · wo.
    std::vector<T> dattn(n * QD), dq(n * QD, T(0)), dk(n * KD, T(0)), dv(n * KD, T(0));
    gemm(N, QD, H, dx.data(), false, P(ParamRole::wo, l), true, dattn.data(), false);
    gemm(QD, H, N, a.attn.data(), true, dx.data(), false, G(ParamRole::wo, l), true);
    ap.window = c.layers[to_size(l)].window;
    for (int s = 0; s < batch.sequences; ++s) {
      const std::size_t t0 = to_size(s) * S;
      attention_bwd(ap, S, S, a.q.data() + t0 * QD, a.k.data() + t0 * KD, a.v.data() + t0 * KD,
                    pos.data() + t0, pos.data() + t0, a.attn.data() + t0 * QD,
                    a.lse.data() + t0 * NH, dattn.data() + t0 * QD, dq.data() + t0 * QD,
                    dk.data() + t0 * KD, dv.data() + t0 * KD);
    }
    rope(N, NH, D, pos.data(), c.rope_theta, dq.data(), true);
    rope(N, KH, D, pos.data(), c.rope_theta, dk.data(), true);
    if (c.qk_norm) {
      std::vector<T> dq_pre(n * QD), dk_pre(n * KD);
      rmsnorm_bwd(N * NH, D, a.q_pre.data(), P(ParamRole::q_norm, l), a.q_rstd.data(), dq.data(),
                  dq_pre.data(), G(ParamRole::q_norm, l));
      rmsnorm_bwd(N * KH, D, a.k_pre.data(), P(ParamRole::k_norm, l), a.k_rstd.data(), dk.data(),
                  dk_pre.data(), G(ParamRole::k_norm, l));
      dq.swap(dq_pre);
      dk.swap(dk_pre);
    }
    gemm(N, H, QD, dq.data(), false, P(ParamRole::wq, l), true, dxn.data(), false);
    gemm(N, H, KD, dk.data(), false, P(ParamRole::wk, l), true, dxn.data(), true);
    gemm(N, H, KD, dv.data(), false, P(ParamRole::wv, l), true, dxn.data(), true);
    gemm(H, QD, N, a.xn1.data(), true, dq.data(), false, G(ParamRole::wq, l), true);
    gemm(H, KD, N, a.xn1.data(), true, dk.data(), false, G(ParamRole::wk, l), true);
    gemm(H, KD, N, a.xn1.data(), true, dv.data(), false, G(ParamRole::wv, l), true);
    rmsnorm_bwd(N, H, a.x_in.data(), P(ParamRole::attn_norm, l), a.rstd1.data(), dxn.data(),
                dbranch.data(), G(ParamRole::attn_norm, l));
    for (std::size_t i = 0; i < n * H; ++i)
      dx[i] += dbranch[i]; // dx now holds dx_in
  }
  for (std::size_t t = 0; t < n; ++t)
    for (int j = 0; j < H; ++j)
      demb[to_size(batch.tokens[t]) * H + j] += dx[t * H + j];
  return loss;
}

template double reference_step<float>(const TinyConfig&, const std::vector<std::vector<float>>&,
                                      const Batch&, std::vector<std::vector<float>>*);
template double reference_step<double>(const TinyConfig&, const std::vector<std::vector<double>>&,
                                       const Batch&, std::vector<std::vector<double>>*);

} // namespace mop::real
