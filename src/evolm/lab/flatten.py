"""`evolm arch flatten`: any config as one readable, evolm-free PyTorch file.

For teaching and for forking one architecture: evolm's single ``Transformer`` serves every
family through config fields, which is the right shape for a library and the wrong one for
reading a paper next to the code. ``flatten(config)`` writes a nanoGPT-style file holding only the
parts a config uses (a Llama config gets RMSNorm, RoPE with its scaling, GQA attention, SwiGLU and
a pre-norm block; nothing of MoE, MLA or soft-capping), with the config's values baked in as the
defaults of a ``Config`` dataclass and ``Transformer.forward(input_ids) -> logits``.

The file is assembled from the per-innovation templates of ``flatten_parts.py``, each chosen by a
config field. Module and parameter names are evolm's, so the file loads an evolm state dict
directly; tests check its logits equal evolm's. A config field no template covers yet raises
``FlattenError`` naming the field: the file is exact or it is not written.
"""

from __future__ import annotations

import dataclasses
import re

from evolm.config import ConfigError, ModelConfig
from evolm.lab import flatten_parts as P


class FlattenError(ConfigError):
    """The config uses something no flatten template writes yet; the message names the field."""


# fields whose every value the templates write; any other field must keep its default
COVERED = {
    "name", "meta", "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
    "max_seq_len", "norm", "norm_eps", "norm_bias", "norm_unit_offset", "norm_placement", "final_norm",
    "pos_emb", "rope_theta", "rope_local_theta", "rotary_pct", "rope_interleave", "rope_scaling",
    "rope_local_scaling", "nope_layers", "attention", "qkv_bias", "o_bias", "qk_norm", "attn_softcap",
    "query_pre_attn_scalar", "sliding_window", "sliding_window_pattern", "q_lora_rank", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "mlp", "activation", "mlp_bias", "n_experts",
    "n_experts_per_tok", "moe_d_ff", "n_shared_experts", "first_k_dense", "router", "router_bias",
    "norm_topk_prob", "routed_scaling_factor", "n_expert_groups", "topk_groups", "tie_embeddings",
    "embed_scale", "final_softcap", "lm_head_bias", "init_std",
}
# fields the templates write only at one value (the flattened file is an inference-shaped causal decoder)
ONLY = {
    "mask": ("causal", "flatten writes causal decoders; a bidirectional or prefix-LM mask has no template yet"),
    "attn_dropout": (0.0, "training-time dropout has no template yet"),
    "resid_dropout": (0.0, "training-time dropout has no template yet"),
    "embd_dropout": (0.0, "training-time dropout has no template yet"),
    "moe_aux_loss_coef": (0.0, "the MoE load-balancing loss has no template yet (the file returns logits only)"),
    "moe_z_loss_coef": (0.0, "the router z-loss has no template yet (the file returns logits only)"),
}
# mixers with no template, and the prefix of the fields that only they read (mamba_dt_rank is
# derived from d_model, so it differs from its default in every config)
MIXER_FIELDS = {"mamba": "mamba_", "hyena": "hyena_"}


def check_supported(c: ModelConfig) -> None:
    """Raise ``FlattenError`` naming the first field the templates cannot write exactly."""
    for fname, (value, why) in ONLY.items():
        if getattr(c, fname) != value:
            raise FlattenError(f"ModelConfig '{c.name}': field '{fname}' is {getattr(c, fname)!r}; "
                               f"flatten needs {value!r}: {why}")
    if c.attention in MIXER_FIELDS:
        raise FlattenError(f"ModelConfig '{c.name}': field 'attention' is {c.attention!r}; that mixer "
                           "has no flatten template yet")
    if c.qk_norm == "l2":
        raise FlattenError(f"ModelConfig '{c.name}': field 'qk_norm' is 'l2'; Llama 4's weightless QK-norm "
                           "has no flatten template yet")
    if c.lm_head_bias and c.tie_embeddings:
        raise FlattenError(f"ModelConfig '{c.name}': field 'lm_head_bias' is True with tied embeddings; the bias "
                           "of a tied head (BERT's decoder) has no flatten template yet")
    for f in dataclasses.fields(ModelConfig):
        if f.name in COVERED or f.name in ONLY or f.name.startswith(tuple(MIXER_FIELDS.values())):
            continue  # a mixer's own fields (mamba_*, hyena_*) matter only with that mixer, refused above
        if f.default is dataclasses.MISSING or getattr(c, f.name) != f.default:
            raise FlattenError(f"ModelConfig '{c.name}': field '{f.name}' ({getattr(c, f.name)!r}) "
                               f"is not covered by a flatten template yet")


