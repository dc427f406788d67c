"""ModelConfig: every architectural knob of the lineage, as plain data.

A model in evolm is a `ModelConfig` turned into one `Transformer`. Each innovation of the
GPT-2 -> DeepSeek-V3 lineage is switched on by one field here; presets (``evolm.presets``) are
just instances of this dataclass. A field a preset does not set keeps its GPT-2/Llama default,
and an invalid combination fails at construction with a message naming the field.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from dataclasses import dataclass, field
from typing import Any

from evolm.inputs import describe, did_you_mean, has_type, read_json, short


class ConfigError(ValueError):
    """An invalid model configuration; the message names the offending field."""


NORMS = ("layernorm", "rmsnorm")
NORM_PLACEMENTS = ("pre", "post", "sandwich", "olmo2", "parallel", "parallel2")
POSITIONS = ("learned", "rope", "relative", "none")
ATTENTIONS = ("mha", "mla", "mamba", "hyena", "mamba2")
# mixers that keep a recurrent state instead of keys/values (cache/state.py); their "mask" is which
# new tokens are real (nn/masks.plan_masks)
RECURRENT_MIXERS = ("mamba", "hyena", "mamba2")
MASKS = ("causal", "bidirectional", "prefix")
QK_NORMS = (None, "head", "full", "l2")
MLP_TYPES = ("mlp", "glu", "none")
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")
ROUTERS = ("softmax", "sigmoid")
MOE_LOSS_GROUPS = ("layer", "sequence")
ROPE_SCALINGS = ("linear", "llama3", "yarn")
HEADS = ("lm", "classify", "token_classify", "embed")
POOLINGS = ("cls", "mean")
DERIVED = ("n_kv_heads", "head_dim", "d_ff", "moe_d_ff", "mamba_dt_rank")
# Structural caps, far above any published model (the deepest has ~130 layers, the widest MoE ~400
# experts): a config file past them is damaged, and building it would make millions of modules
# before any weight is read. Memory caps depend on the machine and live where models are built
# (``interop/empty.py``, liftable for real giant models).
MAX_INT = 2**31 - 1  # token ids, widths and lengths are indexed with int32 in torch and ggml
MAX_LAYERS = 4096
MAX_EXPERTS = 65536
FUSIONS = ("cross_attention", "tokens")  # how a vision model's text reads the image (VisionConfig.fusion)
MAX_VISION_TILES = 64  # Llama 3.2 Vision: 4 tiles of 448 px; far above any published tiling


@dataclass
class VisionConfig:
    """The image side of a Llama 3.2-Vision-style model (``ModelConfig.vision``; ``nn/vision.py``).

    A ViT (Dosovitskiy et al. 2020, arXiv:2010.11929) cuts each image into up to ``max_num_tiles``
    tiles of ``image_size`` pixels and each tile into ``patch_size`` patches; ``n_layers`` local
    blocks then ``n_global_layers`` tanh-gated global blocks read them (Llama 3 herd, arXiv:2407.21783,
    sec. 7.2), and the outputs of ``intermediate_layers`` are concatenated to the last one. A
    projector maps them to the text width, and the text layers listed in ``cross_attention_layers``
    become gated cross-attention layers that read them (Flamingo, arXiv:2204.14198).
    The names follow transformers' ``MllamaVisionConfig``.

    ``fusion="tokens"`` is the LLaVA way instead (Liu et al. 2023, arXiv:2304.08485; nanoVLM,
    SmolVLM): no cross-attention layers; the projected states of an image (one tile,
    ``image_tokens`` of them) are written over as many ``image_token_id`` placeholders in the
    token sequence, which the text layers then read like any other tokens.
    """

    d_model: int = 1280
    n_layers: int = 32
    n_global_layers: int = 8
    n_heads: int = 16
    d_ff: int = 5120
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    max_num_tiles: int = 4
    norm_eps: float = 1e-5
    activation: str = "gelu"
    intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)
    # the tilings an image may get, (rows, columns); aspect_ratio_id k names the k-th (1-based; 0: none)
    supported_aspect_ratios: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2),
                                                            (3, 1), (4, 1))
    # the text layers that cross-attend the image instead of self-attending (Mllama: every 5th from 3)
    cross_attention_layers: tuple[int, ...] = (3, 8, 13, 18, 23, 28, 33, 38)
    # rows of the token embedding past the vocabulary (Mllama: 8 reserved ids; <|image|> is the first)
    extra_token_rows: int = 8
    image_token_id: int = 128256
    # how the text reads the image: "cross_attention" (Llama 3.2) or "tokens" (LLaVA: states in the sequence)
    fusion: str = "cross_attention"

    def __post_init__(self) -> None:
        self.intermediate_layers = tuple(self.intermediate_layers)
        self.cross_attention_layers = tuple(self.cross_attention_layers)
        self.supported_aspect_ratios = tuple(tuple(r) for r in self.supported_aspect_ratios)

    @property
    def patches_per_tile(self) -> int:
        """Image tokens of one tile: its patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1

    @property
    def image_tokens(self) -> int:
        """Positions one image takes in the token sequence with ``fusion="tokens"`` (its one tile's states)."""
        return self.max_num_tiles * self.patches_per_tile

    @property
    def output_dim(self) -> int:
        """Width of the encoder's output: the last state and each intermediate one, concatenated."""
        return self.d_model * (1 + len(self.intermediate_layers))

    def validate(self, need) -> None:
        """``need(cond, field, msg)`` raises a ConfigError naming ``vision.<field>``."""
        for f in ("d_model", "n_layers", "n_heads", "d_ff", "image_size", "patch_size", "num_channels",
                  "max_num_tiles"):
            v = getattr(self, f)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0, f"vision.{f}",
                 f"must be a positive integer, got {short(v)}")
        need(isinstance(self.n_global_layers, int) and self.n_global_layers >= 0, "vision.n_global_layers",
             f"must be an integer >= 0, got {short(self.n_global_layers)}")
        need(self.n_layers + self.n_global_layers <= MAX_LAYERS, "vision.n_layers", f"exceeds {MAX_LAYERS} layers")
        need(self.max_num_tiles <= MAX_VISION_TILES, "vision.max_num_tiles",
             f"is {self.max_num_tiles}; expected at most {MAX_VISION_TILES}")
        need(self.d_model % self.n_heads == 0, "vision.n_heads",
             f"({self.n_heads}) must divide vision.d_model ({self.d_model})")
        need(self.image_size % self.patch_size == 0, "vision.patch_size",
             f"({self.patch_size}) must divide vision.image_size ({self.image_size})")
        need(self.norm_eps > 0, "vision.norm_eps", f"must be > 0, got {self.norm_eps}")
        need(self.activation in ACTIVATIONS, "vision.activation",
             f"is {self.activation!r}; expected one of {list(ACTIVATIONS)}")
        for i in self.intermediate_layers:
            need(isinstance(i, int) and 0 <= i < self.n_layers, "vision.intermediate_layers",
                 f"has layer {short(i)}; the local encoder has layers 0..{self.n_layers - 1}")
        need(len(self.supported_aspect_ratios) > 0, "vision.supported_aspect_ratios", "must list at least one tiling")
        for r in self.supported_aspect_ratios:
            need(len(r) == 2 and all(isinstance(n, int) and n > 0 for n in r) and r[0] * r[1] <= self.max_num_tiles,
                 "vision.supported_aspect_ratios",
                 f"has {short(r)}; expected (rows, columns) of at most max_num_tiles={self.max_num_tiles} tiles")
        need(self.extra_token_rows >= 0, "vision.extra_token_rows", f"must be >= 0, got {self.extra_token_rows}")
        need(self.fusion in FUSIONS, "vision.fusion", f"is {self.fusion!r}; expected one of {list(FUSIONS)}")
        if self.fusion == "tokens":
            need(not self.cross_attention_layers, "vision.cross_attention_layers",
                 f"must be empty with fusion='tokens' (the image is read as tokens), got {self.cross_attention_layers}")
            need(self.max_num_tiles == 1, "vision.max_num_tiles",
                 f"must be 1 with fusion='tokens' (an image's placeholders are one tile's states), "
                 f"got {self.max_num_tiles}")

    @classmethod
    def from_value(cls, value: Any, source: str) -> "VisionConfig":
        """A VisionConfig from itself or a dict of its fields (a config file), with a clear error."""
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: field 'vision' must be an object of VisionConfig fields, got {short(value)}")
        known = {f.name for f in dataclasses.fields(cls)}
        for k in value:
            if k not in known:
                raise ConfigError(f"{source}: unknown VisionConfig field 'vision.{k}'{did_you_mean(k, known)}")
        hints = typing.get_type_hints(cls)
        for k, v in value.items():
            if not has_type(v, hints[k]):
                raise ConfigError(f"{source}: field 'vision.{k}' must be {describe(hints[k])}, got {short(v)}")
        return cls(**value)


