"""Log-probabilities of completion tokens given their prompt: the one quantity DPO and GRPO optimise.

Both alignment methods score a *completion* y of a prompt x by the policy's log-likelihood
log pi(y | x) = sum_t log pi(y_t | x, y_<t), token by token (GRPO) or summed per sequence (DPO).
Prompt and completion are concatenated into one row, so a single forward pass scores every
completion token; rows of a batch are right-padded. Right padding needs no attention mask: under
the causal mask a real token only sees earlier positions, which are all real, so the padding at
the end of a row changes nothing before it (and saves the explicit mask that would stop the
attention kernel from using its causal fast path).

Alignment convention (the one transformers uses for ``labels``): ``completion_mask[b, t] = 1``
marks ``input_ids[b, t]`` as a completion token to be scored; its log-probability comes from the
logits at position ``t - 1``. The returned per-token tensors are aligned with ``input_ids``.
"""

from __future__ import annotations

from typing import Sequence

import torch

IGNORE = -100


def pad_right(rows: Sequence[Sequence[int]], value: int = 0, length: int | None = None) -> torch.Tensor:
    """Lists of ints -> a (B, T) long tensor, each row padded with ``value`` on the right."""
    T = max((len(r) for r in rows), default=0) if length is None else length
    out = torch.full((len(rows), T), value, dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            out[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.long)
    return out


def completion_batch(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]],
                     pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt ids, completion ids) pairs -> right-padded ``input_ids`` and ``completion_mask`` (B, T)."""
    if len(prompts) != len(completions):
        raise ValueError(f"completion_batch: {len(prompts)} prompts but {len(completions)} completions")
    rows, masks = [], []
    for p, c in zip(prompts, completions):
        if len(p) == 0:
            raise ValueError("completion_batch: a prompt is empty; the first completion token needs at least "
                             "one token before it to be predicted from (add BOS or a chat template)")
        rows.append(list(p) + list(c))
        masks.append([0] * len(p) + [1] * len(c))
    return pad_right(rows, pad_id), pad_right(masks, 0)


def labels_to_mask(labels: torch.Tensor) -> torch.Tensor:
    """transformers-style labels (-100 = not scored, aligned with input_ids) -> a 0/1 completion mask."""
    return (labels != IGNORE).long()


def token_logprobs(model, input_ids: torch.Tensor, completion_mask: torch.Tensor,
                   temperature: float = 1.0, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """log pi(input_ids[b, t] | input_ids[b, :t]) for every completion token; 0 elsewhere. (B, T) float32.

    ``temperature`` divides the logits first, so that GRPO scores completions under the very
    distribution it sampled them from (as TRL does). ``attention_mask`` is only needed for rows
    with padding *before* real tokens (left padding); positions then count real tokens only.
    Only the positions from the first completion column on go through the head, and for an evolm
    model the head and log-softmax are fused and chunked (``nn.loss.fused_linear_logprobs``): no
    (B, T, vocab) logits exist in the forward or the backward.
    """
    if input_ids.shape != completion_mask.shape:
        raise ValueError(f"token_logprobs: input_ids {tuple(input_ids.shape)} and completion_mask "
                         f"{tuple(completion_mask.shape)} differ in shape")
    B, T = input_ids.shape
    mask = completion_mask.to(input_ids.device).bool().clone()
    mask[:, 0] = False  # the first token of a row has nothing to be predicted from
    out = torch.zeros(B, T, dtype=torch.float32, device=input_ids.device)
    if not bool(mask.any()):
        return out
    start = int(mask.any(0).nonzero()[0])  # first column holding any completion token
    kwargs = {}
    if attention_mask is not None:
        am = attention_mask.to(input_ids.device).long()
        kwargs = {"attention_mask": am, "position_ids": (am.cumsum(-1) - 1).clamp(min=0)}
    from evolm.model import Transformer
    from evolm.nn.loss import fused_linear_logprobs

    target = input_ids[:, start:]
    if isinstance(model, Transformer):  # no head over the prompt columns, never all the logits at once
        h = model(input_ids, logits_to_keep=T - start + 1, return_hidden=True, **kwargs)[:, :-1]
        w, b = model.head_weight_bias()
        picked = fused_linear_logprobs(h, w, target, b, model.config.final_softcap, temperature)
    else:
        logits = model(input_ids, **kwargs)[:, start - 1:T - 1].float()
        if temperature != 1.0:
            logits = logits / temperature
        picked = logits.gather(-1, target[..., None])[..., 0] - torch.logsumexp(logits, dim=-1)
    out = torch.cat([out[:, :start], picked], dim=1)
    return out * mask


def sequence_logprobs(model, input_ids: torch.Tensor, completion_mask: torch.Tensor,
                      attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of completion-token log-probs (B,), number of completion tokens (B,)) per row."""
    lp = token_logprobs(model, input_ids, completion_mask, attention_mask=attention_mask)
    n = completion_mask.to(lp.device).bool().clone()
    n[:, 0] = False
    return lp.sum(-1), n.sum(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` where ``mask`` is 1 (over ``dim``, or all), 0 where nothing is selected."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)




# ---------------------------------------------------------------------------------------------
# the reference policy pi_ref of DPO and GRPO
# ---------------------------------------------------------------------------------------------
REFERENCES = ("auto", "copy", "adapters", "precompute", "none")


class adapters_disabled:
    """Context: the model's LoRA adapters contribute nothing, so it computes its frozen base.

    With LoRA the starting model *is* the reference: the adapters begin at zero (B = 0) and only
    they train, so switching them off gives pi_ref without a second copy of the weights (as TRL
    does with PEFT's ``disable_adapter``). We zero each adapter's ``scaling`` and restore it after.
    """

    def __init__(self, model):
        from evolm.post.lora import lora_modules

        self.modules = list(lora_modules(model).values())

    def __enter__(self):
        self.saved = [m.scaling for m in self.modules]
        for m in self.modules:
            m.scaling = 0.0
        return self

    def __exit__(self, *exc):
        for m, s in zip(self.modules, self.saved):
            m.scaling = s
        return False


def has_adapters(model) -> bool:
    try:
        from evolm.post.lora import lora_modules
    except ImportError:  # pragma: no cover
        return False
    return bool(lora_modules(model))


class Reference:
    """Where the reference log-probs come from: a frozen copy, the adapter-free base, or nowhere.

    ``mode``: ``copy`` (a frozen deep copy of the model as it is now), ``adapters`` (the same model
    with its LoRA adapters switched off), ``precompute`` (a frozen copy that the caller uses once,
    up front, then drops with :meth:`release`), ``none``; ``auto`` picks ``adapters`` for a LoRA
    model and ``copy`` otherwise. Build it *before* training changes the model.
    """

    def __init__(self, model, mode: str = "auto"):
        if mode not in REFERENCES:
            raise ValueError(f"--reference: unknown mode {mode!r}; expected one of {list(REFERENCES)}")
        lora = has_adapters(model)
        if mode == "auto":
            mode = "adapters" if lora else "copy"
        if mode == "adapters" and not lora:
            raise ValueError("--reference adapters: the model has no LoRA adapters to switch off, so it cannot "
                             "serve as its own reference; use --reference copy (a frozen copy) or precompute")
        self.mode, self.policy, self.frozen = mode, model, None
        if mode in ("copy", "precompute"):
            import copy

            self.frozen = copy.deepcopy(model).eval().requires_grad_(False)

    @property
    def available(self) -> bool:
        return self.mode in ("adapters",) or self.frozen is not None

    def release(self) -> None:
        """Free the frozen copy (after precomputing)."""
        self.frozen = None

    @torch.no_grad()
    def token_logprobs(self, input_ids: torch.Tensor, completion_mask: torch.Tensor, temperature: float = 1.0,
                       attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "adapters":
            was = self.policy.training
            self.policy.eval()  # no dropout in the reference
            try:
                with adapters_disabled(self.policy):
                    return token_logprobs(self.policy, input_ids, completion_mask, temperature, attention_mask)
            finally:
                self.policy.train(was)
        if self.frozen is None:
            raise ValueError(f"no reference model (mode {self.mode!r}"
                             f"{', already released after precomputing' if self.mode == 'precompute' else ''}); "
                             f"the loss needs pi_ref: use --reference copy/adapters/precompute")
        return token_logprobs(self.frozen, input_ids, completion_mask, temperature, attention_mask)

    def sequence_logprobs(self, input_ids: torch.Tensor, completion_mask: torch.Tensor) -> torch.Tensor:
        return self.token_logprobs(input_ids, completion_mask).sum(-1)


__all__ = ["IGNORE", "pad_right", "completion_batch", "labels_to_mask", "token_logprobs", "sequence_logprobs",
           "masked_mean", "REFERENCES", "Reference", "adapters_disabled", "has_adapters"]