# --- template filling -------------------------------------------------------------------------
def fill(template: str, **slots: str) -> str:
    """Fill ``<<slot>>`` markers: a marker alone on a line takes a block at that indentation (an
    empty one removes the line), then markers inside lines (also in inserted blocks) take text."""
    lines = []
    for line in template.split("\n"):
        key = line.strip()[2:-2]
        if line.strip() == f"<<{key}>>" and key in slots:
            indent = line[: len(line) - len(line.lstrip())]
            lines.extend(indent + ln if ln else "" for ln in slots[key].split("\n") if slots[key])
        else:
            lines.append(line)
    text = "\n".join(lines)
    for key, value in slots.items():
        text = text.replace(f"<<{key}>>", value)
    left = re.search(r"<<\w+>>", text)
    if left:
        raise RuntimeError(f"flatten template slot {left.group(0)} was not filled")
    return text


def lines(*items: str | None) -> str:
    return "\n".join(i for i in items if i)


# --- one function per part of the diagram ----------------------------------------------------
def norm_parts(c: ModelConfig) -> list[tuple[str, str]]:
    """The block norm, aliased ``Norm``; MLA's latent norms are always plain RMSNorm."""
    parts = []
    if c.norm == "layernorm":
        bias, doc = ("nn.Parameter(torch.zeros(dim))", ", then shift by a learned bias (GPT-2)") if c.norm_bias \
            else ("None", " (no additive bias, as OLMo-1)")
        parts.append(("LayerNorm", fill(P.LAYERNORM, bias=bias, bias_doc=doc)))
        cls = "LayerNorm"
    elif c.norm_unit_offset:
        parts.append(("RMSNorm with Gemma's (1 + w) scale", P.OFFSET_RMSNORM))
        cls = "OffsetRMSNorm"
    else:
        parts.append(("RMSNorm", P.RMSNORM))
        cls = "RMSNorm"
    if c.attention == "mla" and cls != "RMSNorm":
        parts.append(("", P.RMSNORM))
    parts.append(("", fill(P.NORM_ALIAS, cls=cls)))
    return parts


def _uses_local_rope(c: ModelConfig) -> bool:
    return c.sliding_window is not None and (c.rope_local_theta is not None or c.rope_local_scaling is not None)


def rope_parts(c: ModelConfig) -> list[tuple[str, str]]:
    """RoPE frequencies, the scalings the config names, the rotary table and the rotation."""
    if c.pos_emb != "rope":
        return []
    scalings = [s["type"] for s in (c.rope_scaling, c.rope_local_scaling if _uses_local_rope(c) else None) if s]
    scalings = list(dict.fromkeys(scalings))
    code = [P.ROPE_FREQUENCIES]
    code += [{"linear": P.ROPE_LINEAR, "llama3": P.ROPE_LLAMA3, "yarn": P.ROPE_YARN}[s] for s in scalings]
    entries = ", ".join(f'"{s}": {s}_scaling' for s in scalings)
    code.append(fill(P.ROPE_SCALING_TABLE, entries=entries))
    if c.attention == "mla" and _yarn_softmax(c):
        code.append(P.YARN_SOFTMAX_SCALE)
    code.append(P.ROTARY)
    code.append(P.ROPE_INTERLEAVED if c.rope_interleave else P.ROPE_HALVES)
    if _partial_rotary(c):
        code.append(P.ROPE_PARTIAL)
    label = "RoPE" + (f" ({', '.join(scalings)} scaling)" if scalings else "") + \
        (", interleaved pairs" if c.rope_interleave else "") + (", partial rotary" if _partial_rotary(c) else "")
    return [(label, "\n".join(part.rstrip("\n") + "\n" for part in code))]


def _partial_rotary(c: ModelConfig) -> bool:
    return c.attention == "mha" and c.rotary_dim < c.head_dim


def _yarn_softmax(c: ModelConfig) -> bool:
    s = c.rope_scaling
    return bool(s and s["type"] == "yarn" and s.get("mscale_all_dim"))


