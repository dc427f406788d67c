'''The code templates `evolm arch flatten` assembles: one small template per innovation.

Each constant is plain PyTorch source, written the way the flattened file reads; ``flatten.py``
picks the ones a config uses and fills their slots. A slot is ``<<name>>``: alone on a line it
takes a (possibly multi-line, possibly empty) fragment at that indentation, inside a line a short
expression. Module and parameter names are evolm's (``embed_tokens``, ``self_attn.q_proj``,
``mlp.experts.gate_up_proj`` ...), so a flattened file loads an evolm state dict as it is.
'''

HEADER = '''"""<<title>>

A single-file PyTorch model written by `evolm arch flatten` from evolm's config <<name>>.
It contains only the parts this configuration uses, top to bottom as the paper draws them:
<<parts>>.
Module and parameter names are evolm's, so `model.load_state_dict(evolm_model.state_dict())` works.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
'''

# --- normalization ----------------------------------------------------------------------------
LAYERNORM = '''
class LayerNorm(nn.Module):
    """LayerNorm (Ba et al. 2016): centre and scale each vector<<bias_doc>>."""

    def __init__(self, dim, c):
        super().__init__()
        self.eps = c.norm_eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = <<bias>>

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)
'''

RMSNORM = '''
class RMSNorm(nn.Module):
    """RMSNorm (Zhang & Sennrich 2019): scale by the root mean square, no centring; statistics in float32."""

    def __init__(self, dim, c):
        super().__init__()
        self.eps = c.norm_eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
'''

OFFSET_RMSNORM = '''
class OffsetRMSNorm(nn.Module):
    """Gemma's RMSNorm: scales by (1 + w) with w starting at 0, so weight decay pulls the scale to 1."""

    def __init__(self, dim, c):
        super().__init__()
        self.eps = c.norm_eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)
'''

NORM_ALIAS = '''
Norm = <<cls>>  # the norm every block uses
'''

# --- positions --------------------------------------------------------------------------------
ROPE_FREQUENCIES = '''
def rope_frequencies(dim, theta, scaling=None):
    """RoPE (Su et al. 2021): inverse frequencies of the rotated pairs, and a factor for cos/sin
    (YaRN's attention temperature; 1 otherwise)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if scaling is None:
        return inv_freq, 1.0
    return ROPE_SCALINGS[scaling["type"]](inv_freq, dim, theta, scaling)
'''

ROPE_LINEAR = '''
def linear_scaling(inv_freq, dim, theta, scaling):
    """Position interpolation (Chen et al. 2023): every frequency divided by the factor."""
    return inv_freq / float(scaling["factor"]), 1.0
'''

ROPE_LLAMA3 = '''
def llama3_scaling(inv_freq, dim, theta, scaling):
    """Llama 3.1: keep high frequencies, divide low ones by the factor, blend smoothly between."""
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling["original_max_seq_len"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled), 1.0
'''

ROPE_YARN = '''
def yarn_mscale(scale, mscale=1.0):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_scaling(inv_freq, dim, theta, scaling):
    """YaRN (Peng et al. 2023): NTK-by-parts interpolation plus an attention temperature."""
    factor = float(scaling["factor"])
    old_len = float(scaling["original_max_seq_len"])
    beta_fast, beta_slow = float(scaling.get("beta_fast") or 32), float(scaling.get("beta_slow") or 1)
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attn_factor = scaling.get("attention_factor")
    if attn_factor is None:
        if mscale and mscale_all_dim:
            attn_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attn_factor = yarn_mscale(factor)

    def correction_dim(n_rot):
        return dim * math.log(old_len / (n_rot * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    keep = 1 - ramp  # 1 where a frequency is kept (high frequency), 0 where it is interpolated
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    inv = (1.0 / (factor * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep
    return inv, float(attn_factor)
'''

ROPE_SCALING_TABLE = '''
ROPE_SCALINGS = {<<entries>>}
'''

YARN_SOFTMAX_SCALE = '''
def yarn_softmax_scale(scaling):
    """DeepSeek's extra query scaling under YaRN: mscale(factor, mscale_all_dim) squared."""
    m = yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"]))
    return m * m
'''

ROTARY = '''
class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions. The frequencies stay float32 (a plain attribute, which
    model.to(bfloat16) leaves alone: rounded to 8 bits they would scramble positions)."""

    def __init__(self, dim, theta, scaling=None):
        super().__init__()
        self.inv_freq, self.attention_factor = rope_frequencies(dim, theta, scaling)

    def forward(self, positions, dtype):
        freqs = positions[:, None].float() * self.inv_freq.to(positions.device)
        return (freqs.cos() * self.attention_factor).to(dtype), (freqs.sin() * self.attention_factor).to(dtype)
'''

