"""Attention masks, planned once per forward call, outside the model.

Which keys a query may see is the one thing that separates the model kinds of the lineage:

- ``causal`` (GPT, Llama, every decoder): a token sees itself and the tokens before it;
- ``bidirectional`` (BERT, RoBERTa, an encoder; Devlin et al. 2018, arXiv:1810.04805): every token
  sees every real token, so an encoder is this mask choice over the same blocks;
- ``prefix`` (prefix-LM: UniLM, Dong et al. 2019, arXiv:1905.03197; T5's prefix-LM objective,
  Raffel et al. 2019, arXiv:1910.10683): the first ``prefix_len`` tokens see each other both
  ways, the rest is causal;

and on top of the kind, per layer or per batch:

- a sliding window (Longformer, Beltagy et al. 2020, arXiv:2004.05150; Mistral, Gemma 2/3):
  causal layers look back fewer than ``window`` slots; bidirectional ones see ``window // 2``
  slots each way (ModernBERT's local attention);
- chunks (Llama 4's local layers): the sequence is cut into chunks of ``chunk`` tokens counted
  from each row's first real token (as transformers counts them under left padding), and a query
  sees only the keys of its own chunk, so the first query of a chunk sees itself alone;
- padding (``attention_mask``: 0 for padding tokens, recorded per slot by the cache);
- packed documents (``doc_ids``): a token sees only its own document.

``plan_masks`` turns a config, a cache and these inputs into one ``(mask, is_causal)`` per layer,
built once per distinct (window, key layout) and shared; where the kernel's ``is_causal`` flag is
enough (plain causal attention over the new tokens alone) no mask tensor is built at all.

A recurrent (state-space) layer has no keys to mask: it reads every earlier token through its
state, causal by construction. Its "mask" is which of the new tokens are real, (B, T) bool or None
(all real), so it can keep padding out of its state (transformers' Mamba zeroes padded positions).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from evolm.config import MASKS as MASK_KINDS  # ModelConfig.mask takes the same names

MaskKind = Literal["causal", "bidirectional", "prefix"]


def attention_mask(q_slots: torch.Tensor, k_slots: torch.Tensor, key_valid: torch.Tensor | None,
                   window: int | None, doc_ids: torch.Tensor | None = None, kind: MaskKind = "causal",
                   prefix_len: int | torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """Boolean mask (B or 1, 1, Tq, Tk): True where a query may attend a key.

    ``q_slots`` (Tq,) and ``k_slots`` (Tk,) are absolute cache slots (-1 marks an empty ring
    entry). ``key_valid`` (B, n_slots) marks real (non-padding) tokens by slot. Causality and the
    window are counted in slots, as the references do. A padding query that would see nothing
    sees itself, so no row is all-masked (its output is never used); one that sees real tokens
    sees just those, as transformers lets it. ``doc_ids`` (B, T) isolates
    packed documents (no cache in that case). ``prefix_len`` (int or (B,)) is the length of the
    bidirectional prefix of ``kind="prefix"``. ``chunk``: keep only keys in the query's chunk
    (:func:`same_chunk`).
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"mask kind {kind!r}: expected one of {', '.join(MASK_KINDS)}")
    diff = q_slots[:, None] - k_slots[None, :]
    if kind == "bidirectional":
        mask = (k_slots >= 0)[None, :].expand_as(diff)
        if window is not None:
            mask = mask & (diff.abs() <= window // 2)
    else:
        mask = (diff >= 0) & (k_slots >= 0)[None, :]
        if window is not None:
            mask = mask & (diff < window)
    mask = mask[None, None]
    if kind == "prefix":
        mask = mask | _in_prefix(q_slots, k_slots, prefix_len)
    if chunk is not None:
        mask = mask & same_chunk(q_slots, k_slots, chunk, key_valid)
    if key_valid is not None:
        mask = mask & key_valid[:, k_slots.clamp(min=0)][:, None, None, :]
        # only a query that sees no real token sees itself: a padding query after real tokens sees
        # those, as transformers lets it (Switch routes padding too, so its state takes capacity)
        mask = mask | ((diff == 0)[None, None] & ~mask.any(-1, keepdim=True))
    if doc_ids is not None:
        mask = mask & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
    return mask


def padded_tiles_mask(tiles_valid: torch.Tensor, n_real: int, n_slots: int) -> torch.Tensor:
    """(N, 1, L, L) boolean mask of a tiled image encoder (Llama 3.2 Vision, ``nn/vision.py``).

    ``tiles_valid`` (N, tiles): the tiles an image uses; each tile holds ``n_slots`` slots of which
    the first ``n_real`` are tokens (the rest pad to a multiple of 8). As in Meta's reference and
    transformers' ``MllamaVisionModel``, a key is hidden only when the query *and* the key are both
    padding, so real tokens also see the (zero) padding states. A query that would see nothing (an
    image with no tile) sees itself, so no row is all-masked.
    """
    N, T = tiles_valid.shape
    real = torch.arange(n_slots, device=tiles_valid.device) < n_real
    valid = (tiles_valid[:, :, None] & real[None, None, :]).reshape(N, T * n_slots)
    mask = valid[:, :, None] | valid[:, None, :]
    mask = mask | (torch.eye(T * n_slots, dtype=torch.bool, device=mask.device) & ~mask.any(-1, keepdim=True))
    return mask[:, None]


def image_cross_mask(cross_attention_mask: torch.Tensor, tokens_per_tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A vision model's text-to-image mask (Llama 3.2 Vision): ``cross_attention_mask`` (B, T, images,
    tiles), 1 where a text token may see a tile -> (B, 1, T, S) boolean over the S image tokens,
    and the rows (B, T, 1) that see any. As transformers' Mllama does, a text token that may see
    no tile (one before the first image) attends every image token, and its layer's MLP update is
    dropped (``rows`` 0; ``nn/block.py``)."""
    B, T = cross_attention_mask.shape[:2]
    visible = cross_attention_mask.bool().reshape(B, T, -1).repeat_interleave(tokens_per_tile, dim=-1)
    rows = visible.any(-1, keepdim=True)
    return (visible | ~rows)[:, None], rows


def same_chunk(q_slots: torch.Tensor, k_slots: torch.Tensor, chunk: int,
               key_valid: torch.Tensor | None) -> torch.Tensor:
    """(B or 1, 1, Tq, Tk): the key lies in the query's chunk of ``chunk`` slots. Chunks start at each
    row's first real token: the slots before it (left padding, False in ``key_valid``) are
    counted out, as transformers' ``create_chunked_causal_mask`` does."""
    lead = torch.zeros(1, dtype=torch.long, device=q_slots.device) if key_valid is None else \
        (key_valid.long().cumsum(-1) == 0).sum(-1)
    lead = lead.reshape(-1, 1, 1, 1)
    q = torch.div(q_slots[None, None, :, None] - lead, chunk, rounding_mode="floor")
    k = torch.div(k_slots[None, None, None, :] - lead, chunk, rounding_mode="floor")
    return q == k


def _in_prefix(q_slots: torch.Tensor, k_slots: torch.Tensor, prefix_len) -> torch.Tensor:
    """(B or 1, 1, Tq, Tk): both the query and the key lie in the bidirectional prefix."""
    if prefix_len is None:
        raise ValueError("mask kind 'prefix' needs prefix_len (an int, or one per row)")
    n = torch.as_tensor(prefix_len, device=q_slots.device).reshape(-1, 1, 1, 1)
    q_in = q_slots[None, None, :, None] < n
    k_in = (k_slots >= 0)[None, None, None, :] & (k_slots[None, None, None, :] < n)
    return q_in & k_in


@dataclass(frozen=True)
class MaskInputs:
    """What decides the masks of one forward call (everything but the layers' own windows)."""

    start: int                                 # slot of the first new token
    n_new: int                                 # new tokens in this call
    key_valid: torch.Tensor | None = None      # (B, n_slots) False on padding slots
    doc_ids: torch.Tensor | None = None        # (B, T) packed-document ids
    kind: MaskKind = "causal"
    prefix_len: int | torch.Tensor | None = None
    token_valid: torch.Tensor | None = None    # (B, T) False on this call's padding tokens (recurrent layers)


def plan_masks(config, cache, inputs: MaskInputs, device) -> list[tuple[torch.Tensor | None, bool]]:
    """One ``(mask, is_causal)`` per layer of ``config``, shared by layers with the same window,
    chunk and key layout (a Gemma 3 model builds two masks for 18 layers, a Llama model none)."""
    static = cache is not None and cache.static
    plans: dict = {}
    out = []
    for i in range(config.n_layers):
        if config.layer_is_recurrent(i):
            out.append(_plan_recurrent(config, inputs, static))
            continue
        window, chunk = config.layer_window(i), config.layer_chunk(i)
        layout = cache.key_layout(i) if cache is not None else None
        if layout is None and not static and inputs.kind == "causal":
            # a window reaching further back than the sequence, or a chunk holding all of it
            # (counted from the first real token, so from slot 0 at the latest): plain causal
            if window is not None and inputs.start + inputs.n_new <= window:
                window = None
            if chunk is not None and inputs.start + inputs.n_new <= chunk:
                chunk = None
        if (window, chunk, layout) not in plans:
            plans[window, chunk, layout] = (cache.mask(window, inputs.n_new, chunk), False) if static else \
                _plan_one(cache, inputs, window, layout, device, chunk)
        out.append(plans[window, chunk, layout])
    return out


def _plan_recurrent(config, inputs: MaskInputs, static: bool) -> tuple[torch.Tensor | None, bool]:
    """A recurrent layer's plan: the validity of the new tokens (None: all real; a compiled decode
    step feeds real tokens only)."""
    if inputs.doc_ids is not None:
        ssm = next(config.layer_mixer(i) for i in range(config.n_layers) if config.layer_is_recurrent(i))
        raise ValueError(f"doc_ids (packed documents) with a {ssm!r} mixer: a state-space "
                         f"layer would carry its state across documents; train on unpacked rows")
    if inputs.kind != "causal":
        raise ValueError(f"mask kind {inputs.kind!r} with a state-space layer: it scans left to right (causal only)")
    return (None if static else inputs.token_valid), False


def plan_mask(cache, inputs: MaskInputs, device, window: int | None = None):
    """The ``(mask, is_causal)`` of one extra layer outside ``config.n_layers`` (a multi-token
    prediction block) that keeps the plain slot layout, with this sliding ``window`` (None: global)."""
    return _plan_one(cache, inputs, window, None, device)


def _plan_one(cache, inputs: MaskInputs, window: int | None, layout, device, chunk: int | None = None):
    start, T = inputs.start, inputs.n_new
    k_slots = cache.key_slots(layout, T, device) if cache is not None else None
    plain = k_slots is None and inputs.key_valid is None and inputs.doc_ids is None and window is None \
        and chunk is None
    if plain and inputs.kind == "causal" and (start == 0 or T == 1):
        return None, start == 0 and T > 1  # the kernel's causal flag, or one query that sees all
    if plain and inputs.kind == "bidirectional":
        return None, False  # every key, no mask
    if k_slots is None:
        k_slots = torch.arange(start + T, device=device)
    q_slots = torch.arange(start, start + T, device=device)
    return attention_mask(q_slots, k_slots, inputs.key_valid, window, inputs.doc_ids,
                          inputs.kind, inputs.prefix_len, chunk), False