def _windows(c: ModelConfig) -> bool:
    return c.sliding_window is not None


def mask_parts(c: ModelConfig) -> list[tuple[str, str]]:
    """The causal mask (with sliding windows where the config has them) and the attention kernel."""
    mask = (f"sliding window ({c.sliding_window} tokens; 1 global layer in {c.sliding_window_pattern})"
            if c.sliding_window_pattern > 1 else f"sliding window ({c.sliding_window} tokens)") \
        if _windows(c) else ""
    attend = ("attention logit soft-capping", P.ATTEND_SOFTCAP) if c.attn_softcap is not None else ("", P.ATTEND)
    return [(mask, P.WINDOWED_MASK if _windows(c) else P.CAUSAL_MASK), attend]


def _rope_lines(c: ModelConfig, pairs: str) -> str:
    """Rotate ``pairs`` ("q, k" names) by the layer's table; NoPE layers get None."""
    fn = "apply_partial_rope" if _partial_rotary(c) else "apply_rope"
    a, b = (s.strip() for s in pairs.split(","))
    rotate = f"{a}, {b} = {fn}({a}, *rope), {fn}({b}, *rope)"
    if c.nope_layers:
        return f"if rope is not None:  # None on the NoPE layers\n    {rotate}"
    return rotate


def _shared_attention_slots(c: ModelConfig, default_scale: str) -> dict[str, str]:
    base = f"c.query_pre_attn_scalar ** -0.5" if c.query_pre_attn_scalar else f"{default_scale} ** -0.5"
    if c.attention == "mla" and _yarn_softmax(c):
        base += " * yarn_softmax_scale(c.rope_scaling)"
    init = lines(f"self.scale = {base}",
                 "self.softcap = c.attn_softcap" if c.attn_softcap is not None else None,
                 "self.window = layer_window(c, layer_idx)" if _windows(c) else None)
    rope = c.pos_emb == "rope"
    return dict(init=init, rope_param=", rope" if rope else "",
                mask="causal_mask(T, self.window, x.device)" if _windows(c) else "causal_mask(T, x.device)",
                softcap_arg=", self.softcap" if c.attn_softcap is not None else "")


def attention_parts(c: ModelConfig) -> list[tuple[str, str]]:
    if c.attention == "mla":
        return [("multi-head latent attention (MLA)", mla_part(c))]
    kind = "MHA" if c.n_kv_heads == c.n_heads else "MQA" if c.n_kv_heads == 1 else "GQA"
    heads = f"{c.n_heads} query heads, {c.n_kv_heads} key/value heads"
    extras = [f"QK-norm ({'per head' if c.qk_norm == 'head' else 'over the whole projection'})"] if c.qk_norm else []
    slots = _shared_attention_slots(c, "c.head_dim")
    if c.qk_norm == "head":
        slots["init"] = lines("self.q_norm, self.k_norm = Norm(c.head_dim, c), Norm(c.head_dim, c)  # QK-norm",
                              slots["init"])
    elif c.qk_norm == "full":
        slots["init"] = lines("self.q_norm = Norm(c.n_heads * c.head_dim, c)  # QK-norm over the whole projection",
                              "self.k_norm = Norm(c.n_kv_heads * c.head_dim, c)", slots["init"])
    qk = "q, k = self.q_norm(q), self.k_norm(k)"
    doc = f"Causal self-attention, {kind} ({heads})" + "".join(f", {e}" for e in extras) + "."
    code = fill(P.ATTENTION, doc=doc, full_qk_norm=qk if c.qk_norm == "full" else "",
                head_qk_norm=qk if c.qk_norm == "head" else "",
                rope=_rope_lines(c, "q, k") if c.pos_emb == "rope" else "", **slots)
    return [(f"{kind} attention ({heads})" + "".join(f", {e}" for e in extras), code)]


def mla_part(c: ModelConfig) -> str:
    if c.q_lora_rank is None:
        q_init, q_expr = "self.q_proj = nn.Linear(c.d_model, c.n_heads * qk_dim, bias=False)", "self.q_proj(x)"
    else:
        q_init = lines("self.q_a_proj = nn.Linear(c.d_model, c.q_lora_rank, bias=c.qkv_bias)  # low-rank queries",
                       "self.q_a_layernorm = RMSNorm(c.q_lora_rank, c)",
                       "self.q_b_proj = nn.Linear(c.q_lora_rank, c.n_heads * qk_dim, bias=False)")
        q_expr = "self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))"
    return fill(P.MLA, q_init=q_init, q_expr=q_expr, rope=_rope_lines(c, "q_rot, k_rot"),
                **_shared_attention_slots(c, "qk_dim"))