ROPE_HALVES = '''
def apply_rope(x, cos, sin):
    """Rotate the two halves of each head (x1, x2) by the position's angles (GPT-NeoX / Llama layout)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
'''

ROPE_INTERLEAVED = '''
def apply_rope(x, cos, sin):
    """Rotate adjacent pairs (x0, x1), (x2, x3) ... (GPT-J / DeepSeek layout). The rotated pairs come
    out de-interleaved (evens, then odds); done to both q and k, the scores are the same."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
'''

ROPE_PARTIAL = '''
def apply_partial_rope(x, cos, sin):
    """Partial rotary (GPT-NeoX, Phi): only the first 2 * cos.shape[-1] dims of a head rotate."""
    rot = 2 * cos.shape[-1]
    return torch.cat((apply_rope(x[..., :rot], cos, sin), x[..., rot:]), dim=-1)
'''

# --- masks and attention ----------------------------------------------------------------------
CAUSAL_MASK = '''
def causal_mask(T, device):
    """(T, T) boolean: True where query i may attend key j, i.e. j <= i."""
    i = torch.arange(T, device=device)
    return i[:, None] >= i[None, :]
'''

WINDOWED_MASK = '''
def layer_window(c, i):
    """Sliding-window attention (Longformer; Mistral, Gemma): every sliding_window_pattern-th layer
    is global, the others see only the last sliding_window tokens (pattern 1: all local)."""
    is_local = c.sliding_window_pattern == 1 or (i + 1) % c.sliding_window_pattern != 0
    return c.sliding_window if is_local else None


def causal_mask(T, window, device):
    """(T, T) boolean: True where query i may attend key j: j <= i, and i - j < window if windowed."""
    i = torch.arange(T, device=device)
    diff = i[:, None] - i[None, :]
    mask = diff >= 0
    return mask & (diff < window) if window is not None else mask
'''

ATTEND = '''
def attend(q, k, v, mask, scale):
    """Scaled dot-product attention over (B, H, T, D); k and v may have fewer heads (GQA)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
'''

ATTEND_SOFTCAP = '''
def attend(q, k, v, mask, scale, softcap):
    """Attention with Gemma 2's logit soft-capping, cap * tanh(scores / cap), so the scores are
    computed by hand; k and v may have fewer heads (GQA)."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)
'''

ATTENTION = '''
class Attention(nn.Module):
    """<<doc>>"""

    def __init__(self, c, layer_idx):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.d_model, c.n_heads * c.head_dim, bias=c.qkv_bias)
        self.k_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.v_proj = nn.Linear(c.d_model, c.n_kv_heads * c.head_dim, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.d_model, bias=c.o_bias)
        <<init>>

    def forward(self, x<<rope_param>>):
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        <<full_qk_norm>>
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        <<head_qk_norm>>
        <<rope>>
        y = attend(q, k, v, <<mask>>, self.scale<<softcap_arg>>)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))
'''

MLA = '''
class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2, arXiv:2405.04434): keys and values come from one
    low-rank latent per token (kv_lora_rank wide) plus one shared rotary key; position lives in a
    separate, "decoupled" rotary part of each head, since RoPE does not commute with kv_b_proj."""

    def __init__(self, c, layer_idx):
        super().__init__()
        self.n_heads = c.n_heads
        self.nope, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.kv_rank = c.kv_lora_rank
        qk_dim = self.nope + self.rope_dim
        <<q_init>>
        self.kv_a_proj_with_mqa = nn.Linear(c.d_model, c.kv_lora_rank + self.rope_dim, bias=c.qkv_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, c.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(c.n_heads * self.v_dim, c.d_model, bias=c.o_bias)
        <<init>>

    def forward(self, x<<rope_param>>):
        B, T, _ = x.shape
        q = <<q_expr>>
        q = q.view(B, T, self.n_heads, self.nope + self.rope_dim).transpose(1, 2)
        q_nope, q_rot = q.split([self.nope, self.rope_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_rot = k_rot.view(B, 1, T, self.rope_dim)
        <<rope>>
        kv = self.kv_b_proj(latent).view(B, T, self.n_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_rot.expand(B, self.n_heads, T, self.rope_dim)), dim=-1)
        q = torch.cat((q_nope, q_rot), dim=-1)
        y = attend(q, k, v, <<mask>>, self.scale<<softcap_arg>>)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim))
'''

