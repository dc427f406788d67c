"""The cost card: what a configuration costs in parameters, KV-cache memory and FLOPs.

Memory per GPU under a parallel layout (parameters, gradients, optimizer state, activations, KV
cache) is the planner built on these counts: ``analysis/plan.py``, ``evolm arch plan``.

Everything here is computed analytically from a ``ModelConfig`` (no model is built), so a card
for a 671B model is instant; the tests cross-check every count against the model built on the
meta device. Definitions, so that numbers from different models compare:

Parameters
    ``params_total``: every trainable parameter, a tied embedding/head matrix counted once
    (buffers such as DeepSeek-V3's router bias are not parameters).
    ``params_active``: the parameters one token passes through: embeddings, attention, dense
    MLPs, norms, the LM head, every router and shared expert, and only ``n_experts_per_tok``
    of the routed experts per MoE layer. This is the convention of the Mixtral paper (46.7B
    total, 12.9B active).
    ``params_non_embedding``: total minus the token and position embeddings and an untied LM
    head (the Gemma 3 and Qwen3 reports' "non-embedding" figure).
    ``params_by_part``: embeddings (token + learned positions + token types), attention (each block's
    mixer: attention projections and their biases, or a state-space layer's parameters), mlp (dense MLPs), experts (all routed experts), shared_experts, router, norms
    (every norm weight, including QK-norms, MLA's latent norms and an encoder's embedding norm),
    lm_head (0 when tied), head (an encoder's task head: BERT's transform and decoder bias, pooler,
    classifier; ``nn/heads.py``). The parts sum to ``params_total``.

KV cache (``bytes_per_value`` = 2 for bf16)
    Per layer and token a GQA/MHA layer stores keys and values, ``2 * n_kv_heads * head_dim``
    numbers; an MLA layer stores its latent and shared rotary key, ``kv_lora_rank +
    qk_rope_head_dim`` numbers (DeepSeek-V2, arXiv:2405.04434). A sliding-window layer never needs
    more than ``sliding_window`` tokens (a ring buffer), so at a context of T tokens it holds
    ``min(T, window)`` of them; a chunked layer (Llama 4) likewise at most its chunk.
    ``kv_cache_bytes_per_token_uncapped``: bytes per token summed over all layers, as if every
    layer kept every token (also the marginal cost of a token while T <= window).
    ``kv_cache_bytes_at_context``: total bytes for ``context_len`` tokens of one sequence,
    local layers capped at their window.
    ``kv_cache_bytes_per_token``: ``kv_cache_bytes_at_context / context_len``, the average cost
    per token of context: local layers contribute only their ``window / context_len`` share.
    Without sliding-window layers it equals the uncapped figure.

FLOPs per token (multiply-add = 2 FLOPs)
    Weights: a token does 2 FLOPs per active weight going forward, 4 more going backward,
    so 6N for training (Kaplan et al. 2020, arXiv:2001.08361, Sec. 2.1). Here N is the active
    parameter count without the input embeddings (a lookup, not a matmul) but with the LM head
    matmul even when it is tied to the embedding (Chinchilla, Hoffmann et al. 2022,
    arXiv:2203.15556, Appendix F, counts the final logits too).
    Attention: per layer, the scores ``q.k`` and the weighted sum ``p.v`` cost
    ``2 * T * n_heads * (d_qk + d_v)`` FLOPs forward per token at context T (no causal
    halving), i.e. ``4 * T * n_heads * head_dim`` for MHA/GQA: the PaLM convention
    (Chowdhery et al. 2022, arXiv:2204.02311, Appendix B), whose training total is
    ``6N + 12 * n_layers * n_heads * head_dim * T``. Local layers use ``min(T, window)``.
    ``forward_flops_per_token`` = 2N + attention forward; ``flops_per_token`` (training) = 3x that.

State-space layers (Mamba, ``attention="mamba"``; Gu & Dao 2023, arXiv:2312.00752)
    A recurrent layer caches no keys/values: it holds a state of fixed size per sequence, the last
    ``d_conv - 1`` convolution inputs (``bytes_per_value`` each) and the ``(d_inner, d_state)`` SSM
    state (float32, as ``nn/mamba.py`` keeps it): ``state_bytes_per_sequence``, the same at any
    context. Its weights (projections, convolution taps) count in N like any others, except ``A_log``
    and ``D``, which enter elementwise: the scan's own forward FLOPs per token and layer are
    ``7 * d_inner * d_state`` (``exp(dt A)``: 2; ``dt u B``: 1; the state update: 2; the read-out
    ``C . h``: 2) plus ``4 * d_inner`` (skip, SiLU gate), and do not depend on the context length,
    where attention's grow with it. They are reported under ``attention_flops_per_token`` (the
    mixer's context FLOPs), so the training total stays ``6N + 3 * mixer forward``.

    Mamba-2 (``attention="mamba2"``; SSD, Dao & Gu 2024, arXiv:2405.21060) with H heads of P channels,
    a state of N per head, G groups of B/C: its state is ``(d_conv - 1) * (d_inner + 2 G N)`` conv
    inputs and the float32 ``H x P x N`` SSM state. Its scan is counted as the chunked SSD form that
    training and prefill run (``nn/mamba2.py``), per token and layer with chunks of
    ``l = min(context, mamba_chunk_size)``: ``2 l (G N + H P + H)`` inside the chunk (``C B^T``, the
    decay mask, the weighted sum), ``4 H P N`` for the chunk states and their read-out, and ``6
    d_inner`` elementwise (dt scaling, D skip, gate); ``A_log`` and ``D`` leave N as Mamba's do. A
    decoded token takes the recurrent step instead, about ``5 H P N``, the same at any length.

Hyena (``attention="hyena"``, ``nn/hyena.py``; Poli et al. 2023, arXiv:2302.10866)
    Its projections, short convolution and skips are per-token weights (2 FLOPs each forward).
    The filter MLP runs over the positions once per forward for the whole batch, not per token,
    so it is a parameter (in ``attention``) but not in N. The long convolutions, by FFT padded to
    2T, cost per layer and token ``N * d * ((3 * 2.5 * 2T log2(2T) + 6 (T + 1)) / T + 1)`` forward:
    three real FFTs of length 2T (input, filter, inverse; ~2.5 n log2 n each, half a complex FFT's
    5 n log2 n), the complex product of the T + 1 frequencies, and the gate
    (``long_conv_flops_per_token``, 3x forward for training; part of ``attention_flops_per_token``, the
    mixer's context FLOPs, as Mamba's scan). It caches no keys/values: its recurrent state
    (``state_bytes_per_sequence``) is the last ``max_seq_len`` inputs of each long convolution,
    ``N * d * max_seq_len`` values a layer, and the short convolution's last ``taps - 1`` inputs.

Hybrids (Jamba: ``mixer_pattern``; Lieber et al. 2024, arXiv:2403.19887)
    Everything above is counted per layer by its mixer: keys/values (and attention FLOPs) only for
    the attention layers, a fixed state only for the state-space ones. Jamba-v0.1 (4 attention
    layers of 32) holds 4 GiB of bf16 keys/values at 256K tokens, where the paper reports 4GB (its
    Table 1; Mixtral 8x7B: 32GB).

Encoder-decoders (T5, BART, Switch: ``encoder_layers > 0``)
    The encoder's parameters join the parts (its token embedding is the decoder's, counted once;
    T5's relative position tables count as embeddings), each decoder layer adds its
    cross-attention projections (attention) and norm. A *token* is then one source token and one
    target token, both at ``context_len``: N is the active weights of both stacks, and the
    attention FLOPs add the encoder's self-attention and the decoder's cross-attention over the
    source. ``cross_kv_cache_bytes_at_context``: the cross-attention keys/values of a source of
    ``context_len`` tokens, held by every decoder layer for the whole request (0 for a decoder).

Vision models (Llama 3.2 Vision: ``config.vision``; nn/vision.py)
    ``params_by_part["vision"]``: the image encoder and the projector; a cross-attention layer's
    projections and its two tanh gates count as attention, its per-head Q/K norms as norms, the
    embedding's rows past the vocabulary (<|image|> ..) as embeddings. An image at the full
    ``max_num_tiles`` gives ``image_tokens_per_image`` = tiles x (patches + class token) states, which
    each cross-attention layer projects to keys/values once per request:
    ``cross_kv_cache_bytes_per_image``. ``vision_flops_per_image``: the forward matmuls of the
    encoder (its sequence padded to a multiple of 8 tokens per tile, all tiles attending together),
    the projector and those key/value projections (biases and norms left out). The per-token
    FLOPs count one image: a cross-attention layer multiplies q/o and its MLP per text token and
    attends over that image's tokens instead of the context.
"""

