"""Task heads: what an encoder puts on top of its last hidden states, chosen by ``config.head``.

A decoder ends in one head, the vocabulary projection. An encoder (BERT, Devlin et al. 2018,
arXiv:1810.04805; RoBERTa, Liu et al. 2019, arXiv:1907.11692; ModernBERT, Warner et al. 2024,
arXiv:2412.13663) is pretrained through the same projection at masked positions and then used
through other small heads:

- ``lm``: vocabulary logits (B, T, V). BERT's masked-LM head first applies a *transform*, dense ->
  activation -> LayerNorm (``head_transform``), and projects with the tied embedding plus a bias of
  its own (``lm_head_bias``); RoBERTa and ModernBERT keep that shape.
- ``classify``: one label per sequence (B, num_labels). The sequence is *pooled*: the first token
  (``[CLS]``; ``pooling='cls'``) or the mean of the real tokens (``'mean'``), then BERT's *pooler*
  (dense + tanh, ``pooler``; RoBERTa's classification head computes the same) or ModernBERT's
  transform, then a linear classifier.
- ``token_classify``: one label per token (B, T, num_labels), e.g. named entities.
- ``embed``: the pooled vector (B, d): sentence embeddings (Sentence-BERT, Reimers & Gurevych 2019,
  arXiv:1908.10084, mean-pools BERT's last layer).

The module holds only what the config asks for, under transformers' own short names (``dense``,
``norm``, ``bias``, ``pooler``, ``classifier``), so the families' weight maps stay thin; a decoder
builds none of it (``Head.wanted``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from evolm.nn.mlp import activation_fn
from evolm.nn.norm import make_norm


def pool(x: torch.Tensor, attention_mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """(B, T, d) -> (B, d): the first slot (``cls``: BERT's [CLS], as transformers takes it: slot 0 even
    under left padding), or the mean (``mean``) or the maximum (``max``, sentence-transformers' max
    pooling) over the real tokens (``attention_mask`` 1; None: every token)."""
    if how == "cls":
        return x[:, 0]
    if attention_mask is None:
        return x.amax(1) if how == "max" else x.mean(1)
    m = attention_mask.to(x.dtype).unsqueeze(-1)
    if how == "max":
        return x.masked_fill(m == 0, torch.finfo(x.dtype).min).amax(1)
    return (x * m).sum(1) / m.sum(1)


class Head(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = self.config = config
        if c.head_transform:
            self.dense = nn.Linear(c.d_model, c.d_model, bias=c.head_dense_bias)
            self.norm = make_norm(c)
            self.act = activation_fn(c.head_activation or c.activation)
        if c.head == "lm" and c.lm_head_bias and c.tie_embeddings:  # an untied lm_head carries its own bias
            self.bias = nn.Parameter(torch.zeros(c.vocab_size))
        if c.pooler:
            self.pooler = nn.Linear(c.d_model, c.d_model)
        if c.head in ("classify", "token_classify"):
            self.classifier = nn.Linear(c.d_model, c.num_labels)

    @staticmethod
    def wanted(config) -> bool:
        """Whether ``config`` needs anything beyond the vocabulary projection (a decoder does not)."""
        c = config
        return c.head != "lm" or c.head_transform or (c.lm_head_bias and c.tie_embeddings)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """BERT's prediction-head transform, where the config has one."""
        return self.norm(self.act(self.dense(x))) if self.config.head_transform else x

    def pool(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        return pool(x, attention_mask, self.config.pooling)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None,
                targets: torch.Tensor | None = None) -> torch.Tensor:
        """The task output of the final hidden states ``x`` (B, T, d); with ``targets`` (class ids, -100
        ignored) the mean cross-entropy instead."""
        c = self.config
        if c.head == "token_classify":
            return self._classify(self.transform(x), targets)
        pooled = self.pool(x, attention_mask)
        if c.head == "embed":
            if targets is not None:
                raise ValueError("head='embed' has no loss of its own; compare the embeddings it returns")
            return pooled
        if c.pooler:
            pooled = torch.tanh(self.pooler(pooled))
        return self._classify(self.transform(pooled), targets)

    def _classify(self, h: torch.Tensor, targets: torch.Tensor | None) -> torch.Tensor:
        logits = self.classifier(F.dropout(h, self.config.head_dropout, self.training))
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)
