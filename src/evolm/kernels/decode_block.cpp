// One residual block's step over the new tokens (a decode step's one token per sequence, or a prompt's
// tokens written into an empty or plain KV cache) as a single call from Python.
//
// Why: an eager decode step of a small model is mostly interpreter time, not arithmetic. SmolLM2-135M
// on one AVX-512 core spends ~13 ms of a ~30 ms token in its 121 quantized matrix-vector products and
// the rest in ~900 Python-level module calls and ATen dispatches (profiled). torch.compile removes
// that overhead but costs tens of seconds at every start; llama.cpp has none because its graph is C.
// Here a block's step -- norms, projections, rotary embedding, the KV-cache write, attention, MLP,
// residuals -- runs as one C++ function over tensors gathered once (``BlockPlan``), so a token costs
// one Python call per block.
//
// The arithmetic is the eager model's, op for op (evolm/nn/block.py, attention.py, mlp.py, norm.py,
// rope.py): the same ATen ops in the same order and dtypes (in float32: the same formulas as plain
// loops, below), the GGUF block products through the same kernel (blocks_linear), dense weights
// through at::linear. Only attention differs in summation order: it is evolm_f::decode_attention
// (decode_attention.cpp), the kernel the compiled CPU step uses; a server's cache rows are read in
// place (decode_attention_rows).
// What is not expressed here (MoE, MLA, LoRA, int4/int8 re-quantized linears) keeps the Python path:
// evolm/infer/block_step.py builds a plan only for blocks this file covers.
//
// A prompt (T > 1 tokens) takes the same call: its products are the Python layer's (the same kernels
// for the same number of rows), its attention the same at::scaled_dot_product_attention call with the
// same mask and causality over the same cache view, and in float32 its norms, rotary embedding and
// cache writes are the loops below, spread over the rows. Why: at 256 tokens a SmolLM2 block spent
// ~1.3 ms of ~10.6 in ~45 small ATen ops around its products (norms: 7 each, rotary embedding: 16,
// the split, the cache copies; profiled), more than transformers' prompt gained from our fused
// products.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <string>
#include <vector>

at::Tensor blocks_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                         const std::optional<at::Tensor>& min, int64_t group);               // block_gemm.cpp
at::Tensor blocks_dense_linear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                               const std::optional<at::Tensor>& min, int64_t group);          // block_gemm.cpp
at::Tensor blocks_gemm(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                       const std::optional<at::Tensor>& min, int64_t group);                  // block_gemm.cpp
at::Tensor decode_attention_rows(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const std::optional<at::Tensor>& mask, double scale, std::optional<double> softcap,
                                 const int64_t* rows);                                         // decode_attention.cpp

namespace {

using OptT = std::optional<at::Tensor>;

// a linear layer as block_step.py hands it over: kind 0 dense (weight, bias), 1 GGUF blocks
// (codes, scale, min, bias, group); kind -1 absent
struct Linear {
  // up to `rows` activation rows use blocks_linear, up to `gemm_rows` float32 rows blocks_gemm
  // (evolm.quant.blocks.BlockLinear's choice, so a row's numbers are the Python layer's)
  int64_t kind = -1, group = 0, rows = 0, gemm_rows = 0;
  at::Tensor w, scale;
  OptT min, bias;

  at::Tensor operator()(const at::Tensor& x) const {  // x (M, K) -> (M, N), as the Python layer computes it
    if (kind == 0) return bias.has_value() ? at::linear(x, w, *bias) : at::linear(x, w);
    const int64_t M = x.size(0);
    at::Tensor y = M <= rows ? blocks_linear(x, w, scale, min, group)
                 : M <= gemm_rows && x.scalar_type() == at::kFloat ? blocks_gemm(x, w, scale, min, group)
                 : blocks_dense_linear(x, w, scale, min, group);
    if (bias.has_value()) y = y + bias->to(y.scalar_type());
    return y;
  }
  bool present() const { return kind >= 0; }
};

// a norm: kind 0 RMSNorm (unit_offset: Gemma's (1 + w), precomputed), 1 LayerNorm; -1 absent
struct Norm {
  int64_t kind = -1;
  bool unit_offset = false;
  double eps = 1e-6;
  at::Tensor w;
  OptT b;