from __future__ import annotations

import math
from typing import Any

from evolm.config import ModelConfig


# --- parameter counts ---------------------------------------------------------------------
def _norm_size(c: ModelConfig, dim: int) -> int:
    """Parameters of one ``make_norm(c, dim)``: RMSNorm has a scale, LayerNorm maybe a bias too."""
    return dim * (2 if c.norm == "layernorm" and c.norm_bias else 1)


def _mlp_size(c: ModelConfig, d_ff: int) -> int:
    n_in = 2 if c.mlp == "glu" else 1  # gate + up, or up only
    weights = (n_in + 1) * c.d_model * d_ff
    biases = (n_in * d_ff + c.d_model) if c.mlp_bias else 0
    return weights + biases


def _is_mamba(c: ModelConfig, i: int) -> bool:
    return c.layer_mixer(i) == "mamba"


def _hyena_layers(c: ModelConfig) -> int:
    return sum(c.layer_mixer(i) == "hyena" for i in range(c.n_layers))


def _hyena_size(c: ModelConfig) -> tuple[int, int]:
    """(per-token parameters, filter-MLP parameters) of one Hyena layer (``nn/hyena.py``): in_proj to
    N + 1 streams, their depthwise short convolution, the N skips D, o_proj; the filter MLP with
    its sine frequencies."""
    d, N, W, depth = c.d_model, c.hyena_order, c.hyena_filter_width, c.hyena_filter_depth
    streams = (N + 1) * d
    per_token = (d + 1) * streams + (c.hyena_short_conv + 1) * streams + N * d + (d + 1) * d
    mlp = (c.hyena_filter_emb + 1) * W + depth * (W + 1) * W + W * N * d + (depth + 1) * W
    return per_token, mlp