def _mlp_name(c: ModelConfig) -> str:
    if c.mlp == "mlp":
        return f"{c.activation.replace('_', '-').upper()} MLP"
    return {"silu": "SwiGLU", "gelu_tanh": "GeGLU", "gelu": "GeGLU (exact GELU)", "relu": "ReGLU"}[c.activation]


def _needs_dense_mlp(c: ModelConfig) -> bool:
    return c.n_experts == 0 or c.first_k_dense > 0 or c.n_shared_experts > 0


def mlp_parts(c: ModelConfig) -> list[tuple[str, str]]:
    act_name = {"gelu": "gelu", "gelu_tanh": "gelu", "silu": "silu", "relu": "relu"}[c.activation]
    parts = [("", "\n" + P.ACTIVATIONS[c.activation])]
    if _needs_dense_mlp(c):
        tmpl = P.MLP_GATED if c.mlp == "glu" else P.MLP_PLAIN
        parts.append((_mlp_name(c), fill(tmpl, act=act_name, name=_mlp_name(c))))
    return parts


def moe_parts(c: ModelConfig) -> list[tuple[str, str]]:
    """Group-limited routing (if any), the router, the stacked experts and the MoE layer."""
    if not c.n_experts:
        return []
    codes = ([group_limit_part(c)] if c.n_expert_groups > 1 else []) + [router_part(c), experts_part(c), moe_part(c)]
    return [(_moe_label(c), "\n".join(code.rstrip("\n") + "\n" for code in codes))]


def group_limit_part(c: ModelConfig) -> str:
    two = c.router == "sigmoid" and c.n_experts // c.n_expert_groups > 1
    return fill(P.GROUP_LIMIT, group_score="g.topk(2, dim=-1)[0].sum(-1)" if two else "g.amax(-1)",
                rank_doc="groups ranked by the sum of their two best scores (V3)" if two
                else "groups ranked by their best score (V2)")


def router_part(c: ModelConfig) -> str:
    sigmoid = c.router == "sigmoid"
    doc = ("Sigmoid router (DeepSeek-V3): per-expert sigmoid scores" if sigmoid else
           "Softmax router (Mixtral): softmax over the expert logits") + ", top-k" + \
        (", renormalised to sum to 1" if c.norm_topk_prob else "") + "."
    bias = 'self.register_buffer("e_score_correction_bias", torch.zeros(c.n_experts))  # balancing, no gradient'
    groups = "self.n_groups, self.topk_groups = c.n_expert_groups, c.topk_groups"
    init = lines(bias if c.router_bias else None, groups if c.n_expert_groups > 1 else None)
    renorm = "w = w / (w.sum(-1, keepdim=True) + 1e-20)" if sigmoid else "w = w / w.sum(-1, keepdim=True)"
    choice = "scores + self.e_score_correction_bias  # the bias steers the choice, not the weights"
    limit = "choice = limit_to_groups(choice, self.n_groups, self.topk_groups)"
    return fill(P.ROUTER, doc=doc, init=init,
                scores="torch.sigmoid(logits)" if sigmoid else "torch.softmax(logits, dim=-1)",
                choice=choice if c.router_bias else "scores", limit=limit if c.n_expert_groups > 1 else "",
                renorm=renorm if c.norm_topk_prob else "", methods=P.ROUTER_BIAS_FLOAT32 if c.router_bias else "")


def experts_part(c: ModelConfig) -> str:
    gated = c.mlp == "glu"
    return fill(P.EXPERTS, rows="2F" if gated else "F", rows_expr="2 * c.moe_d_ff" if gated else "c.moe_d_ff",
                act="gate, up = h.chunk(2, dim=-1)\nh = act(gate) * up" if gated else "h = act(h)")


def moe_part(c: ModelConfig) -> str:
    shared = c.n_shared_experts > 0
    return fill(P.MOE, shared_doc=", plus always-active shared experts (DeepSeekMoE)" if shared else "",
                shared_init="self.shared_experts = MLP(c, d_ff=c.moe_d_ff * c.n_shared_experts)" if shared else "",
                shared_add="y = y + self.shared_experts(xf)" if shared else "")


