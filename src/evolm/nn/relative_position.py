"""T5's relative position biases (Raffel et al. 2019, arXiv:1910.10683, sec. 2.1).

Instead of adding a position vector to the tokens, T5 adds a learned scalar to each attention
score, one per head and per *bucket* of the distance ``key - query``: distances below half the
buckets get a bucket each, longer ones share logarithmically wider buckets up to
``max_distance``, beyond which all distances share the last one. An encoder tells left from
right (half the buckets each way); a decoder sees only the past, so all its buckets are for
looking back. One table serves every layer of a stack (transformers keeps it in layer 0), and
the scores are not scaled by ``1/sqrt(d)`` (``query_pre_attn_scalar=1``): the initialisation
absorbs it (Mesh TensorFlow).

Here the bias is a position part (``pos_emb="relative"``): the model builds it once per forward
call and folds it into the planned masks, so the attention layers see an additive float mask
and know nothing of positions.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


def relative_position_bucket(relative: torch.Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> torch.Tensor:
    """Bucket of each distance ``key - query`` (Mesh TensorFlow's ``_relative_position_bucket``)."""
    buckets = torch.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).long() * num_buckets
        distance = relative.abs()
    else:
        distance = (-relative).clamp(min=0)
    exact = num_buckets // 2
    # log-spaced buckets from `exact` to max_distance; clamp(min=1) only keeps log() finite where
    # the exact branch is taken anyway
    large = exact + (torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                     * (num_buckets - exact)).long()
    large = large.clamp(max=num_buckets - 1)
    return buckets + torch.where(distance < exact, distance, large)


class RelativePositionBias(nn.Module):
    """A stack's table of biases: (buckets, heads), looked up by the bucket of each (query, key) pair."""

    def __init__(self, config, bidirectional: bool):
        super().__init__()
        self.bidirectional = bidirectional
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        self.relative_attention_bias = nn.Embedding(self.num_buckets, config.n_heads)

    def forward(self, q_slots: torch.Tensor, k_slots: torch.Tensor) -> torch.Tensor:
        """(1, heads, Tq, Tk) biases for queries at ``q_slots`` and keys at ``k_slots``."""
        bucket = relative_position_bucket(k_slots[None, :] - q_slots[:, None], self.bidirectional,
                                          self.num_buckets, self.max_distance)
        return self.relative_attention_bias(bucket).permute(2, 0, 1)[None]

    def fold_into(self, masks: list, start: int, n_new: int, dtype: torch.dtype) -> list:
        """The planned ``(mask, is_causal)`` of each layer as additive float masks holding the bias
        (a masked key gets -inf), built once and shared by the layers that shared a plan."""
        device = self.relative_attention_bias.weight.device
        q_slots = torch.arange(start, start + n_new, device=device)
        k_slots = torch.arange(start + n_new, device=device)
        bias = self(q_slots, k_slots).to(dtype)
        masked = torch.tensor(float("-inf"), dtype=dtype, device=device)
        done: dict[int, tuple] = {}
        out = []
        for plan in masks:
            if id(plan) not in done:
                mask, is_causal = plan
                if mask is None and is_causal:
                    mask = (q_slots[:, None] >= k_slots[None, :])[None, None]
                done[id(plan)] = (bias if mask is None else
                                  torch.where(mask, bias, masked), False)
            out.append(done[id(plan)])
        return out