def _attention_size(c: ModelConfig) -> tuple[int, int]:
    """(projection parameters, norm parameters) of one attention layer."""
    d, H = c.d_model, c.n_heads
    if c.attention == "mla":
        qk = c.qk_nope_head_dim + c.qk_rope_head_dim
        b = 1 if c.qkv_bias else 0
        if c.q_lora_rank is None:
            q, norms = d * H * qk, 0
        else:
            q = d * c.q_lora_rank + b * c.q_lora_rank + c.q_lora_rank * H * qk
            norms = c.q_lora_rank  # q_a_layernorm (an RMSNorm whatever c.norm is)
        kv_a = (d + b) * (c.kv_lora_rank + c.qk_rope_head_dim)
        kv_b = c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim)
        o = H * c.v_head_dim * d + (d if c.o_bias else 0)
        return q + kv_a + kv_b + o, norms + c.kv_lora_rank
    q_dim, kv_dim = H * c.head_dim, c.n_kv_heads * c.head_dim
    proj = d * (q_dim + 2 * kv_dim) + q_dim * d
    if c.qkv_bias:
        proj += q_dim + 2 * kv_dim
    if c.o_bias:
        proj += d
    norms = 0
    if c.qk_norm == "head":
        norms = 2 * _norm_size(c, c.head_dim)
    elif c.qk_norm == "full":
        norms = _norm_size(c, q_dim) + _norm_size(c, kv_dim)
    return proj, norms


_BLOCK_NORMS = {"pre": 2, "post": 2, "sandwich": 4, "olmo2": 2, "parallel": 1, "parallel2": 2}
_MIXER_ONLY_NORMS = {"pre": 1, "post": 1, "sandwich": 2, "olmo2": 1, "parallel": 1, "parallel2": 1}  # mlp="none"


def ssm_size(c: ModelConfig) -> int:
    """Parameters of one Mamba mixer (nn/mamba.py): in/out projections, the depthwise convolution,
    the dt/B/C projection, dt's up-projection with its bias, ``A_log`` and ``D`` (Jamba's norms on dt,
    B and C count with the norms: :func:`ssm_norms_size`)."""
    d, di, N, R = c.d_model, c.mamba_expand * c.d_model, c.mamba_d_state, c.mamba_dt_rank
    proj = 2 * d * di + di * d + (2 * di + d if c.mamba_proj_bias else 0)
    conv = di * c.mamba_d_conv + (di if c.mamba_conv_bias else 0)
    return proj + conv + di * (R + 2 * N) + R * di + di + di * N + di


def ssm_norms_size(c: ModelConfig) -> int:
    """Jamba's RMSNorms on dt, B and C inside one Mamba mixer (``mamba_dt_b_c_norm``)."""
    return c.mamba_dt_rank + 2 * c.mamba_d_state if c.mamba_dt_b_c_norm else 0


def _n_layers_of(c: ModelConfig, mixer: str) -> int:
    return sum(c.layer_mixer(i) == mixer for i in range(c.n_layers))


def mamba2_dims(c: ModelConfig) -> tuple[int, int, int, int, int]:
    """(d_inner, heads H, head dim P, state N, groups G) of a Mamba-2 mixer (nn/mamba2.py)."""
    di = c.mamba_expand * c.d_model
    return di, di // c.mamba_d_head, c.mamba_d_head, c.mamba_d_state, c.mamba_n_groups