# --- feed-forward -----------------------------------------------------------------------------
MLP_PLAIN = '''
class MLP(nn.Module):
    """GPT-2's feed-forward: down(<<act>>(up(x)))."""

    def __init__(self, c, d_ff=None):
        super().__init__()
        d_ff = c.d_ff if d_ff is None else d_ff
        self.up_proj = nn.Linear(c.d_model, d_ff, bias=c.mlp_bias)
        self.down_proj = nn.Linear(d_ff, c.d_model, bias=c.mlp_bias)

    def forward(self, x):
        return self.down_proj(act(self.up_proj(x)))
'''

MLP_GATED = '''
class MLP(nn.Module):
    """<<name>> (Shazeer 2020, "GLU Variants Improve Transformer"): down(<<act>>(gate(x)) * up(x))."""

    def __init__(self, c, d_ff=None):
        super().__init__()
        d_ff = c.d_ff if d_ff is None else d_ff
        self.gate_proj = nn.Linear(c.d_model, d_ff, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.d_model, d_ff, bias=c.mlp_bias)
        self.down_proj = nn.Linear(d_ff, c.d_model, bias=c.mlp_bias)

    def forward(self, x):
        return self.down_proj(act(self.gate_proj(x)) * self.up_proj(x))
'''

ACTIVATIONS = {
    "gelu": "def act(x):\n    return F.gelu(x)\n",
    "gelu_tanh": 'def act(x):\n    """GELU, tanh approximation (GPT-2)."""\n    return F.gelu(x, approximate="tanh")\n',
    "silu": "def act(x):\n    return F.silu(x)\n",
    "relu": "def act(x):\n    return F.relu(x)\n",
}

# --- mixture of experts -----------------------------------------------------------------------
ROUTER = '''
class Router(nn.Module):
    """<<doc>>"""

    def __init__(self, c):
        super().__init__()
        self.top_k, self.scaling = c.n_experts_per_tok, c.routed_scaling_factor
        self.weight = nn.Parameter(torch.randn(c.n_experts, c.d_model) * c.init_std)
        <<init>>

    def forward(self, x):
        """x (N, D) -> weights (N, k), expert indices (N, k)."""
        logits = F.linear(x.float(), self.weight.float())
        scores = <<scores>>
        choice = <<choice>>
        <<limit>>
        idx = torch.topk(choice, self.top_k, dim=-1)[1]
        w = scores.gather(1, idx)
        <<renorm>>
        return w * self.scaling, idx
    <<methods>>
'''

ROUTER_BIAS_FLOAT32 = '''
def _apply(self, fn, recurse=True):
    """Keep the balancing bias in float32 when the model is cast: in bfloat16 its small updates vanish."""
    bias = self.e_score_correction_bias
    super()._apply(fn, recurse)
    self.e_score_correction_bias = bias.to(self.weight.device)
    return self
'''

GROUP_LIMIT = '''
def limit_to_groups(choice, n_groups, topk_groups):
    """Group-limited routing (DeepSeek-V2/V3): experts come in n_groups groups and a token may only
    pick experts in its topk_groups best groups, <<rank_doc>>."""
    g = choice.view(choice.shape[0], n_groups, -1)
    group_score = <<group_score>>
    keep = torch.zeros_like(group_score).scatter_(1, group_score.topk(topk_groups, dim=-1)[1], 1.0)
    keep = keep.unsqueeze(-1).expand_as(g).reshape(choice.shape)
    return choice.masked_fill(keep == 0, float("-inf"))
'''

EXPERTS = '''
class Experts(nn.Module):
    """n_experts expert MLPs stored as stacked weights: gate_up_proj (E, <<rows>>, D), down_proj (E, D, F)."""

    def __init__(self, c):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.randn(c.n_experts, <<rows_expr>>, c.d_model) * c.init_std)
        self.down_proj = nn.Parameter(torch.randn(c.n_experts, c.d_model, c.moe_d_ff) * c.init_std)

    def forward(self, x, weights, idx):
        y = torch.zeros_like(x)
        for e in range(self.gate_up_proj.shape[0]):
            token, slot = torch.where(idx == e)  # the tokens that chose expert e, and in which of their k slots
            if token.numel() == 0:
                continue
            h = F.linear(x[token], self.gate_up_proj[e])
            <<act>>
            y.index_add_(0, token, F.linear(h, self.down_proj[e]) * weights[token, slot, None].to(x.dtype))
        return y
'''