  at::Tensor operator()(const at::Tensor& x) const {
    if (kind == 1) return at::layer_norm(x, {w.size(0)}, w, b, eps);
    const auto dtype = x.scalar_type();
    at::Tensor xf = x.to(at::kFloat);
    xf = xf * at::rsqrt(xf.pow(2).mean(-1, true) + eps);
    if (unit_offset) return (xf * w).to(dtype);  // w already holds 1 + weight in float32
    return w * xf.to(dtype);
  }
};

enum Placement { PRE = 0, POST = 1, SANDWICH = 2, OLMO2 = 3, PARALLEL = 4, PARALLEL2 = 5 };
enum QKNorm { QK_NONE = 0, QK_HEAD = 1, QK_FULL = 2 };
enum Act { GELU = 0, GELU_TANH = 1, SILU = 2, RELU = 3 };

at::Tensor activation(const at::Tensor& x, int64_t act) {
  switch (act) {
    case GELU: return at::gelu(x);
    case GELU_TANH: return at::gelu(x, "tanh");
    case SILU: return at::silu(x);
    default: return at::relu(x);
  }
}

// rotate the first 2 * cos.size(-1) dims of x (B, H, T, D), as evolm.nn.rope.apply_rope does
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleave) {
  const int64_t rot = 2 * cos.size(-1), D = x.size(-1);
  at::Tensor xr = x.narrow(-1, 0, rot);
  at::Tensor x1, x2;
  if (interleave) {
    x1 = xr.slice(-1, 0, rot, 2);
    x2 = xr.slice(-1, 1, rot, 2);
  } else {
    x1 = xr.narrow(-1, 0, rot / 2);
    x2 = xr.narrow(-1, rot / 2, rot / 2);
  }
  at::Tensor out = at::cat({x1 * cos - x2 * sin, x2 * cos + x1 * sin}, -1);
  return rot < D ? at::cat({out, x.narrow(-1, rot, D - rot)}, -1) : out;
}

// ---- float32 without per-element ATen calls ----
// Why: after the projections went to one kernel call each, a SmolLM2 block step still spent ~40% of its
// time in ~40 small ATen calls (norm: 7, rotary embedding: 16, views, splits, cache copies), ~250 us of a
// ~650 us step on 2 cores (measured). In float32 these are short loops over one row; written here they
// compute the eager formulas (the same products and sums per element; a norm's sum of squares in 16
// partial sums, as a vectorized reduction does), and the ATen path above stays for other dtypes.

// y = w * (x * rsqrt(mean(x^2) + eps)), evolm.nn.norm.RMSNorm in float32; y may be x
inline void rms_norm_f32(const float* x, const float* w, float eps, int64_t n, float* y) {
  float part[16] = {0.f};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int j = 0; j < 16; ++j) part[j] += x[i + j] * x[i + j];
  float ss = 0.f;
  for (int j = 0; j < 16; ++j) ss += part[j];
  for (; i < n; ++i) ss += x[i] * x[i];
  const float r = 1.f / std::sqrt(ss / static_cast<float>(n) + eps);
  for (i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

// one head of D dims rotated as evolm.nn.rope.apply_rope (the first 2 * half dims; interleaved pairs
// come out de-interleaved, evens then odds, as there); y must not overlap x
inline void rope_head_f32(const float* x, const float* c, const float* s, int64_t half, int64_t D, bool interleave,
                          float* y) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = interleave ? x[2 * i] : x[i], x2 = interleave ? x[2 * i + 1] : x[half + i];
    y[i] = x1 * c[i] - x2 * s[i];
    y[half + i] = x2 * c[i] + x1 * s[i];
  }
  for (int64_t i = 2 * half; i < D; ++i) y[i] = x[i];
}

