"""Multi-token prediction: DeepSeek-V3's sequential MTP modules (arXiv:2412.19437 sec. 2.2).

Each of D modules predicts one more token ahead, keeping the causal chain: module k reads the
previous depth's representation of token i and the embedding of token i+k, and predicts token
i+k+1 (Eq. 21-23)::

    h'^k_i = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1}_i)]       M_k: eh_proj, 2d -> d
    h^k_{1:T-k} = TRM_k(h'^k_{1:T-k})                               one causal Transformer block
    P^k_{i+k+1} = softmax(OutHead(h^k_i))                           shared_head.norm + the shared LM head
    L_MTP = (lambda / D) * sum_k -(1/T) sum_i log P^k_i[t_i]       (Eq. 24-25)

``h^0`` is the main model's final hidden state *after* its final norm, and the embedding comes
first in the concatenation: the paper's notation leaves the first open and writes the second the
other way round, but the released weights (``model.layers.61``: ``enorm``, ``hnorm``,
``eh_proj``, ...) are used that way by every engine that serves them (vLLM, SGLang, Megatron-LM).
The embedding and the output head are the main model's (shared, never copied). The modules
densify training signals during pretraining; at inference they can be dropped, or used to draft
tokens for self-speculative decoding (``evolm.infer.speculative``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from evolm.nn.block import Block
from evolm.nn.loss import fused_linear_cross_entropy
from evolm.nn.masks import MaskInputs, plan_mask
from evolm.nn.norm import make_norm


class SharedHead(nn.Module):
    """The MTP module's own norm before the (shared) output head; ``norm`` is the checkpoint name."""

    def __init__(self, config):
        super().__init__()
        self.norm = make_norm(config)


class MTPLayer(nn.Module):
    """Prediction depth ``depth + 1``: norms, projection M_k and block TRM_k (the names are those of
    the Hugging Face checkpoint below ``model.layers.{n_layers + depth}``; the block's own weights
    sit below ``block.``)."""

    def __init__(self, config, depth: int):
        super().__init__()
        c = config
        self.layer_idx = c.n_layers + depth  # the checkpoint's layer index; MoE or dense as that layer would be
        self.enorm = make_norm(c)
        self.hnorm = make_norm(c)
        self.eh_proj = nn.Linear(2 * c.d_model, c.d_model, bias=False)
        self.block = Block(c, self.layer_idx)
        self.shared_head = SharedHead(c)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, rope, mask, is_causal: bool, cache=None) -> torch.Tensor:
        """h (B, n, D): the previous depth's states; emb (B, n, D): embeddings of the tokens k ahead.
        Returns this depth's states h^k (before ``shared_head.norm``)."""
        x = self.eh_proj(torch.cat((self.enorm(emb), self.hnorm(h)), dim=-1))
        return self.block(x, rope, mask, is_causal, cache)


def mtp_inputs(model, position_ids: torch.Tensor, doc_ids: torch.Tensor | None, layer: MTPLayer,
               start: int = 0, cache=None):
    """(rope, mask, is_causal) of an MTP block over ``position_ids`` (B, n): a causal global layer."""
    c = model.config
    n = position_ids.shape[1]
    rope = model.rotary(position_ids, model.dtype) \
        if c.pos_emb == "rope" and c.layer_uses_rope(layer.layer_idx) else None
    mask, is_causal = plan_mask(cache, MaskInputs(start, n, None, doc_ids, "causal", None), position_ids.device,
                                c.layer_window(layer.layer_idx))
    return rope, mask, is_causal


def token_embedding(model, ids: torch.Tensor) -> torch.Tensor:
    """The shared embedding of ``ids`` (scaled as the main model scales it)."""
    x = model.embed_tokens(ids)
    if model.config.embed_scale:
        x = x * torch.tensor(model.config.d_model ** 0.5, dtype=x.dtype)
    return x


def head_logits(model, layer: MTPLayer, h: torch.Tensor) -> torch.Tensor:
    """OutHead(h^k): the module's norm, then the main model's head (and soft-cap)."""
    w, b = model.head_weight_bias()
    logits = torch.nn.functional.linear(layer.shared_head.norm(h), w, b)
    cap = model.config.final_softcap
    return cap * torch.tanh(logits / cap) if cap is not None else logits


def mtp_loss(model, h: torch.Tensor, input_ids: torch.Tensor, targets: torch.Tensor,
             position_ids: torch.Tensor, doc_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``(lambda / D) * sum_k L^k`` (Eq. 25) over a training batch.

    ``h`` (B, T, D): the main model's final-normed states; ``targets[:, i]`` is token i+1
    (-100: ignored). Depth k embeds ``input_ids[:, i+k]`` and predicts ``targets[:, i+k]`` for
    i < T-k; as in Eq. 24 each depth's summed cross-entropy is divided by the main loss's token
    count T (not by its own T-k)."""
    c = model.config
    w, b = model.head_weight_bias()
    T = input_ids.shape[1]
    n_main = (targets != -100).sum().clamp(min=1)
    total = h.new_zeros((), dtype=torch.float32)
    for k, layer in enumerate(model.mtp_layers, start=1):
        n = T - k
        if n <= 0:
            break
        rope, mask, is_causal = mtp_inputs(model, position_ids[:, :n], doc_ids[:, :n] if doc_ids is not None else None,
                                           layer)
        h = layer(h[:, :n], token_embedding(model, input_ids[:, k:]), rope, mask, is_causal)
        tgt = targets[:, k:]
        mean = fused_linear_cross_entropy(layer.shared_head.norm(h), w, tgt, b, c.final_softcap,
                                          compiled=model.compiled_loss)
        total = total + mean * (tgt != -100).sum() / n_main
    return c.mtp_loss_weight / c.mtp_depth * total