MOE = '''
class MoE(nn.Module):
    """Sparse mixture of experts (Shazeer et al. 2017; Mixtral): the router sends each token to
    n_experts_per_tok of n_experts MLPs<<shared_doc>>."""

    def __init__(self, c):
        super().__init__()
        self.gate = Router(c)
        self.experts = Experts(c)
        <<shared_init>>

    def forward(self, x):
        xf = x.reshape(-1, x.shape[-1])
        w, idx = self.gate(xf)
        y = self.experts(xf, w, idx)
        <<shared_add>>
        return y.reshape(x.shape)
'''

# --- the residual block: one template per norm placement --------------------------------------
BLOCK_INIT = '''
class Block(nn.Module):
    """<<doc>>"""

    def __init__(self, c, layer_idx):
        super().__init__()
        self.self_attn = <<mixer>>
        self.mlp = <<channel>>
        <<norms>>

    def forward(self, x<<rope_param>>):
        <<body>>
'''

PLACEMENTS = {
    "pre": dict(
        doc="Pre-norm residual block (GPT-2, Llama): x + f(norm(x)) for attention, then the MLP.",
        norms=("attn_norm", "mlp_norm"),
        body=("x = x + self.self_attn(self.attn_norm(x)<<rope_arg>>)\n"
              "return x + self.mlp(self.mlp_norm(x))")),
    "post": dict(
        doc="Post-norm residual block (original Transformer, GPT-1, BERT): norm(x + f(x)).",
        norms=("attn_norm", "mlp_norm"),
        body=("x = self.attn_norm(x + self.self_attn(x<<rope_arg>>))\n"
              "return self.mlp_norm(x + self.mlp(x))")),
    "sandwich": dict(
        doc=("Sandwich-norm residual block (Gemma 2/3): x + norm_out(f(norm_in(x))), norms bound what\n"
             "    enters the residual stream."),
        norms=("attn_norm", "mlp_norm", "attn_out_norm", "mlp_out_norm"),
        body=("x = x + self.attn_out_norm(self.self_attn(self.attn_norm(x)<<rope_arg>>))\n"
              "return x + self.mlp_out_norm(self.mlp(self.mlp_norm(x)))")),
    "olmo2": dict(
        doc="OLMo 2 residual block (arXiv:2501.00656): x + norm(f(x)), the norm inside the residual branch.",
        norms=("attn_out_norm", "mlp_out_norm"),
        body=("x = x + self.attn_out_norm(self.self_attn(x<<rope_arg>>))\n"
              "return x + self.mlp_out_norm(self.mlp(x))")),
    "parallel": dict(
        doc=("Parallel residual block (GPT-J, PaLM): one shared norm, attention and MLP read the same\n"
             "    input: x + attn(norm(x)) + mlp(norm(x))."),
        norms=("attn_norm",),
        body=("h = self.attn_norm(x)\n"
              "return x + self.self_attn(h<<rope_arg>>) + self.mlp(h)")),
    "parallel2": dict(
        doc=("Parallel residual block with two norms (Falcon-40B/180B): attention and MLP run side by side,\n"
             "    each on its own norm of x: x + attn(norm_a(x)) + mlp(norm_m(x))."),
        norms=("attn_norm", "mlp_norm"),
        body="return x + self.self_attn(self.attn_norm(x)<<rope_arg>>) + self.mlp(self.mlp_norm(x))"),
}

# --- the model --------------------------------------------------------------------------------
TRANSFORMER = '''
class Transformer(nn.Module):
    """Token embeddings -> <<n_layers>> blocks -> <<tail>>."""

    def __init__(self, config):
        super().__init__()
        self.config = c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model)
        <<pos_init>>
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.n_layers))
        <<norm_init>>
        <<head_init>>
        <<rope_init>>

    def forward(self, input_ids):
        """input_ids (B, T) -> logits (B, T, vocab_size)."""
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)
        <<embed>>
        <<rope_tables>>
        for <<loop>>:
            x = layer(x<<rope_arg>>)
        <<final_norm>>
        logits = <<logits>>
        <<softcap>>
        return logits
'''

ROPE_TABLES = '''
def rope_tables(self, T, dtype, device):
    """Each layer's (cos, sin)<<doc>>."""
    c, positions = self.config, torch.arange(T, device=device)
    rope_global = self.rotary(positions, dtype)
    <<local>>
    return [<<per_layer>> for i in range(c.n_layers)]
'''

MAIN = '''

if __name__ == "__main__":
    model = Transformer(Config()).eval()
    ids = torch.randint(0, model.config.vocab_size, (1, 16))
    print(model(ids).shape)
'''