def mamba2_size(c: ModelConfig) -> int:
    """Parameters of one Mamba-2 mixer: ``in_proj`` to (z, x, B, C, dt), the depthwise convolution over
    (x, B, C), ``dt_bias``, ``A_log``, ``D``, the gated RMSNorm's scale (part of the mixer, as its
    module name says), ``out_proj``."""
    di, H, _, N, G = mamba2_dims(c)
    conv_dim, d = di + 2 * G * N, c.d_model
    proj = d * (di + conv_dim + H) + di * d + ((di + conv_dim + H + d) if c.mamba_proj_bias else 0)
    conv = conv_dim * c.mamba_d_conv + (conv_dim if c.mamba_conv_bias else 0)
    return proj + conv + 3 * H + di


def ssm_state_bytes(c: ModelConfig, bytes_per_value: int = 2, batch: int = 1) -> int:
    """Bytes of the recurrent states of ``batch`` sequences, whatever their length: per state-space
    layer the last ``d_conv - 1`` convolution inputs and the float32 ``(d_inner, d_state)`` state;
    per Hyena layer the short convolution's last ``hyena_short_conv - 1`` inputs of its N + 1
    streams and the last ``max_seq_len`` inputs of each of its N long convolutions (nn/hyena.py); per
    Mamba-2 layer the last ``d_conv - 1`` inputs of its (x, B, C) convolution and the float32
    ``H x P x N`` state."""
    di = c.mamba_expand * c.d_model
    per_layer = di * (c.mamba_d_conv - 1) * bytes_per_value + di * c.mamba_d_state * 4
    N, d = c.hyena_order, c.d_model
    per_hyena = ((N + 1) * d * (c.hyena_short_conv - 1) + N * d * c.max_seq_len) * bytes_per_value
    di2, H, P, N2, G = mamba2_dims(c)
    per_mamba2 = (di2 + 2 * G * N2) * (c.mamba_d_conv - 1) * bytes_per_value + H * P * N2 * 4
    return batch * (per_layer * sum(_is_mamba(c, i) for i in range(c.n_layers)) + per_hyena * _hyena_layers(c)
                    + per_mamba2 * _n_layers_of(c, "mamba2"))


def ssm_forward_flops(c: ModelConfig, context_len: int | None = None) -> int:
    """Forward FLOPs per token of the state-space scans (besides their weights' 2N), over all layers:
    Mamba's the same at any context length, Mamba-2's growing with it up to one chunk (``None``: a
    full chunk)."""
    di = c.mamba_expand * c.d_model
    mamba = 7 * di * c.mamba_d_state + 4 * di
    di, H, P, N, G = mamba2_dims(c)
    chunk = c.mamba_chunk_size if context_len is None else min(context_len, c.mamba_chunk_size)
    mamba2 = 2 * chunk * (G * N + H * P + H) + 4 * H * P * N + 6 * di
    return _n_layers_of(c, "mamba") * mamba + _n_layers_of(c, "mamba2") * mamba2


def param_counts(c: ModelConfig) -> dict[str, int]:
    """Parameters by part (see the module docstring); the values sum to the model's numel."""
    d = c.d_model
    parts = dict.fromkeys(("embeddings", "attention", "mlp", "experts", "shared_experts", "router",
                           "norms", "lm_head", "head", "vision"), 0)
    extra_rows = c.vision.extra_token_rows if c.vision is not None else 0
    parts["embeddings"] = (c.vocab_size + c.type_vocab_size + extra_rows) * d + _positions_size(c)
    attn, attn_norms = _attention_size(c)
    expert = (3 if c.mlp == "glu" else 2) * d * c.moe_d_ff  # one routed expert (no biases)
    for i in range(c.n_layers):
        mixer = c.layer_mixer(i)
        parts["attention"] += ssm_size(c) if mixer == "mamba" else mamba2_size(c) if mixer == "mamba2" else \
            sum(_hyena_size(c)) if mixer == "hyena" else attn
        mixer_only = c.mlp == "none" and not c.layer_is_moe(i)
        parts["norms"] += (ssm_norms_size(c) if mixer == "mamba" else 0 if mixer in ("hyena", "mamba2") else attn_norms) + \
            (_MIXER_ONLY_NORMS if mixer_only else _BLOCK_NORMS)[c.norm_placement] * _norm_size(c, d)
        if mixer_only:
            pass
        elif c.layer_is_moe(i):
            parts["router"] += c.n_experts * d
            parts["experts"] += c.n_experts * expert
            if c.n_shared_experts:
                parts["shared_experts"] += _mlp_size(c, c.moe_d_ff * c.n_shared_experts)
        else:
            parts["mlp"] += _mlp_size(c, c.d_ff)
        if c.encoder_layers:  # the decoder's cross-attention and its norm
            parts["attention"] += attn
            parts["norms"] += attn_norms + _norm_size(c, d)
        if c.layer_is_cross(i):  # an image layer: its two gates, per-head Q/K norms instead of the config's
            parts["attention"] += 2
            parts["norms"] += 2 * _norm_size(c, c.head_dim) - attn_norms
    parts["vision"] = vision_params(c)
    parts["norms"] += (c.final_norm + c.embed_norm - (not c.first_attn_norm)) * _norm_size(c, d)
    if not c.tie_embeddings and c.head == "lm":
        parts["lm_head"] = c.vocab_size * d + (c.vocab_size if c.lm_head_bias else 0)
    parts["head"] = _head_size(c)
    if c.encoder_layers:
        encoder = param_counts(c.encoder_config())
        encoder["embeddings"] -= c.vocab_size * d  # the token embedding is shared
        for k, n in encoder.items():
            parts[k] += n
    return parts