// y += x elementwise (a residual: x + y and y + x are the same float sums)
inline at::Tensor add_into(at::Tensor y, const at::Tensor& x) {
  float* yp = y.data_ptr<float>();
  const float* xp = x.data_ptr<float>();
  at::parallel_for(0, y.numel(), 1 << 15, [&](int64_t a, int64_t b) {
    for (int64_t i = a; i < b; ++i) yp[i] += xp[i];
  });
  return y;
}

}  // namespace

// The tensors and settings of one block, gathered once by evolm/infer/block_step.py.
struct BlockPlan {
  int64_t placement, qk_norm, act, n_heads, n_kv, head_dim;
  bool gated, interleave;
  double scale;
  std::optional<double> softcap;
  Norm attn_norm, mlp_norm, attn_out_norm, mlp_out_norm, q_norm, k_norm;
  Linear q, k, v, qkv, o, gate, up, gate_up, down;
  bool f32 = true;  // every norm an RMSNorm with float32 weights: the float32 loops can run it

  BlockPlan(std::vector<int64_t> ints, std::vector<double> floats, std::vector<OptT> t) {
    // ints: placement, qk_norm, act, gated, n_heads, n_kv, head_dim, interleave, has_softcap,
    //       then per norm (6): kind, unit_offset; then per linear (9): kind, group, rows, gemm_rows
    // floats: scale, softcap, then per norm (6): eps
    // t: per norm (6): weight, bias; then per linear (9): weight or codes, scale, min, bias
    TORCH_CHECK(ints.size() == 9 + 12 + 36 && floats.size() == 2 + 6 && t.size() == 12 + 36,
                "evolm BlockPlan: unexpected plan layout");
    placement = ints[0], qk_norm = ints[1], act = ints[2], gated = ints[3] != 0;
    n_heads = ints[4], n_kv = ints[5], head_dim = ints[6], interleave = ints[7] != 0;
    scale = floats[0];
    if (ints[8]) softcap = floats[1];
    Norm* norms[6] = {&attn_norm, &mlp_norm, &attn_out_norm, &mlp_out_norm, &q_norm, &k_norm};
    for (int i = 0; i < 6; ++i) {
      Norm& n = *norms[i];
      n.kind = ints[9 + 2 * i], n.unit_offset = ints[10 + 2 * i] != 0, n.eps = floats[2 + i];
      if (n.kind >= 0) n.w = *t[2 * i], n.b = t[2 * i + 1];
    }
    Linear* lins[9] = {&q, &k, &v, &qkv, &o, &gate, &up, &gate_up, &down};
    for (int i = 0; i < 9; ++i) {
      Linear& l = *lins[i];
      const size_t a = 21 + 4 * i, b = 12 + 4 * i;
      l.kind = ints[a], l.group = ints[a + 1], l.rows = ints[a + 2], l.gemm_rows = ints[a + 3];
      if (l.kind >= 0) l.w = *t[b], l.scale = t[b + 1].value_or(at::Tensor()), l.min = t[b + 2], l.bias = t[b + 3];
    }
    for (Norm* n : norms)
      if (n->kind >= 0) f32 = f32 && n->kind == 0 && n->w.scalar_type() == at::kFloat && n->w.is_contiguous();
  }

