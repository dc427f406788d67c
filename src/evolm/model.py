"""The Transformer: token embeddings -> N blocks -> final norm -> LM head.

One class for every architecture of the lineage; a ``ModelConfig`` decides which parts each
block holds (see ``evolm/nn``). The forward pass is the same code for training, prefill and
cached decoding: a cache (``evolm.cache.Cache``) is passed in, never hidden in module state.
Which keys each query sees is planned outside the layers (``nn/masks.py``), so an encoder or a
prefix-LM is a ``mask_kind``, not another model.

An encoder-decoder (T5, BART, Switch: ``encoder_layers > 0``) is this class twice over: the
``encoder`` is a ``Transformer`` of the same parts with a bidirectional mask and no head, sharing
the token embedding; the decoder is this one, whose blocks also cross-attend the encoder output
(``nn/cross_attention.py``, keys/values cached once per request in ``cache/cross.py``).

A vision model (Llama 3.2 Vision: ``config.vision``) is this class with an image encoder
(``vision_model``, ``nn/vision.py``) and a projector to the text width; the text layers listed in
``vision.cross_attention_layers`` cross-attend the projected image states through the same
``CrossCache`` (computed once per request by :meth:`encode_images`) behind tanh gates.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from evolm.cache.cross import CrossCache
from evolm.config import ModelConfig
from evolm.nn.block import Block
from evolm.nn.heads import Head
from evolm.nn.loss import fused_linear_cross_entropy
from evolm.nn.masks import MaskInputs, MaskKind, image_cross_mask, plan_masks
from evolm.nn.moe import MoE, Experts, Router, pooled_router_losses
from evolm.nn.mtp import MTPLayer, mtp_loss
from evolm.nn.norm import make_norm
from evolm.nn.relative_position import RelativePositionBias
from evolm.nn.rope import RotaryEmbedding
from evolm.nn.vision import VisionEncoder


class Transformer(nn.Module):
    compiled_loss = False  # the fused loss's chunk kernels through inductor (the trainer sets it with train.compile)
    # head_loss(h, targets) -> loss, set from outside when the head's weight is split across processes
    # (evolm/parallel/tensor.py: vocabulary-parallel cross-entropy); None: the fused loss below
    head_loss = None

    def __init__(self, config: ModelConfig, shared_embedding: nn.Embedding | None = None):
        """``shared_embedding``: an encoder's token embedding, the decoder's (held, not registered,
        so the weights are saved once, under ``embed_tokens``)."""
        super().__init__()
        self.config = c = config
        if shared_embedding is None:  # a vision model's table has rows past the vocabulary (<|image|>)
            self.embed_tokens = _embedding(c.vocab_size + (c.vision.extra_token_rows if c.vision else 0), c.d_model)
        else:
            self.embed_tokens = None
            self._shared_embedding = (shared_embedding,)
        self.pos_embed = _embedding(c.max_seq_len + c.pos_offset, c.d_model) if c.pos_emb == "learned" else None
        self.type_embed = _embedding(c.type_vocab_size, c.d_model) if c.type_vocab_size else None
        self.embed_norm = make_norm(c) if c.embed_norm else None
        self.layers = nn.ModuleList(Block(c, i) for i in range(c.n_layers))
        self.norm = make_norm(c) if c.final_norm else None
        self.lm_head = None if c.tie_embeddings or c.head != "lm" else \
            nn.Linear(c.d_model, c.vocab_size, bias=c.lm_head_bias)
        self.head = Head(c) if Head.wanted(c) else None  # an encoder's heads (nn/heads.py)
        # T5's relative position biases: one table for the stack (nn/relative_position.py)
        self.rel_pos = RelativePositionBias(c, bidirectional=c.mask == "bidirectional") \
            if c.pos_emb == "relative" else None
        # an encoder-decoder's encoder: the same parts, bidirectional, sharing the token embedding
        self.encoder = Transformer(c.encoder_config(), shared_embedding=self.embed_tokens) if c.encoder_layers else None
        # a vision model's image encoder and the projector of its states to the text width (nn/vision.py)
        if c.vision is not None:
            self.vision_model = VisionEncoder(c.vision)
            self.multi_modal_projector = nn.Linear(c.vision.output_dim, c.d_model)
        else:
            self.vision_model = self.multi_modal_projector = None
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
        device = self.device
        # a model on the meta device (shapes only) gets CPU tables, recomputed on the real device
        # when its weights arrive (interop/empty.py assign_weights): arithmetic on meta tensors runs
        # Python references that import torch._dynamo, ~1.2 s of every checkpoint load
        with torch.device("cpu" if device.type == "meta" else device):
            self.rotary = RotaryEmbedding(c.rotary_dim, c.rope_theta, c.rope_scaling, c.rope_interleave)
            local = c.rope_local_theta is not None or c.rope_local_scaling is not None
            self.rotary_local = RotaryEmbedding(c.rotary_dim, c.rope_local_theta or c.rope_theta,
                                                c.rope_local_scaling, c.rope_interleave) if local else None

    @property
    def device(self) -> torch.device:
        """Where the activations are: the embedding's device (a file's blocks embedding,
        ``quant.blocks.BlockEmbedding``, says it without making its float table)."""
        e = self.token_embedding()
        return getattr(e, "device", None) or e.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The activations' dtype: what an embedding lookup returns."""
        e = self.token_embedding()
        return getattr(e, "dtype", None) or e.weight.dtype

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
        # a state-space mixer's own initialisation (nn/mamba.py; Hyena's filter MLP, nn/hyena.py), after the Linears'
        for m in self.modules():
            if hasattr(m, "reset_ssm_parameters"):
                m.reset_ssm_parameters()

    # ------------------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, cache=None, last_only: bool = False,
                doc_ids: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                logits_to_keep: int = 0, return_hidden: bool = False,
                mask_kind: MaskKind | None = None, prefix_len: int | torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, decoder_attention_mask: torch.Tensor | None = None,
                cross: CrossCache | None = None, pixel_values: torch.Tensor | None = None,
                aspect_ratio_ids: torch.Tensor | None = None, aspect_ratio_mask: torch.Tensor | None = None,
                cross_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
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

        An encoder-decoder (``encoder_layers > 0``) reads ``input_ids`` / ``attention_mask`` with
        its encoder and returns the decoder's logits (B, T_dec, vocab) for ``decoder_input_ids`` /
        ``decoder_attention_mask`` (``targets`` then align with ``decoder_input_ids``; the other
        arguments are the decoder's). ``cross``: the encoder output already computed
        (:meth:`encode`; generation passes it at every step, so the encoder runs once).

        A vision model (``config.vision``) reads images as transformers' Mllama does:
        ``pixel_values`` (B, images, tiles, C, H, W), ``aspect_ratio_ids`` (B, images) and
        ``aspect_ratio_mask`` (B, images, tiles) (see ``evolm.images``), or ``cross`` from
        :meth:`encode_images` (run once per request); ``cross_attention_mask`` (B, T, images, tiles):
        1 where a text token may see a tile (a longer one is cut to this call's tokens). Without an
        image the cross-attention layers are skipped: the text model alone.
        """
        if self.encoder is not None:
            if decoder_input_ids is None:
                raise ValueError("an encoder-decoder model needs decoder_input_ids (the decoder's tokens)")
            if cross is None:
                cross = self.encode(input_ids, attention_mask)
            input_ids, attention_mask = decoder_input_ids, decoder_attention_mask
        image_states = None
        if self.vision_model is not None and self.config.vision.fusion == "tokens":
            if cross is not None or cross_attention_mask is not None:
                raise ValueError("cross / cross_attention_mask are for vision.fusion='cross_attention'; with "
                                 "fusion='tokens' the image's states are placed at its <|image|> tokens")
            if pixel_values is not None:  # written over the placeholders after the token embedding
                image_states = self.image_states(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        elif self.vision_model is not None:
            if pixel_values is not None:
                cross = self.encode_images(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        elif self.encoder is None and (decoder_input_ids is not None or cross is not None or pixel_values is not None):
            raise ValueError("decoder_input_ids / cross are for encoder-decoder models (encoder_layers > 0), "
                             "pixel_values for vision models (config.vision)")
        B, T = input_ids.shape
        start, key_valid = self._reserve(cache, T, attention_mask, doc_ids, position_ids)
        if self.vision_model is not None and cross is not None:
            cross = self._image_view(cross, cross_attention_mask, start, T)
        if self.vision_model is not None and targets is not None:  # <|image|> & co. have no head row: never a target
            targets = targets.masked_fill(targets >= self.config.vocab_size, -100)
        if position_ids is None:
            position_ids = self.default_positions(B, T, start, attention_mask, cache, input_ids.device)
        x = self.embed(input_ids, position_ids, token_type_ids)
        if image_states is not None:
            x = self.place_image_states(x, input_ids, image_states)
        ropes = self.rope_tables(position_ids, x.dtype)
        kind = mask_kind or self.config.mask
        token_valid = attention_mask.bool() if attention_mask is not None else None
        masks = plan_masks(self.config, cache, MaskInputs(start, T, key_valid, doc_ids, kind, prefix_len, token_valid),
                           input_ids.device)
        if self.rel_pos is not None:
            masks = self.rel_pos.fold_into(masks, start, T, x.dtype)
        extra = {"cross": cross} if cross is not None else {}
        for layer, rope, (mask, is_causal) in zip(self.layers, ropes, masks):
            x = layer(x, rope, mask, is_causal, cache, **extra)
        if cache is not None:
            cache.advance(T)
        if targets is not None and self.mtp_layers is not None and self.training:
            h = self.output(x, return_hidden=True)
            extra = mtp_loss(self, h, input_ids, targets, position_ids, doc_ids)  # before the MoE losses are summed
            return self.loss_from_hidden(h, targets) + extra
        return self.output(x, last_only, logits_to_keep, return_hidden, targets, attention_mask)

    def encode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> CrossCache:
        """Run the encoder once: its final states and padding, ready for the decoder to cross-attend."""
        if self.encoder is None:
            raise ValueError("encode() needs an encoder-decoder model (encoder_layers > 0)")
        if input_ids is None:
            raise ValueError("an encoder-decoder model needs input_ids (the encoder's tokens) or cross")
        return CrossCache(self.encoder(input_ids, attention_mask=attention_mask, return_hidden=True), attention_mask)

    def encode_images(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                      aspect_ratio_mask: torch.Tensor | None = None) -> CrossCache:
        """Run the image encoder and the projector once: the image states (B, images * tiles * P, d)
        the cross-attention layers read, in a ``CrossCache`` that keeps their keys/values per layer."""
        return CrossCache(self.image_states(pixel_values, aspect_ratio_ids, aspect_ratio_mask))

    def image_states(self, pixel_values: torch.Tensor, aspect_ratio_ids: torch.Tensor,
                     aspect_ratio_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The projected image states (B, images * tiles * P, d): what the cross-attention layers
        read, or with ``fusion="tokens"`` what is written over the image's placeholder tokens."""
        if self.vision_model is None:
            raise ValueError("image_states() needs a vision model (config.vision)")
        if aspect_ratio_ids is None:
            raise ValueError("pixel_values need aspect_ratio_ids (B, images): which tiling each image has")
        states = self.vision_model(pixel_values, aspect_ratio_ids, aspect_ratio_mask)
        return self.multi_modal_projector(states).reshape(states.shape[0], -1, self.config.d_model)

    def place_image_states(self, x: torch.Tensor, input_ids: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """LLaVA's fusion: row b's image states, in order, replace the embeddings at its
        ``image_token_id`` positions (as many as the image has states); the rest of the model
        reads them like tokens, with positions and causal attention."""
        at = input_ids == self.config.vision.image_token_id
        counts = at.sum(-1)
        if bool((counts != states.shape[1]).any()):
            raise ValueError(f"each row needs one image's {states.shape[1]} <|image|> tokens "
                             f"(id {self.config.vision.image_token_id}) for its image, got {counts.tolist()}")
        return x.masked_scatter(at[..., None], states.to(x.dtype))

    def _image_view(self, cross: CrossCache, cross_attention_mask, start: int, T: int) -> CrossCache:
        """This call's view of the image cache: which image tokens each of its T text tokens sees."""
        if cross_attention_mask is None:
            return cross.restrict(None, None)
        if cross_attention_mask.shape[1] != T:
            cross_attention_mask = cross_attention_mask[:, start:start + T]
        mask, rows = image_cross_mask(cross_attention_mask, self.config.vision.patches_per_tile)
        if mask.shape[-1] != cross.memory.shape[1]:
            raise ValueError(f"cross_attention_mask covers {mask.shape[-1]} image tokens, the images have "
                             f"{cross.memory.shape[1]}: expected (batch, tokens, images, tiles) of the images given")
        return cross.restrict(mask, rows)

    def token_embedding(self) -> nn.Embedding:
        """The token embedding table: this model's, or for an encoder the decoder's it shares."""
        return self.embed_tokens if self.embed_tokens is not None else self._shared_embedding[0]

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
        x = self.token_embedding()(input_ids)
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
        if targets is not None and c.head == "lm" and c.mask == "bidirectional":
            x, targets = sparse_prediction(x, targets)
        if self.norm is not None:
            x = self.norm(x)
        if c.head_input_scale:  # T5's tied head (Mesh TensorFlow): logits of d_model ** -0.5 * h
            x = x * c.d_model ** -0.5
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
        if self.head_loss is not None:
            loss = self.head_loss(h, targets)
        else:
            w, b = self.head_weight_bias()
            loss = fused_linear_cross_entropy(h, w, targets, b, self.config.final_softcap, compiled=self.compiled_loss)
        aux = self.aux_loss()
        return loss + aux if aux is not None else loss

    def head_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The LM head's (weight, bias): the embedding matrix when tied (with BERT's own bias, if any)."""
        head = self.lm_head
        if head is None:  # tied; a vision model's extra rows (<|image|> ..) are no output
            return self.embed_tokens.weight[:self.config.vocab_size], getattr(self.head, "bias", None)
        if hasattr(head, "blocks"):  # a file's quantized blocks (evolm.quant.blocks.BlockLinear): their float32 weight
            return head.blocks.dequantize(), head.bias
        if hasattr(head, "dequantize"):  # a weight-only quantized head (evolm.quant): the weight it multiplies by
            return head.dequantize().to(self.dtype), head.bias
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
        """Sum of the MoE auxiliary losses recorded by the last training forward pass.

        With ``moe_loss_groups="sequence"`` (Switch) each stack's losses pool the router logits of
        all its MoE layers (:func:`evolm.nn.moe.pooled_router_losses`); an encoder adds its own.
        """
        c = self.config
        if c.moe_loss_groups == "sequence":
            losses = []
            for stack in (self, self.encoder):
                moes = [] if stack is None else [layer.mlp for layer in stack.layers if isinstance(layer.mlp, MoE)]
                if any(m.router_logits is not None for m in moes):
                    z, balance = pooled_router_losses([m.router_logits for m in moes])
                    losses.append(c.moe_z_loss_coef * z + c.moe_aux_loss_coef * balance)
            return sum(losses) if losses else None
        losses = [m.aux_loss for m in self.modules() if isinstance(m, MoE) and m.aux_loss is not None]
        return sum(losses) if losses else None

    def loss(self, input_ids: torch.Tensor, targets: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token cross-entropy (targets already shifted, -100 ignored) plus any MoE auxiliary loss."""
        return self(input_ids, doc_ids=doc_ids, targets=targets)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            table = self.embed_tokens  # None in an encoder that shares the decoder's (counted there)
            n -= table.weight.numel() if isinstance(table, nn.Embedding) else 0  # a blocks embedding holds buffers
            for stack in (self, self.encoder):  # an encoder-decoder's encoder has its own position table
                rel = stack.rel_pos.relative_attention_bias if stack is not None and stack.rel_pos is not None else None
                for table in (stack.pos_embed, stack.type_embed, rel) if stack is not None else ():
                    if table is not None:
                        n -= table.weight.numel()
        return n


def sparse_prediction(x: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of ``x`` (B, T, d) whose target is not ignored (-100), and their targets: (N, d), (N,).

    An encoder's masked-LM loss reads only the ~15% selected positions, so the final norm, BERT's
    transform and the vocabulary projection run there alone: ModernBERT's *sparse prediction*
    (Warner et al. 2024, arXiv:2412.13663, Sec. 2.1.2). Every step after the blocks is per-token and
    the loss is the mean over the kept rows, so the loss and its gradients are the dense head's.
    A decoder keeps the dense path: nearly every position is a target there, and the selection's
    data-dependent shape would cost an accelerator a host sync at every step.
    """
    keep = targets != -100
    return x[keep], targets[keep]


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