def _moe_label(c: ModelConfig) -> str:
    extras = [", selection bias" if c.router_bias else "",
              f", {c.topk_groups} of {c.n_expert_groups} groups" if c.n_expert_groups > 1 else "",
              f", {c.n_shared_experts} shared" if c.n_shared_experts else "",
              f", first {c.first_k_dense} layers dense" if c.first_k_dense else ""]
    return f"MoE ({c.n_experts} experts, top-{c.n_experts_per_tok}, {c.router} router{''.join(extras)})"


def block_part(c: ModelConfig) -> list[tuple[str, str]]:
    placement = P.PLACEMENTS[c.norm_placement]
    mixer = "MultiHeadLatentAttention(c, layer_idx)" if c.attention == "mla" else "Attention(c, layer_idx)"
    if not c.n_experts:
        channel = "MLP(c)"
    elif c.first_k_dense:
        channel = "MoE(c) if layer_idx >= c.first_k_dense else MLP(c)"
    else:
        channel = "MoE(c)"
    code = fill(P.BLOCK_INIT, doc=placement["doc"], mixer=mixer, channel=channel,
                norms="\n".join(f"self.{n} = Norm(c.d_model, c)" for n in placement["norms"]),
                body=placement["body"], rope_param=", rope" if c.pos_emb == "rope" else "",
                rope_arg=", rope" if c.pos_emb == "rope" else "")
    return [(f"{c.norm_placement}-norm block", code)]


def _rope_init(c: ModelConfig) -> str:
    dim = "c.qk_rope_head_dim" if c.attention == "mla" else \
        "int(c.head_dim * c.rotary_pct) // 2 * 2" if _partial_rotary(c) else "c.head_dim"
    scaling = ", c.rope_scaling" if c.rope_scaling else ""
    out = [f"self.rotary = RotaryEmbedding({dim}, c.rope_theta{scaling})"]
    if _uses_local_rope(c):
        theta = "c.rope_local_theta" if c.rope_local_theta is not None else "c.rope_theta"
        lscaling = ", c.rope_local_scaling" if c.rope_local_scaling else ""
        out.append(f"self.rotary_local = RotaryEmbedding({dim}, {theta}{lscaling})  # sliding-window layers")
    return "\n".join(out)


def _per_layer_rope(c: ModelConfig) -> bool:
    return bool(c.nope_layers) or _uses_local_rope(c)


def _rope_tables(c: ModelConfig) -> str:
    expr = "(rope_local if layer_window(c, i) is not None else rope_global)" if _uses_local_rope(c) else "rope_global"
    if c.nope_layers:
        expr = f"None if i in c.nope_layers else {expr}"
    elif expr.startswith("("):
        expr = expr[1:-1]
    doc = "".join([", None on NoPE layers" if c.nope_layers else "",
                   ", the local base on sliding-window layers" if _uses_local_rope(c) else ""])
    return fill(P.ROPE_TABLES, doc=doc, per_layer=expr,
                local="rope_local = self.rotary_local(positions, dtype)" if _uses_local_rope(c) else "")


def _head_tail(c: ModelConfig) -> str:
    return ("final norm -> " if c.final_norm else "") + ("tied LM head" if c.tie_embeddings else "untied LM head") + \
        (" -> logit soft-cap" if c.final_softcap is not None else "")


def _model_init_slots(c: ModelConfig) -> dict[str, str]:
    """What ``Transformer.__init__`` holds besides the embeddings and the blocks."""
    return dict(
        pos_init="self.pos_embed = nn.Embedding(c.max_seq_len, c.d_model)  # learned absolute positions"
        if c.pos_emb == "learned" else "",
        norm_init="self.norm = Norm(c.d_model, c)" if c.final_norm else "",
        head_init="" if c.tie_embeddings else "self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=c.lm_head_bias)",
        rope_init=_rope_init(c) if c.pos_emb == "rope" else "")


