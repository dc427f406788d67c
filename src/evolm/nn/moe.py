"""Mixture of experts: a router picks k of E expert MLPs per token.

- Sparse MoE layers (Shazeer et al. 2017, arXiv:1701.06538; Switch, Fedus et al. 2021,
  arXiv:2101.03961) multiply parameters without multiplying per-token compute: Mixtral 8x7B has
  46.7B parameters but 12.9B active.
- Router: softmax over expert logits, top-k, optional renormalisation of the k weights
  (Mixtral, Qwen3-MoE); or sigmoid scores with a per-expert selection bias that balances load
  without an auxiliary loss (DeepSeek-V3, arXiv:2412.19437), group-limited routing
  (``n_expert_groups`` / ``topk_groups``) and a ``routed_scaling_factor``.
- Shared experts (DeepSeekMoE, arXiv:2401.06066): always-active experts that hold common
  knowledge so routed experts can specialise.
- Llama 4 (Meta 2025): one shared expert plus top-1 of 16 or 128 routed experts by sigmoid score,
  where the score scales the routed expert's *input* (``router_scales_input``), not its output;
  with a gated expert the two differ. Maverick alternates dense and MoE layers
  (``moe_layer_step``).
- Optional losses: the Switch load-balancing loss and the ST-MoE router z-loss
  (Zoph et al. 2022, arXiv:2202.08906), per layer, or (``moe_loss_groups="sequence"``) pooled
  over a stack's MoE layers with the balance taken per sequence, as transformers' Switch
  Transformers computes them (:func:`pooled_router_losses`).
- Switch Transformer (Fedus et al. 2021, arXiv:2101.03961): top-1 routing with an *expert
  capacity* (``expert_capacity``): an expert takes at most that many tokens of a sequence, in
  order; the tokens past it skip the layer, carried on by the residual connection alone (sec. 2.2).

Dispatch is vectorised: token-expert assignments are sorted by expert once, each expert runs
one matmul on its contiguous slice, and results are scattered back with ``index_add_``. Expert
weights are stored as 3-D tensors ``gate_up_proj`` (E, 2F, D) and ``down_proj`` (E, D, F).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from evolm.nn.mlp import MLP, activation_fn


class Router(nn.Module):
    def __init__(self, config):
        super().__init__()
        c = config
        self.n_experts, self.top_k = c.n_experts, c.n_experts_per_tok
        self.kind = c.router
        self.norm_topk_prob = c.norm_topk_prob
        self.scaling = c.routed_scaling_factor
        self.n_groups, self.topk_groups = c.n_expert_groups, c.topk_groups
        self.weight = nn.Parameter(torch.empty(c.n_experts, c.d_model))
        if c.router_bias:  # not trained by gradient: nudged towards balanced load (update_bias)
            self.register_buffer("e_score_correction_bias", torch.zeros(c.n_experts))
        else:
            self.e_score_correction_bias = None

    def forward(self, x: torch.Tensor):
        """x (N, D) -> logits (N, E), weights (N, k), expert indices (N, k)."""
        logits = F.linear(x.float(), self.weight.float())
        scores = torch.sigmoid(logits) if self.kind == "sigmoid" else torch.softmax(logits, dim=-1)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.n_groups > 1:
            g = choice.view(-1, self.n_groups, self.n_experts // self.n_groups)
            # DeepSeek-V3 ranks groups by the sum of their two best experts; V2 by the best one
            group_score = g.topk(2, dim=-1)[0].sum(-1) if self.kind == "sigmoid" and g.shape[-1] > 1 else g.amax(-1)
            keep = torch.zeros_like(group_score).scatter_(1, group_score.topk(self.topk_groups, dim=-1)[1], 1.0)
            keep = keep.unsqueeze(-1).expand_as(g).reshape(-1, self.n_experts)
            choice = choice.masked_fill(keep == 0, float("-inf"))
        idx = torch.topk(choice, self.top_k, dim=-1)[1]
        w = scores.gather(1, idx)
        if self.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + (1e-20 if self.kind == "sigmoid" else 0.0))
        return logits, w * self.scaling, idx

    def _apply(self, fn, recurse=True):
        """Keep the balancing bias in float32 when the model is cast (bf16 would swallow its updates)."""
        keep = self.e_score_correction_bias
        super()._apply(fn, recurse)
        new = self.e_score_correction_bias
        if keep is not None and new.dtype != torch.float32:
            self.e_score_correction_bias = new.float() if keep.is_meta or new.is_meta else keep.to(new.device)
        return self

    @torch.no_grad()
    def update_bias(self, expert_counts: torch.Tensor, rate: float = 1e-3) -> None:
        """DeepSeek-V3's aux-loss-free balancing (sec. 2.1.2): b_i += rate * sign(mean load - load_i),
        raising the bias of under-loaded experts. ``expert_counts`` should be the step's global
        load (every micro-batch, every data-parallel rank: ``loop.update_moe_bias``)."""
        if self.e_score_correction_bias is not None:
            load = expert_counts.float()
            self.e_score_correction_bias += rate * torch.sign(load.mean() - load)


class Experts(nn.Module):
    """E expert MLPs stored as stacked weights."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.gated = c.mlp == "glu"
        self.scale_input = c.router_scales_input
        self.d_ff = c.moe_d_ff
        self.gate_up_proj = nn.Parameter(torch.empty(c.n_experts, (2 if self.gated else 1) * c.moe_d_ff, c.d_model))
        self.down_proj = nn.Parameter(torch.empty(c.n_experts, c.d_model, c.moe_d_ff))
        self.act = activation_fn(c.activation)

    def forward(self, x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        N, k = idx.shape
        flat = idx.reshape(-1)
        order = flat.argsort(stable=True)
        token = order // k
        counts = torch.bincount(flat, minlength=self.gate_up_proj.shape[0]).tolist()
        xs = x[token]
        ws = weights.reshape(-1)[order].unsqueeze(-1)
        if self.scale_input:  # Llama 4: expert(w * x), rounded to x's dtype as transformers does
            xs = xs * ws.to(x.dtype)
        ys = self.mlps(xs, counts)
        if not self.scale_input:
            ys = ys * ws.to(x.dtype)
        return torch.zeros_like(x).index_add_(0, token, ys)

    def mlps(self, xs: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Rows ``xs`` grouped by expert (``counts[e]`` rows for expert ``e``, in order) -> each row
        through its expert's MLP. Expert parallelism (``evolm.parallel.expert``) calls this on the
        rows a rank received, with that rank's slice of the stacked weights."""
        outs = [self._mlp(e, chunk) for e, chunk in enumerate(xs.split(counts)) if chunk.shape[0]]
        # no rows at all (an expert-parallel rank sent nothing): an empty result still tied to the
        # weights, so they get a zero gradient as in one process, not none
        return torch.cat(outs) if outs else self._mlp(0, xs)

    def _mlp(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.gate_up_proj[e])
        if self.gated:
            gate, up = h.chunk(2, dim=-1)
            h = self.act(gate) * up
        else:
            h = self.act(h)
        return F.linear(h, self.down_proj[e])


def within_capacity(idx: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """(B, T) top-1 expert per token -> (B, T) bool: the token is among the first ``capacity`` of its
    sequence routed to that expert (Switch's dispatch; transformers' ``token_priority``)."""
    one_hot = F.one_hot(idx, n_experts)
    return (one_hot.cumsum(1) * one_hot).sum(-1) <= capacity


def pooled_router_losses(router_logits: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """A stack's (router z-loss, load-balancing loss) from its MoE layers' logits (each (B, T, E)),
    unweighted, as transformers' Switch Transformers defines them.

    The layers' tokens are pooled along the sequence. z-loss (ST-MoE, arXiv:2202.08906 eq. 5): the
    mean of ``logsumexp(logits)**2``. Balance (Switch, arXiv:2101.03961 eqs. 4-6): per sequence,
    ``E * sum_i f_i * P_i`` with ``f_i`` the share of tokens whose top expert is i (before capacity)
    and ``P_i`` the mean router probability of i, averaged over sequences.
    """
    logits = torch.cat([t.float() for t in router_logits], dim=1)
    E = logits.shape[-1]
    z = torch.logsumexp(logits, dim=-1).pow(2).mean()
    f = F.one_hot(logits.argmax(-1), E).float().mean(1)
    p = torch.softmax(logits, dim=-1).mean(1)
    return z, (f * p).mean() * E * E


class MoE(nn.Module):
    """Routed experts plus optional shared experts; records its auxiliary losses."""

    def __init__(self, config):
        super().__init__()
        c = config
        self.gate = Router(c)
        self.experts = Experts(c)
        self.shared_experts = MLP(c, d_ff=c.moe_d_ff * c.n_shared_experts) if c.n_shared_experts else None
        self.aux_coef, self.z_coef = c.moe_aux_loss_coef, c.moe_z_loss_coef
        self.capacity = c.expert_capacity
        self.pooled_losses = c.moe_loss_groups == "sequence"
        self.router_logits: torch.Tensor | None = None  # (B, T, E) of the last training forward (pooled losses)
        self.aux_loss: torch.Tensor | None = None
        self.expert_counts: torch.Tensor | None = None  # this forward's tokens per expert
        # tokens per expert summed over the training forwards since the last bias update (every
        # micro-batch of a step); a plain attribute, not a buffer, so DDP never broadcasts rank 0's
        self.step_counts: torch.Tensor | None = None
        # (counts, tokens) -> the same summed over the data-parallel ranks; set by expert parallelism
        # (evolm.parallel.expert) so the balance loss reads the global batch's load, as one process does
        self.reduce_load = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        logits, w, idx = self.gate(xf)
        if self.capacity is not None:  # Switch: tokens past an expert's capacity skip the layer
            keep = within_capacity(idx.view(*shape[:-1]), logits.shape[-1], self.capacity).reshape(-1)
            y = torch.zeros_like(xf)
            y[keep] = self.experts(xf[keep], w[keep], idx[keep])
        else:
            y = self.experts(xf, w, idx)
        if self.shared_experts is not None:
            y = y + self.shared_experts(xf)
        with torch.no_grad():
            self.expert_counts = torch.bincount(idx.reshape(-1), minlength=logits.shape[-1])
            if self.training and self.gate.e_score_correction_bias is not None:
                self.step_counts = self.expert_counts if self.step_counts is None \
                    else self.step_counts + self.expert_counts
        self.router_logits = logits.view(*shape[:-1], -1) if self.training and self.pooled_losses else None
        if self.training and (self.aux_coef or self.z_coef) and not self.pooled_losses:
            loss = logits.new_zeros(())
            if self.aux_coef:  # Switch: E * sum_i (tokens routed to i / tokens) * (mean prob of i)
                counts, n = self.expert_counts.float(), idx.shape[0]
                if self.reduce_load is not None:
                    counts, n = self.reduce_load(counts, n)
                frac = counts / n
                loss = loss + self.aux_coef * logits.shape[-1] * (frac * torch.softmax(logits, -1).mean(0)).sum()
            if self.z_coef:
                loss = loss + self.z_coef * torch.logsumexp(logits, -1).pow(2).mean()
            self.aux_loss = loss
        else:
            self.aux_loss = None
        return y.reshape(shape)