def vision_params(c: ModelConfig) -> int:
    """The image encoder (patch embedding, class token, gated position and tile tables, the local and
    gated global blocks, two LayerNorms) and the projector; 0 without ``vision``."""
    v = c.vision
    if v is None:
        return 0
    d, P, T, n_ar = v.d_model, v.patches_per_tile, v.max_num_tiles, len(v.supported_aspect_ratios) + 1
    embed = v.num_channels * v.patch_size ** 2 * d + d + (1 + P * d + n_ar * T * P * d) + 2 * (n_ar * T * d + 1)
    block = 4 * d * d + (2 * d * v.d_ff + v.d_ff + d) + 2 * 2 * d
    return embed + 2 * 2 * d + (v.n_layers + v.n_global_layers) * block + 2 * v.n_global_layers \
        + v.output_dim * c.d_model + c.d_model


def image_tokens(c: ModelConfig) -> int:
    """States one image at the full tiling gives the cross-attention layers (0 without ``vision``)."""
    return c.vision.max_num_tiles * c.vision.patches_per_tile if c.vision is not None else 0


def cross_layers(c: ModelConfig) -> int:
    return sum(c.layer_is_cross(i) for i in range(c.n_layers))


def vision_flops_per_image(c: ModelConfig) -> dict[str, int]:
    """Forward matmul FLOPs of one image at the full tiling: encoder, projector, cross K/V projections."""
    v = c.vision
    if v is None:
        return {"encoder": 0, "encoder_attention": 0, "projector": 0, "cross_kv": 0}
    d, P, T = v.d_model, v.patches_per_tile, v.max_num_tiles
    S = T * (P + (-P) % 8)  # every tile padded to a multiple of 8; all tiles in one sequence
    n_layers = v.n_layers + v.n_global_layers
    patches = 2 * T * (P - 1) * v.num_channels * v.patch_size ** 2 * d
    kv_dim = c.n_kv_heads * c.head_dim
    return {"encoder": patches + n_layers * 2 * S * (4 * d * d + 2 * d * v.d_ff),
            "encoder_attention": n_layers * 2 * S * S * 2 * d,  # scores + weighted sum
            "projector": 2 * T * P * v.output_dim * c.d_model,
            "cross_kv": cross_layers(c) * 2 * T * P * c.d_model * 2 * kv_dim}


def _positions_size(c: ModelConfig) -> int:
    """A learned position table (shifted by ``pos_offset`` rows) or T5's bucket biases."""
    if c.pos_emb == "learned":
        return (c.max_seq_len + c.pos_offset) * c.d_model
    if c.pos_emb == "relative":
        return c.relative_attention_num_buckets * c.n_heads
    return 0


def _head_size(c: ModelConfig) -> int:
    """An encoder's task head (nn/heads.py): transform, tied decoder bias, pooler, classifier."""
    d = c.d_model
    n = (d * d + (d if c.head_dense_bias else 0) + _norm_size(c, d)) if c.head_transform else 0
    if c.head == "lm" and c.lm_head_bias and c.tie_embeddings:
        n += c.vocab_size
    if c.pooler:
        n += d * d + d
    if c.head in ("classify", "token_classify"):
        n += (d + 1) * c.num_labels
    return n


def _active_experts(c: ModelConfig) -> int:
    n_moe = sum(c.layer_is_moe(i) for i in range(c.n_layers))
    own = n_moe * c.n_experts_per_tok * (3 if c.mlp == "glu" else 2) * c.d_model * c.moe_d_ff
    return own + (_active_experts(c.encoder_config()) if c.encoder_layers else 0)