@dataclass
class ModelConfig:
    """All architectural choices of a transformer: a decoder, or an encoder (``mask='bidirectional'``
    with a task ``head``).

    Sizes use the field's usual names: ``d_model`` (hidden size), ``n_heads`` query heads,
    ``n_kv_heads`` key/value heads (GQA when fewer than ``n_heads``, MQA when 1), ``d_ff``
    the MLP's inner width.
    """

    name: str = "custom"
    # --- sizes -------------------------------------------------------------------------
    vocab_size: int = 50257
    d_model: int = 768
    n_layers: int = 12
    n_heads: int = 12
    n_kv_heads: int | None = None  # None -> n_heads (MHA)
    head_dim: int | None = None  # None -> d_model // n_heads
    d_ff: int | None = None  # None -> 4 * d_model
    max_seq_len: int = 1024
    # --- normalization (nn/norm.py, nn/block.py) ----------------------------------------
    norm: str = "layernorm"  # "layernorm" | "rmsnorm"
    norm_eps: float = 1e-5
    norm_bias: bool = True  # LayerNorm with an additive bias (GPT-2) or without (OLMo-1)
    norm_unit_offset: bool = False  # Gemma: RMSNorm scales by (1 + w), w initialised at 0
    # "pre" | "post" | "sandwich" | "olmo2" | "parallel" (one norm feeds attention and MLP: GPT-J, PaLM,
    # Falcon-7B) | "parallel2" (attention and MLP in parallel, each with its own norm: Falcon-40B/180B)
    norm_placement: str = "pre"
    final_norm: bool = True  # norm before the LM head (absent in post-norm GPT-1/BERT)
    # layer 0's attention norm; ModernBERT has none there (its embeddings end in a norm already)
    first_attn_norm: bool = True
    # --- positions (nn/rope.py) ---------------------------------------------------------
    pos_emb: str = "learned"  # "learned" | "rope" | "none"
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None  # Gemma 3: separate base for sliding-window layers
    rotary_pct: float = 1.0  # partial rotary (GPT-NeoX, Phi): fraction of head_dim rotated
    rope_interleave: bool = False  # rotate (x0,x1),(x2,x3).. pairs (GPT-J, DeepSeek) vs halves
    rope_scaling: dict[str, Any] | None = None  # {"type": "linear"|"llama3"|"yarn", ...}
    rope_local_scaling: dict[str, Any] | None = None  # scaling for local layers (None: unscaled)
    nope_layers: tuple[int, ...] = ()  # layers that use no position at all (NoPE; Llama 4: every 4th)
    # pos_emb="relative" (T5, nn/relative_position.py): a learned bias per head and distance bucket,
    # added to the attention scores; one table per stack, shared by its layers
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    # --- attention (nn/attention.py, nn/mla.py) -----------------------------------------
    # the mixer: "mha" (covers MHA/GQA/MQA via n_kv_heads) | "mla" | "mamba" (a selective state space,
    # nn/mamba.py) | "hyena" (implicit long convolutions, nn/hyena.py)
    # | "mamba2" (SSD, nn/mamba2.py)
    attention: str = "mha"
    # hybrids (Jamba, Lieber et al. 2024, arXiv:2403.19887): the mixers of a repeating group of layers,
    # layer i's is mixer_pattern[i % len(mixer_pattern)]; each an attention kind (which must be
    # ``attention``) or a recurrent mixer ("mamba", "hyena"). Jamba-v0.1: one "mha" per 8 layers, at index 4.
    # Empty: every layer's mixer is ``attention``
    mixer_pattern: tuple[str, ...] = ()
    qkv_bias: bool = False
    o_bias: bool = False
    # None | "head" (Qwen3, Gemma 3) | "full" (OLMo 2) | "l2" (Llama 4: per head, no learned scale,
    # after RoPE and on RoPE layers only)
    qk_norm: str | None = None
    attn_softcap: float | None = None  # Gemma 2: tanh soft-capping of attention logits
    query_pre_attn_scalar: float | None = None  # scale = this ** -0.5 (Gemma); None: head_dim
    sliding_window: int | None = None  # tokens a local layer can see (incl. itself)
    # every N-th layer is global, the others local (a sliding window or chunks); 1: all local
    sliding_window_pattern: int = 1
    # the global layer opens each group of sliding_window_pattern layers (ModernBERT: layers 0, 3, 6 ..)
    # instead of closing it (Gemma 3: layers 5, 11 ..)
    global_layer_first: bool = False
    # Llama 4's chunked local attention: a local layer sees only the keys of its own chunk of this
    # many tokens (chunks counted from each row's first real token), instead of a sliding window
    attention_chunk_size: int | None = None
    # Llama 4's attention temperature tuning on NoPE layers: queries at slot p are scaled by
    # log(floor((p + 1) / attn_floor_scale) + 1) * attn_scale + 1 (arXiv:2501.19399)
    attn_temperature_tuning: bool = False
    attn_floor_scale: float = 8192.0
    attn_scale: float = 0.1
    attn_dropout: float = 0.0
    mask: str = "causal"  # nn/masks.py: "causal" (a decoder) | "bidirectional" (an encoder) | "prefix" (prefix-LM)
    # encoder-decoder (T5, BART; model.py, nn/cross_attention.py): a bidirectional encoder of this many
    # blocks, whose output every decoder block cross-attends; n_layers counts the decoder's. 0: decoder-only
    encoder_layers: int = 0
    decoder_start_token_id: int = 0  # the token a seq2seq decoder starts from (T5: pad 0; BART: eos 2)
    # multi-head latent attention (DeepSeek-V2/V3)
    q_lora_rank: int | None = None  # None -> a direct q projection
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # --- selective state space (nn/mamba.py; Mamba, Gu & Dao 2023, arXiv:2312.00752) -----
    # names as in transformers' Jamba config; Mamba's state_size / conv_kernel / expand / time_step_rank
    mamba_d_state: int = 16  # N: state size per channel
    mamba_d_conv: int = 4  # width of the causal depthwise convolution
    mamba_expand: int = 2  # inner width = expand * d_model
    mamba_dt_rank: int | None = None  # rank of the step-size projection; None -> ceil(d_model / 16)
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False  # biases on in_proj / out_proj
    # Hyena (Poli et al. 2023, arXiv:2302.10866; attention="hyena", nn/hyena.py): implicit long
    # convolutions with data-controlled gates instead of attention
    hyena_order: int = 2  # N: N + 1 projected streams, N long filters and N gates
    hyena_short_conv: int = 3  # taps of the depthwise causal convolution on the projected streams
    hyena_filter_emb: int = 33  # positional features the filter MLP reads: t and (emb - 1) / 2 frequencies (odd)
    hyena_filter_width: int = 64  # hidden width of the filter MLP (the paper code's "filter order")
    hyena_filter_depth: int = 2  # hidden width x width sine layers of the filter MLP
    hyena_filter_freq: float = 1.0  # initial frequency of the MLP's sine activations
    # the exponential window: channel filters decay to hyena_decay_target between these fractions of
    # max_seq_len (the fastest channel at hyena_decay_fast, the slowest at hyena_decay_slow)
    hyena_decay_fast: float = 0.3
    hyena_decay_slow: float = 1.5
    hyena_decay_target: float = 0.01
    # Jamba: RMSNorms on the step-size input dt and on B and C inside the mixer, which AI21 found to
    # keep large-scale training free of loss spikes (arXiv:2403.19887, 'stabilizing Mamba at large scale')
    mamba_dt_b_c_norm: bool = False
    # Mamba-2 (nn/mamba2.py, attention="mamba2"; SSD, Dao & Gu 2024): the fields above (N per head,
    # Mamba2Config's state_size / conv_kernel / expand / use_conv_bias / use_bias) and, named as in
    # transformers' FalconH1 config (Mamba2Config's head_dim / n_groups / chunk_size / time_step_*):
    mamba_d_head: int = 64  # P, channels per SSM head; heads = mamba_expand * d_model / P
    mamba_n_groups: int = 1  # groups of heads sharing B and C, like GQA's K/V groups
    mamba_chunk_size: int = 256  # tokens per SSD chunk: the scan's block size, not part of the model
    mamba_dt_min: float = 0.001  # dt's initial range (time_step_min / max / floor)
    mamba_dt_max: float = 0.1
    mamba_dt_floor: float = 1e-4
    mamba_dt_limit: tuple[float, float] | None = None  # dt is clamped to it (time_step_limit); None: (0, inf)
    # --- MLP (nn/mlp.py) ----------------------------------------------------------------
    # "mlp" (up -> act -> down) | "glu" (act(gate) * up -> down) | "none" (a mixer-only block: Mamba)
    mlp: str = "mlp"
    activation: str = "gelu_tanh"  # GELU tanh (GPT-2); "silu" + glu = SwiGLU; "gelu_tanh" + glu = GeGLU
    mlp_bias: bool = True
    # --- mixture of experts (nn/moe.py) -------------------------------------------------
    n_experts: int = 0  # 0 -> dense MLP everywhere
    n_experts_per_tok: int = 2
    moe_d_ff: int | None = None  # inner width of one routed expert (None -> d_ff)
    n_shared_experts: int = 0  # always-active experts (DeepSeekMoE), width n * moe_d_ff
    first_k_dense: int = 0  # the first k layers keep a dense MLP (DeepSeek)
    moe_layer_step: int = 1  # every N-th layer (from layer N-1) is MoE, the rest dense (Llama 4 Maverick: 2)
    moe_first_layer: int | None = None  # the first of those MoE layers (None: moe_layer_step - 1; Switch: 1)
    # Switch's expert capacity: tokens an expert takes per sequence, in order; the rest skip the layer
    # (only the residual carries them). None: no limit
    expert_capacity: int | None = None
    router: str = "softmax"  # "softmax" | "sigmoid" (DeepSeek-V3)
    router_bias: bool = False  # per-expert selection bias (DeepSeek-V3 aux-loss-free balancing)
    norm_topk_prob: bool = True  # renormalize the top-k weights to sum to 1
    router_scales_input: bool = False  # Llama 4: the routing weight scales the expert's input, not its output
    routed_scaling_factor: float = 1.0
    n_expert_groups: int = 1  # group-limited routing (DeepSeek-V3: 8 groups)
    topk_groups: int = 1  # groups a token may route to
    moe_aux_loss_coef: float = 0.0  # Switch/GShard load-balancing loss
    moe_z_loss_coef: float = 0.0  # ST-MoE router z-loss
    # "layer": each MoE layer's losses over its own tokens, summed over layers; "sequence" (Switch
    # Transformer as transformers computes it): per stack, the tokens of all MoE layers pooled, and
    # the balancing loss taken per sequence and averaged
    moe_loss_groups: str = "layer"
    # --- multi-token prediction (nn/mtp.py) ---------------------------------------------
    mtp_depth: int = 0  # D sequential MTP modules (DeepSeek-V3: 1); 0: next-token prediction only
    mtp_loss_weight: float = 0.3  # lambda of the MTP loss (DeepSeek-V3: 0.3, later 0.1); training only
    # --- embeddings and head (model.py) -------------------------------------------------
    tie_embeddings: bool = True
    embed_scale: bool = False  # Gemma: multiply embeddings by sqrt(d_model)
    head_input_scale: bool = False  # T5 (Mesh TensorFlow): scale the head's input by d_model ** -0.5
    # a norm right after the embedding sum (BERT, RoBERTa, ModernBERT; BART's layernorm_embedding)
    embed_norm: bool = False
    type_vocab_size: int = 0  # BERT's token-type (segment A/B) embeddings; 0: none
    # learned positions: the table row of position p is p + pos_offset (RoBERTa, BART: 2), so the
    # table has max_seq_len + pos_offset rows
    pos_offset: int = 0
    # default positions count only the real tokens of each row of attention_mask (RoBERTa's
    # create_position_ids_from_input_ids), instead of the slots 0..T-1
    positions_from_mask: bool = False
    final_softcap: float | None = None  # Gemma 2: tanh soft-capping of the output logits
    lm_head_bias: bool = False  # a bias on the vocabulary projection (BERT's MLM decoder: also when tied)
    # --- task heads (nn/heads.py) -------------------------------------------------------
    # what forward returns: "lm" vocabulary logits (B, T, V) (next-token for a decoder, masked-token
    # for an encoder) | "classify" (B, num_labels) | "token_classify" (B, T, num_labels) | "embed" (B, d)
    head: str = "lm"
    head_transform: bool = False  # BERT's prediction-head transform dense -> act -> norm before the head
    head_activation: str | None = None  # the transform's activation (None: activation)
    head_dense_bias: bool = True  # the transform's dense layer has a bias (ModernBERT: classifier_bias)
    pooling: str = "cls"  # what "classify" and "embed" read: the first token, or the mean of the real ones
    pooler: bool = False  # BERT's pooler: dense + tanh over the pooled vector before the classifier
    num_labels: int = 2  # classes of "classify" / "token_classify"
    head_dropout: float = 0.0  # before the classifier (BERT: hidden_dropout_prob; ModernBERT: classifier_dropout)
    embd_dropout: float = 0.0
    resid_dropout: float = 0.0
    init_std: float = 0.02
    # --- images (nn/vision.py): a ViT encoder, a projector and gated cross-attention layers ----
    vision: VisionConfig | None = None
    # free-form facts about a published model (not architecture): citation, HF id
    meta: dict[str, Any] = field(default_factory=dict, compare=False)

    # ------------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        if self.vision is not None:
            self.vision = VisionConfig.from_value(self.vision, f"ModelConfig '{short(self.name)}'")
        # fields left unset are derived; replace() derives them again from the new values
        object.__setattr__(self, "_derived", {f for f in DERIVED if getattr(self, f) is None})
        self._check_types()
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None and isinstance(self.n_heads, int) and self.n_heads > 0:
            if self.d_model % self.n_heads != 0:
                raise ConfigError(
                    f"ModelConfig '{self.name}': field 'n_heads' ({self.n_heads}) must divide "
                    f"d_model ({self.d_model}), or set head_dim explicitly")
            self.head_dim = self.d_model // self.n_heads
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        if self.moe_d_ff is None:
            self.moe_d_ff = self.d_ff
        if self.mamba_dt_rank is None and isinstance(self.d_model, int):
            self.mamba_dt_rank = -(-self.d_model // 16)
        self.nope_layers = tuple(self.nope_layers)
        self.mixer_pattern = tuple(self.mixer_pattern)
        if self.mamba_dt_limit is not None:
            self.mamba_dt_limit = tuple(self.mamba_dt_limit)
        self.validate()

    def _check_types(self) -> None:
        """Every field has its declared type and a sane size, before any arithmetic on it (a
        config file can hold ``"d_model": "9"`` or ``"n_layers": 1e18``)."""
        def need(cond: bool, fieldname: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"ModelConfig '{short(self.name)}': field '{fieldname}' {msg}")

        for f, hint in _field_types().items():
            v = getattr(self, f)
            if f == "vision":
                need(v is None or isinstance(v, VisionConfig), f, f"must be a VisionConfig or None, got {short(v)}")
                continue
            need(has_type(v, hint), f, f"must be {describe(hint)}, got {short(v)}")
            if isinstance(v, int) and not isinstance(v, bool):
                need(abs(v) <= MAX_INT, f, f"is {v}; expected at most {MAX_INT}")
        need(self.n_layers <= MAX_LAYERS, "n_layers", f"is {self.n_layers}; expected at most {MAX_LAYERS}")
        need(self.n_experts <= MAX_EXPERTS, "n_experts", f"is {self.n_experts}; expected at most {MAX_EXPERTS}")
        for fname in ("rope_scaling", "rope_local_scaling"):
            sc = getattr(self, fname)
            bad = {k: v for k, v in (sc or {}).items() if k != "type" and not has_type(v, float | bool)}
            need(not bad, fname, f"values must be finite numbers, got {short(bad)}")

    # ------------------------------------------------------------------------------------
    def validate(self) -> None:
        def need(cond: bool, fieldname: str, msg: str) -> None:
            if not cond:
                raise ConfigError(f"ModelConfig '{self.name}': field '{fieldname}' {msg}")

        self._check_types()

        def choice(fieldname: str, options: tuple) -> None:
            value = getattr(self, fieldname)
            need(value in options, fieldname, f"is {value!r}; expected one of {list(options)}")

        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len"):
            v = getattr(self, f)
            need(isinstance(v, int) and v > 0, f, f"must be a positive integer, got {v!r}")
        choice("norm", NORMS)
        choice("norm_placement", NORM_PLACEMENTS)
        choice("pos_emb", POSITIONS)
        choice("attention", ATTENTIONS)
        self._validate_mixer_pattern(need)
        choice("mask", MASKS)
        choice("qk_norm", QK_NORMS)
        choice("mlp", MLP_TYPES)
        choice("activation", ACTIVATIONS)
        choice("router", ROUTERS)
        choice("moe_loss_groups", MOE_LOSS_GROUPS)
        self._validate_seq2seq(need)
        self._validate_vision(need)
        self._validate_mamba(need)
        choice("head", HEADS)
        choice("pooling", POOLINGS)
        if self.head_activation is not None:
            choice("head_activation", ACTIVATIONS)
        need(self.num_labels > 0, "num_labels", f"must be positive, got {self.num_labels}")
        need(0.0 <= self.head_dropout < 1.0, "head_dropout", "must be in [0, 1)")
        need(self.head == "lm" or self.mask == "bidirectional", "head",
             f"{self.head!r} reads a whole sequence; it needs mask='bidirectional' (an encoder)")
        need(not self.pooler or self.head == "classify", "pooler", "needs head='classify'")
        need(self.first_attn_norm or self.norm_placement == "pre", "first_attn_norm",
             f"False (ModernBERT) needs norm_placement='pre', got {self.norm_placement!r}")
        need(self.type_vocab_size >= 0, "type_vocab_size", f"must be >= 0, got {self.type_vocab_size}")
        need(self.pos_offset >= 0, "pos_offset", f"must be >= 0, got {self.pos_offset}")
        need(self.pos_offset == 0 or self.pos_emb == "learned", "pos_offset",
             f"({self.pos_offset}) shifts a learned position table, but pos_emb is {self.pos_emb!r}")
        need(self.norm_eps > 0, "norm_eps", f"must be > 0, got {self.norm_eps}")
        need(not (self.norm_unit_offset and self.norm != "rmsnorm"), "norm_unit_offset",
             "(Gemma's (1 + w) scale) needs norm='rmsnorm'")
        need(self.n_kv_heads > 0, "n_kv_heads", f"must be positive, got {self.n_kv_heads}")
        need(self.n_heads % self.n_kv_heads == 0, "n_kv_heads",
             f"({self.n_kv_heads}) must divide n_heads ({self.n_heads}) for grouped-query attention")
        need(self.head_dim is not None and self.head_dim > 0, "head_dim",
             f"must be positive; with head_dim unset, n_heads ({self.n_heads}) must divide "
             f"d_model ({self.d_model})")
        need(self.d_ff > 0, "d_ff", f"must be positive, got {self.d_ff}")
        need(0.0 < self.rotary_pct <= 1.0, "rotary_pct", f"must be in (0, 1], got {self.rotary_pct}")
        if self.pos_emb == "rope" and self.attention == "mha":
            rot = self.rotary_dim
            need(rot % 2 == 0 and rot > 0, "rotary_pct",
                 f"gives {rot} rotary dims of head_dim {self.head_dim}; must be a positive even number")
        need(self.rope_theta > 0, "rope_theta", f"must be > 0, got {self.rope_theta}")
        for fname in ("rope_scaling", "rope_local_scaling"):
            sc = getattr(self, fname)
            if sc is not None:
                need(isinstance(sc, dict) and sc.get("type") in ROPE_SCALINGS, fname,
                     f"must be a dict with 'type' in {list(ROPE_SCALINGS)}, got {sc!r}")
                need(float(sc.get("factor", 1.0)) >= 1.0 or sc["type"] == "linear", fname,
                     f"factor must be >= 1, got {sc.get('factor')}")
                if sc["type"] in ("llama3", "yarn"):
                    need("original_max_seq_len" in sc, fname,
                         f"of type {sc['type']!r} needs 'original_max_seq_len'")
        need(self.pos_emb == "rope" or (self.rope_scaling is None and self.rope_local_theta is None),
             "rope_scaling", f"is set but pos_emb is {self.pos_emb!r}, not 'rope'")
        for i in self.nope_layers:
            need(0 <= i < self.n_layers, "nope_layers", f"has layer {i}; model has {self.n_layers} layers")
        if self.sliding_window is not None:
            need(self.sliding_window > 0, "sliding_window", f"must be positive, got {self.sliding_window}")
        need(self.sliding_window_pattern >= 1, "sliding_window_pattern",
             f"must be >= 1, got {self.sliding_window_pattern}")
        if self.attention_chunk_size is not None:
            need(self.attention_chunk_size > 0, "attention_chunk_size",
                 f"must be positive, got {self.attention_chunk_size}")
            need(self.sliding_window is None, "attention_chunk_size",
                 "and sliding_window are both set; local layers use one or the other")
        need(self.sliding_window_pattern == 1 or self.sliding_window is not None
             or self.attention_chunk_size is not None, "sliding_window",
             f"is unset but sliding_window_pattern={self.sliding_window_pattern} asks for local layers")
        if self.attn_temperature_tuning:
            need(self.attn_floor_scale > 0, "attn_floor_scale", f"must be > 0, got {self.attn_floor_scale}")
        need(self.rope_local_theta is None or self.sliding_window is not None, "rope_local_theta",
             "is set but there are no local (sliding_window) layers to use it")
        if self.attn_softcap is not None:
            need(self.attn_softcap > 0, "attn_softcap", f"must be > 0, got {self.attn_softcap}")
        if self.final_softcap is not None:
            need(self.final_softcap > 0, "final_softcap", f"must be > 0, got {self.final_softcap}")
        need(0.0 <= self.attn_dropout < 1.0, "attn_dropout", "must be in [0, 1)")
        if self.attention == "mla":
            need(self.kv_lora_rank > 0, "kv_lora_rank", "must be positive for attention='mla'")
            need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim",
                 f"must be a positive even number for attention='mla', got {self.qk_rope_head_dim}")
            need(self.v_head_dim > 0, "v_head_dim", "must be positive for attention='mla'")
            need(self.qk_nope_head_dim >= 0, "qk_nope_head_dim", "must be >= 0")
            need(self.pos_emb == "rope", "pos_emb", "must be 'rope' for attention='mla' (decoupled RoPE)")
            need(self.qk_norm is None, "qk_norm", "is not supported with attention='mla'")
            if self.q_lora_rank is not None:
                need(self.q_lora_rank > 0, "q_lora_rank", "must be positive or None")
        if any(self.layer_mixer(i) == "hyena" for i in range(self.n_layers)):
            self._validate_hyena(need)
        if any(self.layer_mixer(i) == "mamba2" for i in range(self.n_layers)):
            self._validate_mamba2(need)
        need(isinstance(self.mtp_depth, int) and self.mtp_depth >= 0, "mtp_depth",
             f"must be an integer >= 0, got {self.mtp_depth!r}")
        need(self.mtp_loss_weight >= 0, "mtp_loss_weight", f"must be >= 0, got {self.mtp_loss_weight}")
        need(self.mtp_depth == 0 or (self.mask == "causal" and self.pos_emb != "learned"), "mtp_depth",
             "(multi-token prediction) needs a causal decoder without learned positions")
        if self.n_experts:
            need(self.n_experts > 0, "n_experts", f"must be >= 0, got {self.n_experts}")
            need(1 <= self.n_experts_per_tok <= self.n_experts, "n_experts_per_tok",
                 f"({self.n_experts_per_tok}) must be between 1 and n_experts ({self.n_experts})")
            need(self.n_experts % self.n_expert_groups == 0, "n_expert_groups",
                 f"({self.n_expert_groups}) must divide n_experts ({self.n_experts})")
            need(1 <= self.topk_groups <= self.n_expert_groups, "topk_groups",
                 f"({self.topk_groups}) must be between 1 and n_expert_groups ({self.n_expert_groups})")
            need(self.n_experts_per_tok <= self.topk_groups * (self.n_experts // self.n_expert_groups),
                 "n_experts_per_tok", "exceeds the experts reachable in topk_groups groups")
            need(0 <= self.first_k_dense <= self.n_layers, "first_k_dense",
                 f"must be between 0 and n_layers ({self.n_layers})")
            need(self.moe_d_ff > 0, "moe_d_ff", "must be positive")
            need(self.moe_layer_step >= 1, "moe_layer_step", f"must be >= 1, got {self.moe_layer_step}")
        else:
            need(self.n_shared_experts == 0, "n_shared_experts", "needs n_experts > 0")
            need(not self.router_bias, "router_bias", "needs n_experts > 0")

    def _validate_mixer_pattern(self, need) -> None:
        """A hybrid's pattern names known mixers, and one attention kind: the ``attention`` field,
        whose sizes (heads, MLA ranks) the attention layers take."""
        for j, m in enumerate(self.mixer_pattern):
            need(m in ATTENTIONS, "mixer_pattern", f"entry {j} is {m!r}; expected one of {list(ATTENTIONS)}")
            need(m in RECURRENT_MIXERS or m == self.attention, "mixer_pattern",
                 f"entry {j} is {m!r}, an attention kind other than attention={self.attention!r}; the "
                 f"attention layers of a hybrid are all of the kind 'attention' names")

    def _validate_mamba(self, need) -> None:
        """The selective-state-space fields, where any layer's mixer is one (attention='mamba', or mixer_pattern)."""
        need(not self.mamba_dt_b_c_norm or any(self.layer_mixer(i) == "mamba" for i in range(self.n_layers)),
             "mamba_dt_b_c_norm", "is set but no layer's mixer is 'mamba'")
        if not any(self.layer_is_recurrent(i) for i in range(self.n_layers)):
            need(self.mlp != "none", "mlp", "'none' (a mixer-only block) is for state-space mixers (attention='mamba')")
            return
        ssm = next(self.layer_mixer(i) for i in range(self.n_layers) if self.layer_is_recurrent(i))
        for f in ("mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_dt_rank"):
            v = getattr(self, f)
            need(v > 0, f, f"must be a positive integer, got {v!r}")
        need(self.mask == "causal", "mask",
             f"is {self.mask!r}; a state-space mixer ({ssm!r}) scans left to right: 'causal' only")
        need(self.encoder_layers == 0, "encoder_layers", f"must be 0 with a state-space mixer ({ssm!r})")
        need(self.pos_emb != "relative", "pos_emb",
             f"'relative' biases attention scores; a state-space mixer ({ssm!r}) has none")
        need(self.mtp_depth == 0, "mtp_depth", f"is not supported with a state-space mixer ({ssm!r})")
        need(self.n_experts == 0 or self.mlp != "none", "mlp", "'none' leaves no place for the experts (n_experts > 0)")

    def _validate_hyena(self, need) -> None:
        """Hyena's fields (nn/hyena.py), and what a causal long convolution cannot do."""
        need(1 <= self.hyena_order <= 8, "hyena_order", f"must be between 1 and 8, got {self.hyena_order}")
        need(self.hyena_short_conv >= 1, "hyena_short_conv", f"must be >= 1 taps, got {self.hyena_short_conv}")
        need(self.hyena_filter_emb >= 3 and self.hyena_filter_emb % 2 == 1, "hyena_filter_emb",
             f"must be an odd number >= 3 (t, then cosine and sine of each frequency), got {self.hyena_filter_emb}")
        need(self.hyena_filter_width >= 1, "hyena_filter_width", f"must be >= 1, got {self.hyena_filter_width}")
        need(self.hyena_filter_depth >= 0, "hyena_filter_depth", f"must be >= 0, got {self.hyena_filter_depth}")
        need(self.hyena_filter_freq > 0, "hyena_filter_freq", f"must be > 0, got {self.hyena_filter_freq}")
        need(0 < self.hyena_decay_fast <= self.hyena_decay_slow, "hyena_decay_fast",
             f"must be > 0 and <= hyena_decay_slow ({self.hyena_decay_slow}), got {self.hyena_decay_fast}")
        need(0 < self.hyena_decay_target < 1, "hyena_decay_target",
             f"must be in (0, 1), got {self.hyena_decay_target}")
        need(self.sliding_window is None and self.attention_chunk_size is None, "sliding_window",
             "(or attention_chunk_size) is set; attention='hyena' has no window (its filters span max_seq_len)")
        # causal only, no encoder, no MTP: as every recurrent mixer (_validate_mamba)

    def _validate_mamba2(self, need) -> None:
        """The SSD mixer's sizes (nn/mamba2.py), as transformers' Mamba2Config checks them and more."""
        for f in ("mamba_d_state", "mamba_d_conv", "mamba_expand", "mamba_d_head", "mamba_n_groups",
                  "mamba_chunk_size"):
            need(getattr(self, f) > 0, f, f"must be positive for attention='mamba2', got {getattr(self, f)}")
        inner = self.mamba_expand * self.d_model
        need(inner % self.mamba_d_head == 0, "mamba_d_head",
             f"({self.mamba_d_head}) must divide the inner width mamba_expand * d_model = {inner}")
        heads = inner // self.mamba_d_head
        need(heads % self.mamba_n_groups == 0, "mamba_n_groups",
             f"({self.mamba_n_groups}) must divide the SSM heads (mamba_expand * d_model / mamba_d_head = {heads})")
        need(0 < self.mamba_dt_min <= self.mamba_dt_max, "mamba_dt_min",
             f"({self.mamba_dt_min}) must be > 0 and <= mamba_dt_max ({self.mamba_dt_max})")
        need(self.mamba_dt_floor > 0, "mamba_dt_floor", f"must be > 0, got {self.mamba_dt_floor}")
        lim = self.mamba_dt_limit
        need(lim is None or 0 <= lim[0] < lim[1], "mamba_dt_limit",
             f"must be (low, high) with 0 <= low < high, got {lim!r}")
        attends = any(self.layer_mixer(i) not in RECURRENT_MIXERS for i in range(self.n_layers))
        need(self.pos_emb != "rope" or attends, "pos_emb",  # in a hybrid, the attention layers read RoPE
             "is 'rope' but a Mamba-2 mixer reads no positions (use 'none', or 'learned' for absolute ones)")

    def _validate_seq2seq(self, need) -> None:
        """The encoder-decoder and relative-position fields (T5, BART, Switch)."""
        need(self.encoder_layers >= 0, "encoder_layers", f"must be >= 0, got {self.encoder_layers}")
        if self.encoder_layers:
            need(self.mask == "causal", "mask", "must be 'causal' (the decoder) when encoder_layers > 0")
            need(self.mtp_depth == 0, "mtp_depth", "is not supported with an encoder (encoder_layers > 0)")
            need(self.qk_norm is None, "qk_norm", "is not supported with cross-attention (encoder_layers > 0)")
            need(self.attention == "mha", "attention", "must be 'mha' with cross-attention (encoder_layers > 0)")
        if self.pos_emb == "relative":
            need(self.relative_attention_num_buckets >= 4, "relative_attention_num_buckets",
                 f"must be >= 4, got {self.relative_attention_num_buckets}")
            need(self.relative_attention_max_distance > self.relative_attention_num_buckets // 4,
                 "relative_attention_max_distance", "must exceed relative_attention_num_buckets // 4")
            need(self.attn_softcap is None, "attn_softcap", "is not supported with pos_emb='relative'")
        if self.moe_first_layer is not None:
            need(self.moe_first_layer >= 0, "moe_first_layer", f"must be >= 0, got {self.moe_first_layer}")
        if self.expert_capacity is not None:
            need(self.expert_capacity > 0, "expert_capacity", f"must be positive, got {self.expert_capacity}")
            need(self.n_experts_per_tok == 1, "expert_capacity", "(Switch's) needs top-1 routing (n_experts_per_tok=1)")

    def _validate_vision(self, need) -> None:
        """A vision model: a causal Llama-style decoder whose listed layers cross-attend the image."""
        v = self.vision
        if v is None:
            return
        v.validate(need)
        need(self.mask == "causal" and self.encoder_layers == 0, "vision",
             "needs a decoder-only text model (mask='causal', encoder_layers=0)")
        need(v.fusion == "tokens" or (self.norm_placement == "pre" and self.attention == "mha"), "vision",
             f"cross-attention layers need norm_placement='pre' and attention='mha', "
             f"got {self.norm_placement!r} and {self.attention!r}")
        need(self.head == "lm" and self.mtp_depth == 0, "vision", "needs head='lm' and no multi-token prediction")
        for i in v.cross_attention_layers:
            need(isinstance(i, int) and 0 <= i < self.n_layers, "vision.cross_attention_layers",
                 f"has layer {short(i)}; the text model has layers 0..{self.n_layers - 1}")
        need(len(set(v.cross_attention_layers)) == len(v.cross_attention_layers), "vision.cross_attention_layers",
             "lists a layer twice")

    def layer_is_cross(self, i: int) -> bool:
        """Whether text layer i is a gated cross-attention layer (a vision model's; Mllama)."""
        return self.vision is not None and i in self.vision.cross_attention_layers

    def encoder_config(self) -> "ModelConfig":
        """The encoder stack of an encoder-decoder model: the same parts, ``encoder_layers`` blocks,
        bidirectional, no cross-attention and no head of its own."""
        return self.replace(name=f"{self.name}-encoder", n_layers=self.encoder_layers, encoder_layers=0,
                            mask="bidirectional", tie_embeddings=True, lm_head_bias=False, head_input_scale=False)

    # --- derived quantities ---------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        """Number of head dimensions that RoPE rotates (partial rotary keeps the rest)."""
        if self.attention == "mla":
            return self.qk_rope_head_dim
        return int(self.head_dim * self.rotary_pct) // 2 * 2

    def layer_is_local(self, i: int) -> bool:
        """True if layer i attends locally: a sliding window (Gemma 2: every other layer, Gemma 3: 5 of
        6, ModernBERT: 2 of 3 after a global first) or chunks (Llama 4: 3 of 4)."""
        if self.sliding_window is None and self.attention_chunk_size is None:
            return False
        return (i if self.global_layer_first else i + 1) % self.sliding_window_pattern != 0 \
            or self.sliding_window_pattern == 1

    def layer_window(self, i: int) -> int | None:
        return self.sliding_window if self.layer_is_local(i) else None

    def layer_chunk(self, i: int) -> int | None:
        """Layer i's attention chunk (Llama 4's local layers), None where it is not chunked."""
        return self.attention_chunk_size if self.layer_is_local(i) else None

    def layer_kv_span(self, i: int) -> int | None:
        """The most recent slots layer i can ever attend (its window or chunk): what its cache must
        keep; None for a global layer."""
        return self.layer_window(i) or self.layer_chunk(i)

    def layer_is_moe(self, i: int) -> bool:
        first = self.moe_layer_step - 1 if self.moe_first_layer is None else self.moe_first_layer
        return self.n_experts > 0 and i >= max(self.first_k_dense, first) and (i - first) % self.moe_layer_step == 0

    def layer_qk_norm(self, i: int) -> str | None:
        """Layer i's QK-norm: Llama 4's weightless "l2" norm is on RoPE layers only."""
        return None if self.qk_norm == "l2" and not self.layer_uses_rope(i) else self.qk_norm

    def layer_temperature_tuned(self, i: int) -> bool:
        """Whether layer i scales its queries by position (Llama 4: the NoPE layers)."""
        return self.attn_temperature_tuning and not self.layer_uses_rope(i)

    def layer_mixer(self, i: int) -> str:
        """Layer i's mixer kind (nn/block.py's MIXERS): ``mixer_pattern`` repeated, or ``attention``."""
        p = self.mixer_pattern
        return p[i % len(p)] if p else self.attention

    def layer_is_recurrent(self, i: int) -> bool:
        """Layer i keeps a recurrent state, not keys/values (cache/state.py)."""
        return self.layer_mixer(i) in RECURRENT_MIXERS

    def layer_uses_rope(self, i: int) -> bool:
        return self.pos_emb == "rope" and i not in self.nope_layers

    # --- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["nope_layers"] = list(self.nope_layers)
        d["mixer_pattern"] = list(self.mixer_pattern)
        if self.vision is not None:
            d["vision"] = json.loads(json.dumps(d["vision"]))  # tuples as JSON lists
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config") -> "ModelConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source}: expected a JSON object of ModelConfig fields, got {short(d)}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = [k for k in d if k not in known]
        if unknown:
            k = unknown[0]
            raise ConfigError(f"{source}: unknown ModelConfig field '{k}'{did_you_mean(k, known)}")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, path: str) -> "ModelConfig":
        return cls.from_dict(read_json(path, ConfigError), source=path)

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again); derived sizes follow the change.

        A field the original config derived (head_dim, d_ff, n_kv_heads, moe_d_ff) is derived
        again unless ``changes`` sets it.
        """
        unknown = [k for k in changes if k not in {f.name for f in dataclasses.fields(self)}]
        if unknown:
            hint = did_you_mean(unknown[0], [f.name for f in dataclasses.fields(self)])
            raise ConfigError(f"ModelConfig '{self.name}': unknown field '{unknown[0]}'{hint}")
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for f in getattr(self, "_derived", ()):
            d[f] = None
        d.update(changes)
        return ModelConfig(**d)

    def diff(self, other: "ModelConfig") -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: the lineage as diffs."""
        a, b = self.to_dict(), other.to_dict()
        return {k: (a[k], b[k]) for k in a if k not in ("name", "meta") and a[k] != b[k]}


@functools.lru_cache(maxsize=1)
def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(ModelConfig)


__all__ = ["ModelConfig", "VisionConfig", "ConfigError"]