  // x (B, T, D); cos/sin (B or 1, 1, T, rot/2) or absent; mask bool or absent: (B or 1, 1, 1, S) for
  // one token, for T > 1 the prompt's (B or 1, 1, T, S) as the model made it (with `causal`, what
  // at::scaled_dot_product_attention is told). K, V (B, Hkv, S_buf, Dh): the cache buffers, token t
  // written at `slot + t` (one token: row b at `slots[b]`, the server's rows of different lengths;
  // with `rows`, row b of the batch is buffer row rows[b] and K, V may hold more rows), attended over
  // their first `attend` slots (-1: all of them, a sliding window's ring)
  at::Tensor step(const at::Tensor& x3, const OptT& cos, const OptT& sin, const OptT& mask, const at::Tensor& K,
                  const at::Tensor& V, int64_t slot, const OptT& slots, int64_t attend, const OptT& rows,
                  bool causal) const {
    const int64_t B = x3.size(0), T = x3.size(1), D = x3.size(2);
    TORCH_CHECK(T == 1 || (!slots.has_value() && !rows.has_value() && attend >= slot + T),
                "evolm BlockPlan: a prompt's tokens go to consecutive slots of every row and attend them");
    at::Tensor x = x3.reshape({B * T, D});
    const bool fast = takes_f32(x, cos, sin, K, V, T);
    const auto norm = [&](const Norm& n, const at::Tensor& t) { return fast ? norm_f32(n, t) : n(t); };
    const auto plus = [&](const at::Tensor& t, at::Tensor y) { return fast ? add_into(y, t) : t + y; };  // t + y
    const auto attn = [&](const at::Tensor& h) {
      return fast ? attention_f32(h, B, T, cos, sin, mask, K, V, slot, slots, attend, rows, causal)
                  : attention(h, B, T, cos, sin, mask, K, V, slot, slots, attend, rows, causal);
    };
    switch (placement) {
      case PRE: {
        x = plus(x, attn(norm(attn_norm, x)));
        return plus(x, mlp(norm(mlp_norm, x))).view({B, T, D});
      }
      case POST: {
        x = norm(attn_norm, plus(x, attn(x)));
        return norm(mlp_norm, plus(x, mlp(x))).view({B, T, D});
      }
      case SANDWICH: {
        x = plus(x, norm(attn_out_norm, attn(norm(attn_norm, x))));
        return plus(x, norm(mlp_out_norm, mlp(norm(mlp_norm, x)))).view({B, T, D});
      }
      case OLMO2: {
        x = plus(x, norm(attn_out_norm, attn(x)));
        return plus(x, norm(mlp_out_norm, mlp(x))).view({B, T, D});
      }
      case PARALLEL2: {  // Falcon-40B: attention and MLP in parallel, each with its own norm
        return plus(plus(x, attn(norm(attn_norm, x))), mlp(norm(mlp_norm, x))).view({B, T, D});
      }
      default: {  // parallel
        at::Tensor h = norm(attn_norm, x);
        return plus(plus(x, attn(h)), mlp(h)).view({B, T, D});
      }
    }
  }

 private:
  // the float32 loops take this step: float32 activations, rotary tables and cache buffers with
  // contiguous last dimensions, and norms they express
  bool takes_f32(const at::Tensor& x, const OptT& cos, const OptT& sin, const at::Tensor& K, const at::Tensor& V,
                 int64_t T) const {
    if (!f32 || x.scalar_type() != at::kFloat || !x.is_contiguous()) return false;
    if (K.scalar_type() != at::kFloat || V.scalar_type() != at::kFloat || K.stride(3) != 1 || V.stride(3) != 1)
      return false;
    if (!cos.has_value()) return true;
    for (const at::Tensor* t : {&*cos, &*sin})
      if (t->scalar_type() != at::kFloat || t->dim() != 4 || t->stride(3) != 1 || t->size(1) != 1 || t->size(2) != T)
        return false;
    return true;
  }

  // rows handed to one thread by the loops over a prompt's rows (a decode step's few rows stay on one)
  static int64_t grain(int64_t rows) { return rows <= 8 ? rows : 16; }