# --- KV cache -------------------------------------------------------------------------------
def kv_values_per_token(c: ModelConfig) -> int:
    """Numbers one attention layer caches per token: keys + values, or MLA's latent + rotary key."""
    if c.attention == "mla":
        return c.kv_lora_rank + c.qk_rope_head_dim
    return 2 * c.n_kv_heads * c.head_dim


def kv_cache_bytes(c: ModelConfig, context_len: int, bytes_per_value: int = 2, batch: int = 1) -> int:
    """Bytes a full KV cache holds for ``batch`` sequences of ``context_len`` tokens."""
    per_layer = kv_values_per_token(c) * bytes_per_value
    tokens = 0
    for i in range(c.n_layers):
        if c.layer_is_cross(i):  # an image layer holds the image's keys/values, not the tokens'
            continue
        if c.layer_is_recurrent(i):
            continue  # a state of fixed size instead (ssm_state_bytes)
        window = c.layer_kv_span(i)
        tokens += context_len if window is None else min(context_len, window)
    return batch * per_layer * tokens


def cross_kv_cache_bytes(c: ModelConfig, source_len: int, bytes_per_value: int = 2, batch: int = 1) -> int:
    """Bytes of an encoder-decoder's cross-attention keys/values for a source of ``source_len``
    tokens: every decoder layer keeps its own projection of the encoder output (0 for a decoder)."""
    return batch * c.n_layers * kv_values_per_token(c) * bytes_per_value * source_len if c.encoder_layers else 0


# --- FLOPs ----------------------------------------------------------------------------------
def attention_forward_flops(c: ModelConfig, context_len: int) -> int:
    """Forward FLOPs per token of the score and weighted-sum matmuls, over all layers."""
    if c.attention == "mla":
        d_qk, d_v = c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim
    else:
        d_qk = d_v = c.head_dim
    total = 0
    for i in range(c.n_layers):
        if c.layer_is_recurrent(i):
            continue  # no scores: ssm_forward_flops, long_conv_forward_flops
        window = c.layer_kv_span(i)  # a chunked layer: at most its chunk (the last token of one)
        t = context_len if window is None else min(context_len, window)
        if c.layer_is_cross(i):  # an image layer attends over one image's states
            t = image_tokens(c)
        total += 2 * t * c.n_heads * (d_qk + d_v)
    if c.encoder_layers:  # the encoder's self-attention, and each decoder layer's cross-attention
        total += attention_forward_flops(c.encoder_config(), context_len)
        total += cross_attention_forward_flops(c, context_len)
    return total


def long_conv_forward_flops(c: ModelConfig, context_len: int) -> int:
    """Forward FLOPs per token of Hyena's FFT long convolutions and gates at context T, over all
    layers (0 without Hyena layers; see the module docstring)."""
    if not _hyena_layers(c):
        return 0
    T, n = context_len, 2 * context_len
    per_channel = (3 * 2.5 * n * math.log2(n) + 6 * (T + 1)) / T + 1
    return round(_hyena_layers(c) * c.hyena_order * c.d_model * per_channel)


def cross_attention_forward_flops(c: ModelConfig, source_len: int) -> int:
    """Forward FLOPs per target token of an encoder-decoder's cross-attention over ``source_len``
    source tokens, over all decoder layers (0 for a decoder)."""
    if not c.encoder_layers:
        return 0
    d_qk, d_v = (c.qk_nope_head_dim + c.qk_rope_head_dim, c.v_head_dim) if c.attention == "mla" else (c.head_dim,) * 2
    return c.n_layers * 2 * source_len * c.n_heads * (d_qk + d_v)