def _model_forward_slots(c: ModelConfig) -> dict[str, str]:
    """``Transformer.forward``: embeddings, the rope tables, the layer loop, the head."""
    rope, per_layer = c.pos_emb == "rope", _per_layer_rope(c)
    scale = "x = x * torch.tensor(self.config.d_model ** 0.5, dtype=x.dtype)  # Gemma: scaled by sqrt(d_model)"
    positions = "x = x + self.pos_embed(torch.arange(T, device=input_ids.device))"
    tables = "ropes = self.rope_tables(T, x.dtype, x.device)" if per_layer else \
        "rope = self.rotary(torch.arange(T, device=x.device), x.dtype)"
    tied = "F.linear(x, self.embed_tokens.weight)  # tied: the head is the embedding matrix"
    cap = "logits = self.config.final_softcap * torch.tanh(logits / self.config.final_softcap)  # soft-cap"
    return dict(
        embed=lines(scale if c.embed_scale else None, positions if c.pos_emb == "learned" else None),
        rope_tables=tables if rope else "",
        loop="layer, rope in zip(self.layers, ropes)" if rope and per_layer else "layer in self.layers",
        rope_arg=", rope" if rope else "",
        final_norm="x = self.norm(x)" if c.final_norm else "",
        logits=tied if c.tie_embeddings else "self.lm_head(x)",
        softcap=cap if c.final_softcap is not None else "")


def model_part(c: ModelConfig) -> list[tuple[str, str]]:
    code = fill(P.TRANSFORMER, n_layers=str(c.n_layers), tail=_head_tail(c), **_model_init_slots(c),
                **_model_forward_slots(c))
    if c.pos_emb == "rope" and _per_layer_rope(c):
        code = code.rstrip("\n") + "\n" + "\n".join("    " + ln if ln else "" for ln in _rope_tables(c).split("\n"))
    label = ("learned positions, " if c.pos_emb == "learned" else "") + \
        ("scaled embeddings, " if c.embed_scale else "") + _head_tail(c)
    return [(label, code)]


# --- the Config dataclass: the config's values, as defaults ------------------------------------
FIELD_READ = re.compile(r"\b(?:c|self\.config)\.([a-z_]\w*)")


def config_dataclass(c: ModelConfig, body: str) -> str:
    """``@dataclass Config`` holding every ModelConfig field ``body`` reads, with c's values."""
    used = set(FIELD_READ.findall(body))
    rows = []
    for f in dataclasses.fields(ModelConfig):
        if f.name not in used:
            continue
        value = getattr(c, f.name)
        if isinstance(value, dict):
            rows.append(f"    {f.name}: dict = field(default_factory=lambda: {value!r})")
        else:
            kind = type(value).__name__ if value is not None else str(f.type).replace("dict[str, Any]", "dict")
            rows.append(f"    {f.name}: {kind} = {value!r}")
    unknown = used - {f.name for f in dataclasses.fields(ModelConfig)}
    if unknown:
        raise RuntimeError(f"flatten templates read unknown config fields: {sorted(unknown)}")
    doc = f'    """The values of evolm\'s config {c.name!r}: every field this file reads."""\n\n'
    return "\n\n@dataclass\nclass Config:\n" + doc + "\n".join(rows) + "\n"


# --- the whole file --------------------------------------------------------------------------
def flatten(config: ModelConfig) -> str:
    """The source of one PyTorch file that computes what ``evolm.model.Transformer(config)`` does."""
    c = config
    check_supported(c)
    parts = (norm_parts(c) + rope_parts(c) + mask_parts(c) + attention_parts(c) + mlp_parts(c) + moe_parts(c)
             + block_part(c) + model_part(c))
    body = "\n".join(code.rstrip("\n") + "\n" for _, code in parts)
    labels = [label for label, _ in parts if label]
    mimics = c.meta.get("mimics")
    title = f"{c.name}" + (f" (the architecture of {mimics}, small)" if mimics else "") + ", in one file."
    header = fill(P.HEADER, title=title, name=repr(c.name), parts=_wrap(", ".join(labels)))
    return header + config_dataclass(c, body) + "\n" + body + P.MAIN


def _wrap(text: str, width: int = 96) -> str:
    out, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            out.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join(out + [line])


def write_flat(config: ModelConfig, path: str) -> str:
    """Write ``flatten(config)`` to ``path``; returns the source."""
    source = flatten(config)
    with open(path, "w") as f:
        f.write(source)
    return source


__all__ = ["flatten", "write_flat", "check_supported", "FlattenError"]