  at::Tensor norm_f32(const Norm& n, const at::Tensor& x) const {  // x (M, D) contiguous float32
    at::Tensor y = at::empty_like(x);
    const int64_t M = x.size(0), D = x.size(1);
    const float* xp = x.data_ptr<float>();
    const float* w = n.w.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, M, grain(M), [&](int64_t a, int64_t b) {
      for (int64_t r = a; r < b; ++r) rms_norm_f32(xp + r * D, w, static_cast<float>(n.eps), D, yp + r * D);
    });
    return y;
  }

  // attention() in float32 loops: QK-norm, rotary embedding and the cache write per token and head,
  // straight from the projection's output into the query buffer and the cache slots
  at::Tensor attention_f32(const at::Tensor& x, int64_t B, int64_t T, const OptT& cos, const OptT& sin,
                           const OptT& mask, const at::Tensor& K, const at::Tensor& V, int64_t slot, const OptT& slots,
                           int64_t attend, const OptT& rows, bool causal) const {
    const int64_t Dh = head_dim, nq = n_heads * Dh, nk = n_kv * Dh;
    at::Tensor pq, pk, pv;  // (B, n) each, rows ldq / ldk / ldv apart
    int64_t ldq, ldk, ldv;
    if (qkv.present()) {
      pq = qkv(x).contiguous(), ldq = ldk = ldv = pq.size(1);
      pk = pq.narrow(1, nq, nk), pv = pq.narrow(1, nq + nk, nk);
    } else {
      pq = q(x).contiguous(), pk = k(x).contiguous(), pv = v(x).contiguous();
      ldq = nq, ldk = nk, ldv = nk;
    }
    float *qp = pq.data_ptr<float>(), *kp = pk.data_ptr<float>();
    const float* vp = pv.data_ptr<float>();
    const at::Tensor where = slots.has_value() ? slots->to(at::kLong).contiguous() : at::Tensor();
    const at::Tensor which = rows.has_value() ? rows->to(at::kLong).contiguous() : at::Tensor();
    at::Tensor qh = at::empty({B, n_heads, T, Dh}, x.options());
    float* qo = qh.data_ptr<float>();
    float* Kp = K.data_ptr<float>();
    float* Vp = V.data_ptr<float>();
    const int64_t half = cos.has_value() ? cos->size(3) : 0;
    const auto token = [&](int64_t r) {  // row r = b * T + t of the projections
      const int64_t b = r / T, t = r % T;
      float* qr = qp + r * ldq;
      float* kr = kp + r * ldk;
      const float* vr = vp + r * ldv;
      if (qk_norm == QK_FULL) {
        rms_norm_f32(qr, q_norm.w.data_ptr<float>(), static_cast<float>(q_norm.eps), nq, qr);
        rms_norm_f32(kr, k_norm.w.data_ptr<float>(), static_cast<float>(k_norm.eps), nk, kr);
      } else if (qk_norm == QK_HEAD) {
        for (int64_t h = 0; h < n_heads; ++h)
          rms_norm_f32(qr + h * Dh, q_norm.w.data_ptr<float>(), static_cast<float>(q_norm.eps), Dh, qr + h * Dh);
        for (int64_t h = 0; h < n_kv; ++h)
          rms_norm_f32(kr + h * Dh, k_norm.w.data_ptr<float>(), static_cast<float>(k_norm.eps), Dh, kr + h * Dh);
      }
      const float *c = nullptr, *sn = nullptr;
      if (half) {
        c = cos->data_ptr<float>() + (cos->size(0) == 1 ? 0 : b * cos->stride(0)) + t * cos->stride(2);
        sn = sin->data_ptr<float>() + (sin->size(0) == 1 ? 0 : b * sin->stride(0)) + t * sin->stride(2);
      }
      const auto put = [&](const float* src, float* dst, bool rotate) {
        if (rotate && half) rope_head_f32(src, c, sn, half, Dh, interleave, dst);
        else std::copy(src, src + Dh, dst);
      };
      for (int64_t h = 0; h < n_heads; ++h) put(qr + h * Dh, qo + ((b * n_heads + h) * T + t) * Dh, true);
      const int64_t row = rows.has_value() ? which.data_ptr<int64_t>()[b] : b;
      const int64_t at_ = slots.has_value() ? where.data_ptr<int64_t>()[b] : slot + t;
      for (int64_t h = 0; h < n_kv; ++h) {
        put(kr + h * Dh, Kp + row * K.stride(0) + h * K.stride(1) + at_ * K.stride(2), true);
        put(vr + h * Dh, Vp + row * V.stride(0) + h * V.stride(1) + at_ * V.stride(2), false);
      }
    };
    at::parallel_for(0, B * T, grain(B * T), [&](int64_t a, int64_t b) {
      for (int64_t r = a; r < b; ++r) token(r);
    });
    return o(attend_keys(qh, B, T, mask, K, V, attend, rows.has_value() ? which.data_ptr<int64_t>() : nullptr, causal));
  }

  // the queries qh (B, H, T, Dh) over the cache's first `attend` slots -> (B * T, H * Dh): one token
  // through decode_attention_rows (sequence b's rows read in place: rows[b], default b), a prompt
  // through at::scaled_dot_product_attention, called as evolm.nn.attention.attend calls it
  at::Tensor attend_keys(const at::Tensor& qh, int64_t B, int64_t T, const OptT& mask, const at::Tensor& K,
                         const at::Tensor& V, int64_t attend, const int64_t* rows, bool causal) const {
    at::Tensor keys = K, vals = V;
    if (attend >= 0) keys = keys.narrow(2, 0, attend), vals = vals.narrow(2, 0, attend);
    if (T == 1)
      return decode_attention_rows(qh, keys, vals, mask, scale, softcap, rows).reshape({B, n_heads * head_dim});
    at::Tensor y = at::scaled_dot_product_attention(qh, keys, vals, mask, 0.0, causal, scale, n_kv != n_heads);
    return y.transpose(1, 2).reshape({B * T, n_heads * head_dim});
  }

  at::Tensor attention(const at::Tensor& x, int64_t B, int64_t T, const OptT& cos, const OptT& sin, const OptT& mask,
                       const at::Tensor& K, const at::Tensor& V, int64_t slot, const OptT& slots, int64_t attend,
                       const OptT& rows, bool causal) const {
    at::Tensor qt, kt, vt;
    if (qkv.present()) {
      auto parts = qkv(x).split_with_sizes({n_heads * head_dim, n_kv * head_dim, n_kv * head_dim}, -1);
      qt = parts[0], kt = parts[1], vt = parts[2];
    } else {
      qt = q(x), kt = k(x), vt = v(x);
    }
    if (qk_norm == QK_FULL) qt = q_norm(qt), kt = k_norm(kt);
    qt = qt.view({B, T, n_heads, head_dim}).transpose(1, 2);
    kt = kt.view({B, T, n_kv, head_dim}).transpose(1, 2);
    vt = vt.view({B, T, n_kv, head_dim}).transpose(1, 2);
    if (qk_norm == QK_HEAD) qt = q_norm(qt), kt = k_norm(kt);
    if (cos.has_value()) qt = rope(qt, *cos, *sin, interleave), kt = rope(kt, *cos, *sin, interleave);
    const at::Tensor which = rows.has_value() ? rows->to(at::kLong).contiguous() : at::Tensor();
    if (slots.has_value()) {  // row b of the batch is row rows[b] of the buffers (default b)
      const at::Tensor where = slots->to(at::kLong).contiguous();
      const int64_t* w = where.data_ptr<int64_t>();
      const int64_t* r = rows.has_value() ? which.data_ptr<int64_t>() : nullptr;
      for (int64_t b = 0; b < B; ++b) {
        const int64_t row = r ? r[b] : b;
        K[row].select(1, w[b]).copy_(kt[b].select(1, 0));
        V[row].select(1, w[b]).copy_(vt[b].select(1, 0));
      }
    } else {
      K.narrow(2, slot, T).copy_(kt);
      V.narrow(2, slot, T).copy_(vt);
    }
    return o(attend_keys(qt, B, T, mask, K, V, attend, rows.has_value() ? which.data_ptr<int64_t>() : nullptr, causal));
  }

  at::Tensor mlp(const at::Tensor& x) const {
    at::Tensor h;
    if (gate_up.present()) {
      auto gu = gate_up(x).chunk(2, -1);
      h = activation(gu[0], act).mul_(gu[1]);  // act(g) * u, without a third tensor
    } else if (gated) {
      h = activation(gate(x), act).mul_(up(x));
    } else {
      h = activation(up(x), act);
    }
    return down(h);
  }
};

void register_block_plan(pybind11::module& mod) {
  pybind11::class_<BlockPlan>(mod, "BlockPlan")
      .def(pybind11::init<std::vector<int64_t>, std::vector<double>, std::vector<OptT>>())
      // pure ATen inside: the GIL is let go, so a server's event loop (evolm serve) runs while a
      // step computes (arguments are converted before, the result after, under the GIL)
      .def("step", &BlockPlan::step, pybind11::call_guard<pybind11::gil_scoped_release>());
}