# --- the card -------------------------------------------------------------------------------
def cost_card(config: ModelConfig | str, context_len: int | None = None,
              bytes_per_value: int = 2) -> dict[str, Any]:
    """Parameters, KV-cache bytes and FLOPs of a config (or preset name); see the module docstring.

    ``context_len`` defaults to ``config.max_seq_len``; ``bytes_per_value`` is 2 for a bf16 cache.
    All values are plain ints/floats/strs (the dict is JSON-serialisable).
    """
    c = _as_config(config)
    T = c.max_seq_len if context_len is None else int(context_len)
    if T <= 0:
        raise ValueError(f"cost_card: context_len must be a positive number of tokens, got {context_len}")
    parts = param_counts(c)
    total = sum(parts.values())
    active = total - parts["experts"] + _active_experts(c)
    non_embedding = total - parts["embeddings"] - parts["lm_head"]
    # weights a token multiplies: active minus the embedding lookup, plus a tied head's matmul
    tied = c.tie_embeddings and c.head == "lm"
    n_compute = active - parts["embeddings"] + (c.vocab_size * c.d_model if tied else 0) - _elementwise_ssm(c)
    # the image side runs once per image, not per token; so do the image layers' key/value projections
    n_compute -= parts["vision"] + cross_layers(c) * 2 * c.d_model * c.n_kv_heads * c.head_dim
    n_compute -= _hyena_layers(c) * _hyena_size(c)[1]  # Hyena's filter MLP runs once per batch, not per token
    vision_flops = vision_flops_per_image(c)
    conv_fwd = long_conv_forward_flops(c, T)
    attn_fwd = attention_forward_flops(c, T) + ssm_forward_flops(c, T) + conv_fwd
    kv_at = kv_cache_bytes(c, T, bytes_per_value)
    return {
        "name": c.name,
        "context_len": T,
        "params_total": total,
        "params_active": active,
        "params_non_embedding": non_embedding,
        "params_by_part": parts,
        "kv_cache_bytes_per_token": kv_at / T,
        "kv_cache_bytes_per_token_uncapped": kv_values_per_token(c) * bytes_per_value * _n_attention_layers(c),
        "kv_cache_bytes_at_context": kv_at,
        "kv_bytes_per_value": bytes_per_value,
        "cross_kv_cache_bytes_at_context": cross_kv_cache_bytes(c, T, bytes_per_value),
        "state_bytes_per_sequence": ssm_state_bytes(c, bytes_per_value),
        "flops_per_token": 6 * n_compute + 3 * attn_fwd,
        "forward_flops_per_token": 2 * n_compute + attn_fwd,
        "long_conv_flops_per_token": 3 * conv_fwd,
        "attention_flops_per_token": 3 * attn_fwd,
        "flops_params": n_compute,
        "image_tokens_per_image": image_tokens(c),
        "cross_kv_cache_bytes_per_image": cross_layers(c) * kv_values_per_token(c) * bytes_per_value * image_tokens(c),
        "vision_flops_per_image": sum(vision_flops.values()),
        "vision_flops_by_part": vision_flops,
    }


def _n_attention_layers(c: ModelConfig) -> int:
    """Layers that cache each token's keys/values (not an image layer, not a recurrent one)."""
    return sum(not c.layer_is_recurrent(i) and not c.layer_is_cross(i) for i in range(c.n_layers))


def _elementwise_ssm(c: ModelConfig) -> int:
    """``A_log`` and ``D`` of every state-space layer: parameters a token does not multiply as a
    matrix (their FLOPs are in :func:`ssm_forward_flops`)."""
    di = c.mamba_expand * c.d_model
    heads = mamba2_dims(c)[1]
    return _n_layers_of(c, "mamba") * (di * c.mamba_d_state + di) + _n_layers_of(c, "mamba2") * 2 * heads


def _as_config(config: ModelConfig | str) -> ModelConfig:
    if isinstance(config, ModelConfig):
        return config
    if isinstance(config, str):
        from evolm.presets import get_preset
        return get_preset(config)
    raise TypeError(f"expected a ModelConfig or a preset name, got {type(config).__name__}")


# --- human units ----------------------------------------------------------------------------
def _sig3(x: float) -> str:
    """Three significant digits, keeping trailing zeros: 27.0, 8.03, 124."""
    if x == 0:
        return "0"
    a = abs(x)
    if a >= 999.5:
        return f"{x:.0f}"
    return f"{x:.{0 if a >= 99.95 else 1 if a >= 9.995 else 2}f}"


def _scaled(n: float, units: tuple, sep: str, base_unit: str) -> str:
    for unit, scale in units:
        if abs(n) >= scale * 0.9995:
            return f"{_sig3(n / scale)}{sep}{unit}"
    return f"{_sig3(n) if n != int(n) else int(n)}{sep if base_unit else ''}{base_unit}"


def human_count(n: float) -> str:
    """124439808 -> '124M', 8.03e9 -> '8.03B', 27.0e9 -> '27.0B' (3 significant digits)."""
    return _scaled(n, (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)), "", "")


human = human_count  # short alias (the CLI's `arch list` uses it)


