"""The Transformer: token embeddings -> N blocks -> final norm -> LM head.

One class for every architecture of the lineage; a ``ModelConfig`` decides which parts each
block holds (see ``evolm/nn``). The forward pass is the same code for training, prefill and
cached decoding: a cache (``evolm.cache.Cache``) is passed in, never hidden in module state.
Which keys each query sees is planned outside the layers (``nn/masks.py``), so an encoder or a
prefix-LM is a ``mask_kind``, not another model.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from evolm.config import ModelConfig
from evolm.nn.block import Block
from evolm.nn.heads import Head
from evolm.nn.loss import fused_linear_cross_entropy
from evolm.nn.masks import MaskInputs, MaskKind, plan_masks
from evolm.nn.moe import MoE, Experts, Router
from evolm.nn.mtp import MTPLayer, mtp_loss
from evolm.nn.norm import make_norm
from evolm.nn.rope import RotaryEmbedding


class Transformer(nn.Module):
    compiled_loss = False  # the fused loss's chunk kernels through inductor (the trainer sets it with train.compile)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = c = config
        self.embed_tokens = _embedding(c.vocab_size, c.d_model)
        self.pos_embed = _embedding(c.max_seq_len + c.pos_offset, c.d_model) if c.pos_emb == "learned" else None
        self.type_embed = _embedding(c.type_vocab_size, c.d_model) if c.type_vocab_size else None
        self.embed_norm = make_norm(c) if c.embed_norm else None
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.n_layers))
        self.norm = make_norm(c) if c.final_norm else None
        self.lm_head = None if c.tie_embeddings or c.head != "lm" else \
            nn.Linear(c.d_model, c.vocab_size, bias=c.lm_head_bias)
        self.head = Head(c) if Head.wanted(c) else None  # an encoder's heads (nn/heads.py)
        # DeepSeek-V3's multi-token prediction modules (nn/mtp.py): their construction draws no
        # numbers from the global generator and they are initialised last, so the main model's
        # weights are the same with or without them
        with torch.random.fork_rng(devices=[]):
            self.mtp_layers = nn.ModuleList(MTPLayer(c, k) for k in range(c.mtp_depth)) if c.mtp_depth else None
        self.reset_buffers()
        if not any(p.is_meta for p in self.parameters()):
            self.reset_parameters()

    def reset_buffers(self) -> None:
        """(Re)compute the RoPE tables; they are derived from the config, never stored in files."""
        c = self.config
        if c.pos_emb != "rope":
            return
        device = self.embed_tokens.weight.device
        # a model on the meta device (shapes only) gets CPU tables, recomputed on the real device
        # when its weights arrive (interop/empty.py assign_weights): arithmetic on meta tensors runs
        # Python references that import torch._dynamo, ~1.2 s of every checkpoint load
        with torch.device("cpu" if device.type == "meta" else device):
            self.rotary = RotaryEmbedding(c.rotary_dim, c.rope_theta, c.rope_scaling, c.rope_interleave)
            local = c.rope_local_theta is not None or c.rope_local_scaling is not None
            self.rotary_local = RotaryEmbedding(c.rotary_dim, c.rope_local_theta or c.rope_theta,
                                                c.rope_local_scaling, c.rope_interleave) if local else None

    # ------------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual output projections scaled by 1/sqrt(2L)."""
        std = self.config.init_std
        resid_std = std / math.sqrt(2 * self.config.n_layers)
        for name, m in self.named_modules():
            if isinstance(m, nn.Linear):
                is_out = name.endswith(("o_proj", "down_proj"))
                nn.init.normal_(m.weight, 0.0, resid_std if is_out else std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, Router):
                nn.init.normal_(m.weight, 0.0, std)
            elif isinstance(m, Experts):
                nn.init.normal_(m.gate_up_proj, 0.0, std)
                nn.init.normal_(m.down_proj, 0.0, resid_std)
            elif hasattr(m, "weight") and isinstance(getattr(m, "weight", None), nn.Parameter) \
                    and m.weight.ndim == 1:  # norms
                if getattr(m, "unit_offset", False):
                    nn.init.zeros_(m.weight)
                else:
                    nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache=None, last_only: bool = False,
                doc_ids: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                logits_to_keep: int = 0, return_hidden: bool = False,
                mask_kind: MaskKind | None = None, prefix_len: int | torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, vocab), or (B, 1, vocab) with ``last_only``.

        ``logits_to_keep=k > 0``: logits of the last k positions only, (B, k, vocab) (transformers'
        argument of that name): scoring a completion needs no head over its prompt.
        ``return_hidden``: the final-normed hidden states instead of logits, for losses fused with
        the head (``head_weight_bias()``; see ``nn/loss.py``).

        With ``targets`` (B, T; -100 = ignore) it returns the mean next-token cross-entropy (plus any
        MoE auxiliary loss, and in training mode the multi-token prediction loss when
        ``mtp_depth > 0``) instead, fused with the head so the full logits never exist.

        ``attention_mask`` (B, T): 1 for real tokens, 0 for padding. ``position_ids`` (B, T)
        default to the cache slots (0..T-1 without a cache). ``cache``: any ``evolm.cache.Cache``.
        ``doc_ids`` (B, T): packed-document ids; attention stays inside each document.
        ``mask_kind``: ``causal`` (a decoder), ``bidirectional`` (an encoder) or ``prefix``
        (prefix-LM, with ``prefix_len``); None: the config's ``mask``. See ``nn/masks.py``.
        ``token_type_ids`` (B, T): BERT's segment ids (default 0) when ``type_vocab_size > 0``.
        """
        B, T = input_ids.shape
        start, key_valid = self._reserve(cache, T, attention_mask, doc_ids, position_ids)
        if position_ids is None:
            position_ids = self.default_positions(B, T, start, attention_mask, cache, input_ids.device)
        x = self.embed(input_ids, position_ids, token_type_ids)
        ropes = self.rope_tables(position_ids, x.dtype)
        kind = mask_kind or self.config.mask
        masks = plan_masks(self.config, cache, MaskInputs(start, T, key_valid, doc_ids, kind, prefix_len),
                           input_ids.device)
        for layer, rope, (mask, is_causal) in zip(self.layers, ropes, masks):
            x = layer(x, rope, mask, is_causal, cache)
        if cache is not None:
            cache.advance(T)
        if targets is not None and self.mtp_layers is not None and self.training:
            h = self.output(x, return_hidden=True)
            extra = mtp_loss(self, h, input_ids, targets, position_ids, doc_ids)  # before the MoE losses are summed
            return self.loss_from_hidden(h, targets) + extra
        return self.output(x, last_only, logits_to_keep, return_hidden, targets, attention_mask)

    def _reserve(self, cache, T: int, attention_mask, doc_ids, position_ids) -> tuple[int, torch.Tensor | None]:
        """The first new slot and the key validity by slot; checks what a cache cannot take."""
        if doc_ids is not None and cache is not None:
            raise ValueError("doc_ids (document-masked packing) is for training; it cannot be used with a cache")
        # a cache in static mode keeps its position in a tensor, so that a compiled decode step
        # reads no Python number that changes from token to token (see evolm/cache/kv.py)
        static = cache is not None and cache.static
        if static and position_ids is None:
            raise ValueError("a StaticKVCache in static mode needs explicit position_ids")
        start = cache.length if cache is not None and not static else 0
        if self.pos_embed is not None and not static and start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} tokens exceeds max_seq_len={self.config.max_seq_len} "
                             f"of learned position embeddings")
        if cache is not None:
            return start, cache.reserve(T, attention_mask)
        return start, attention_mask.bool() if attention_mask is not None else None

    def default_positions(self, B: int, T: int, start: int, attention_mask, cache, device) -> torch.Tensor:
        """Position ids when the caller gives none: the slots start..start+T-1, or with
        ``positions_from_mask`` the count of real tokens before each one (RoBERTa), so that a
        left-padded row starts at position 0 like an unpadded one. Padding gets position -1 (the
        row below the first, RoBERTa's padding row), clamped to the table."""
        if not self.config.positions_from_mask or attention_mask is None:
            return torch.arange(start, start + T, device=device).expand(B, T)
        if cache is not None:
            raise ValueError("positions_from_mask counts real tokens of one call; with a cache pass position_ids")
        m = attention_mask.long()
        return (m.cumsum(-1) * m - 1).clamp(min=-self.config.pos_offset)

    def embed(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings (+ learned positions, + token types), normed, scaled and dropped out as
        the config says.

        BERT (Devlin et al. 2018, arXiv:1810.04805) adds a segment embedding (``type_vocab_size``)
        and normalises the sum (``embed_norm``); RoBERTa (arXiv:1907.11692) and BART shift the
        position table by ``pos_offset``; ModernBERT (arXiv:2412.13663) norms the token embedding alone.
        """
        c = self.config
        x = self.embed_tokens(input_ids)
        if c.embed_scale:  # Gemma: sqrt(d), rounded to the activation dtype as the reference does
            x = x * torch.tensor(c.d_model ** 0.5, dtype=x.dtype)
        if self.type_embed is not None:
            x = x + (self.type_embed(token_type_ids) if token_type_ids is not None else self.type_embed.weight[0])
        elif token_type_ids is not None:
            raise ValueError("token_type_ids given, but the model has no token-type embeddings (type_vocab_size=0)")
        if self.pos_embed is not None:
            x = x + self.pos_embed(position_ids + c.pos_offset if c.pos_offset else position_ids)
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        if c.embd_dropout:
            x = F.dropout(x, c.embd_dropout, self.training)
        return x

    def rope_tables(self, position_ids: torch.Tensor, dtype: torch.dtype) -> list:
        """Each layer's (cos, sin), or None for a layer without RoPE; local layers may have their own base."""
        c = self.config
        if c.pos_emb != "rope":
            return [None] * c.n_layers
        rope_global = self.rotary(position_ids, dtype)
        rope_local = self.rotary_local(position_ids, dtype) if self.rotary_local is not None else rope_global
        return [None if not c.layer_uses_rope(i) else rope_local if c.layer_is_local(i) else rope_global
                for i in range(c.n_layers)]

    def output(self, x: torch.Tensor, last_only: bool = False, logits_to_keep: int = 0,
               return_hidden: bool = False, targets: torch.Tensor | None = None,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final norm, then logits, the hidden states, or the loss against ``targets``; a task head
        (``config.head``, nn/heads.py) instead gives its own output (or loss) from the normed states."""
        c = self.config
        if c.head != "lm" and (last_only or logits_to_keep):
            raise ValueError(f"last_only / logits_to_keep select vocabulary logits; head={c.head!r} has none")
        if last_only:  # prefill for generation needs only the next-token distribution
            x = x[:, -1:]
        elif logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        if self.norm is not None:
            x = self.norm(x)
        if c.head != "lm":
            if return_hidden:
                return x
            out = self.head(x, attention_mask, targets)
            aux = self.aux_loss() if targets is not None else None  # an MoE encoder's balancing losses
            return out + aux if aux is not None else out
        if c.head_transform:  # BERT's MLM transform: the hidden states the vocabulary projection reads
            x = self.head.transform(x)
        if return_hidden:
            return x
        if targets is not None:
            return self.loss_from_hidden(x, targets)
        logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, *self.head_weight_bias())
        if c.final_softcap is not None:
            logits = c.final_softcap * torch.tanh(logits / c.final_softcap)
        return logits

    def loss_from_hidden(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Next-token cross-entropy of the final-normed states ``h``, plus any MoE auxiliary loss."""
        w, b = self.head_weight_bias()
        loss = fused_linear_cross_entropy(h, w, targets, b, self.config.final_softcap, compiled=self.compiled_loss)
        aux = self.aux_loss()
        return loss + aux if aux is not None else loss

    def head_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's (weight, bias): the embedding matrix when tied (with BERT's own bias, if any)."""
        head = self.lm_head
        if head is None:
            return self.embed_tokens.weight, getattr(self.head, "bias", None)
        if hasattr(head, "blocks"):  # a file's quantized blocks (evolm.quant.blocks.BlockLinear): their float32 weight
            return head.blocks.dequantize(), head.bias
        if hasattr(head, "dequantize"):  # a weight-only quantized head (evolm.quant): the weight it multiplies by
            return head.dequantize().to(self.embed_tokens.weight.dtype), head.bias
        return head.weight, head.bias

    # ------------------------------------------------------------------------------------
    def fuse_for_inference(self) -> "Transformer":
        """Fuse q/k/v and gate/up projections into single matmuls, for decoding; returns self.

        Same outputs up to float summation order; fewer, larger kernels per token (at batch 1 the
        three attention projections are three small matrix-vector products). Inference only: the
        parameter names change (``qkv_proj``, ``gate_up_proj``), so load, train and save before
        fusing. MLA layers and MoE experts are left as they are.
        """
        from evolm.nn.attention import Attention
        from evolm.nn.mlp import MLP

        for m in self.modules():
            if isinstance(m, Attention):
                m.fuse_qkv()
            elif isinstance(m, MLP):
                m.fuse_gate_up()
        return self

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the MoE auxiliary losses recorded by the last training forward pass."""
        losses = [m.aux_loss for m in self.modules() if isinstance(m, MoE) and m.aux_loss is not None]
        return sum(losses) if losses else None

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token cross-entropy (targets already shifted, -100 ignored) plus any MoE auxiliary loss."""
        return self(input_ids, doc_ids=doc_ids, targets=targets)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.embed_tokens.weight.numel()
            for table in (self.pos_embed, self.type_embed):
                if table is not None:
                    n -= table.weight.numel()
        return n


def _embedding(n: int, d: int) -> nn.Embedding:
    """``nn.Embedding(n, d)`` as torch builds it (N(0, 1) weights, the same random draws), except on
    the meta device, where it stays uninitialised: ``normal_`` of a meta tensor runs a Python
    reference that imports ``torch._dynamo`` (~1.2 s at every load of a checkpoint)."""
    w = torch.empty(n, d)
    if not w.is_meta:
        nn.init.normal_(w)
    return nn.Embedding(n, d, _weight=w)


def build(config: ModelConfig | str, device: str | torch.device | None = None,
          dtype: torch.dtype | None = None) -> Transformer:
    """Build a model from a config or preset name; ``device='meta'`` allocates nothing."""
    if isinstance(config, str):
        from evolm.presets import get_preset
        config = get_preset(config)
    with torch.device(device or "cpu"):
        model = Transformer(config)
    return model.to(dtype) if dtype is not None else model