def human_bytes(n: float) -> str:
    """131072 -> '128 KiB' (binary units, 3 significant digits)."""
    return _scaled(n, (("TiB", 2 ** 40), ("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)), " ", "B")


def human_flops(n: float) -> str:
    """1.5e9 -> '1.50 GFLOP'."""
    return _scaled(n, (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("KFLOP", 1e3)),
                   " ", "FLOP")


_ROWS = (  # (label, getter, formatter)
    ("params total", lambda k: k["params_total"], human_count),
    ("params active / token", lambda k: k["params_active"], human_count),
    ("params non-embedding", lambda k: k["params_non_embedding"], human_count),
    ("  embeddings", lambda k: k["params_by_part"]["embeddings"], human_count),
    ("  attention", lambda k: k["params_by_part"]["attention"], human_count),
    ("  mlp (dense)", lambda k: k["params_by_part"]["mlp"], human_count),
    ("  experts (routed)", lambda k: k["params_by_part"]["experts"], human_count),
    ("  shared experts", lambda k: k["params_by_part"]["shared_experts"], human_count),
    ("  router", lambda k: k["params_by_part"]["router"], human_count),
    ("  norms", lambda k: k["params_by_part"]["norms"], human_count),
    ("  lm_head", lambda k: k["params_by_part"]["lm_head"], human_count),
    ("  task head", lambda k: k["params_by_part"].get("head", 0), human_count),
    ("  vision encoder + projector", lambda k: k["params_by_part"].get("vision", 0), human_count),
    ("context length", lambda k: k["context_len"], lambda v: f"{v:,}"),
    ("KV cache / token (uncapped)", lambda k: k["kv_cache_bytes_per_token_uncapped"], human_bytes),
    ("KV cache / token (at context)", lambda k: k["kv_cache_bytes_per_token"], human_bytes),
    ("KV cache at context (batch 1)", lambda k: k["kv_cache_bytes_at_context"], human_bytes),
    ("cross-attention KV at context", lambda k: k["cross_kv_cache_bytes_at_context"], human_bytes),
    ("recurrent state / sequence", lambda k: k.get("state_bytes_per_sequence", 0), human_bytes),
    ("train FLOPs / token", lambda k: k["flops_per_token"], human_flops),
    ("  of which attention", lambda k: k["attention_flops_per_token"], human_flops),
    ("    of which long convolutions", lambda k: k.get("long_conv_flops_per_token", 0), human_flops),
    ("forward FLOPs / token", lambda k: k["forward_flops_per_token"], human_flops),
    ("image tokens / image", lambda k: k.get("image_tokens_per_image", 0), lambda v: f"{v:,}"),
    ("cross-attention KV / image", lambda k: k.get("cross_kv_cache_bytes_per_image", 0), human_bytes),
    ("vision forward FLOPs / image", lambda k: k.get("vision_flops_per_image", 0), human_flops),
)


def format_card(card: dict[str, Any]) -> str:
    """A readable plain-text block (also valid rich markup-free text)."""
    width = max(len(label) for label, _, _ in _ROWS)
    bpv = card.get("kv_bytes_per_value", 2)
    lines = [f"{card['name']}  (KV cache at {bpv} bytes/value, FLOPs at context {card['context_len']:,})"]
    for label, get, fmt in _ROWS:
        lines.append(f"  {label:<{width}}  {fmt(get(card))}")
    return "\n".join(lines)


def compare_table(cards: list[dict[str, Any]]) -> str:
    """Metrics as rows, models as columns, in human units."""
    if not cards:
        return ""
    header = ["metric"] + [k["name"] for k in cards]
    rows = [header] + [[label] + [fmt(get(k)) for k in cards] for label, get, fmt in _ROWS]
    widths = [max(len(r[j]) for r in rows) for j in range(len(header))]
    out = []
    for n, r in enumerate(rows):
        out.append("  ".join([r[0].ljust(widths[0])] + [cell.rjust(w) for cell, w in zip(r[1:], widths[1:])]))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def diff_configs(a: ModelConfig | str, b: ModelConfig | str) -> list[tuple[str, Any, Any]]:
    """Config fields that differ between two models, in field order: the lineage as diffs."""
    ca, cb = _as_config(a), _as_config(b)
    # moe_d_ff defaults to d_ff, so between two dense models it only echoes the d_ff difference
    dense = ca.n_experts == 0 and cb.n_experts == 0
    return [(k, va, vb) for k, (va, vb) in ca.diff(cb).items() if not (dense and k == "moe_d_ff")]


__all__ = ["cost_card", "format_card", "compare_table", "diff_configs", "param_counts",
           "kv_cache_bytes", "cross_kv_cache_bytes", "kv_values_per_token", "attention_forward_flops",
           "ssm_size", "mamba2_size", "ssm_state_bytes", "ssm_forward_flops", "long_conv_forward_flops",
           "human_count", "human", "human_bytes", "human_flops"]
