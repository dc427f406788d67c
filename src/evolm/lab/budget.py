"""Equal compute for every variant of an ablation: token budgets from FLOPs, and parameter matching.

An innovation is judged fairly only at equal cost. Two rules, both printed with every lab run:

- **Equal training FLOPs** (``Budget("flops", C)``): each variant trains on as many tokens as its
  cost card's training FLOPs per token (``analysis/cost.py``: 6N over the active, non-embedding
  parameters plus the attention matmuls, the PaLM convention) allow, rounded to whole optimizer
  steps; the budgets then match within ``TOLERANCE``. ``Budget("tokens", D)``: equal tokens instead
  (the data-side comparisons: a filter, a mixture, an annealing stage).
- **Parameter matching** (``match_parameters``): a gated MLP (SwiGLU / GeGLU) has three matrices
  instead of two, so it is compared at 2/3 of the plain MLP's inner width, as Shazeer 2020
  (arXiv:2002.05202, Sec. 2) and the Llama papers do; a mixture of experts is compared at equal
  *active* parameters (each of the k routed experts plus the shared ones gets 1/(k + shared) of the
  dense inner width) or, with ``moe_match="total"`` (a lab variant's ``lab.moe_match: total``), at
  equal *total* parameters (each of the E experts plus the shared ones gets 1/(E + shared)).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from evolm.analysis.cost import cost_card
from evolm.config import ModelConfig

TOLERANCE = 0.01  # budgets of the variants of one ablation agree within 1%
KINDS = ("flops", "tokens")


@dataclass(frozen=True)
class Budget:
    """What every variant of an ablation gets the same amount of."""

    kind: str   # "flops" | "tokens"
    value: float

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"budget kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if not self.value > 0:
            raise ValueError(f"budget {self.kind}={self.value!r}: expected a positive number")

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """``flops=3e14`` or ``tokens=2e6`` (the ``--budget`` flag)."""
        kind, sep, value = text.partition("=")
        if not sep:
            raise ValueError(f"--budget {text!r}: expected flops=NUMBER or tokens=NUMBER")
        try:
            return cls(kind.strip(), float(value))
        except ValueError as e:
            raise ValueError(f"--budget {text!r}: {e}") from None


@dataclass(frozen=True)
class TokenPlan:
    """How long one variant trains under a budget, and what that costs."""

    steps: int
    tokens: int
    flops_per_token: int
    flops: float
    error: float  # |flops - budget| / budget for a FLOPs budget, |tokens - budget| / budget for tokens


def plan_tokens(config: ModelConfig, budget: Budget, seq_len: int, tokens_per_step: int) -> TokenPlan:
    """Whole optimizer steps of ``tokens_per_step`` tokens that spend ``budget`` on ``config``
    trained at ``seq_len``; a ValueError when whole steps cannot land within ``TOLERANCE``."""
    fpt = cost_card(config, context_len=seq_len)["flops_per_token"]
    per_step = budget.value / (fpt * tokens_per_step if budget.kind == "flops" else tokens_per_step)
    steps = max(1, round(per_step))
    tokens = steps * tokens_per_step
    spent = tokens * fpt if budget.kind == "flops" else tokens
    error = abs(spent - budget.value) / budget.value
    if error > TOLERANCE:
        raise ValueError(f"{config.name}: {budget.kind}={budget.value:.3g} is {per_step:.2f} steps of "
                         f"{tokens_per_step} tokens; whole steps miss it by {100 * error:.1f}% (> "
                         f"{100 * TOLERANCE:g}%): raise the budget or lower tokens_per_step")
    return TokenPlan(steps, tokens, fpt, float(tokens * fpt), error)


def match_parameters(base: ModelConfig, variant: ModelConfig, moe_match: str = "active"
                     ) -> tuple[ModelConfig, list[str]]:
    """``variant`` with its MLP widths set by the matching rules of the module docstring, and one
    line per rule applied (empty when none applies). ``moe_match``: a dense -> MoE change keeps the
    ``active`` parameters (each token's experts together as wide as the dense MLP) or the ``total``
    ones (all experts together as wide as the dense MLP: far fewer FLOPs per token, so more tokens)."""
    if moe_match not in ("active", "total"):
        raise ValueError(f"moe_match {moe_match!r}: expected active or total")
    notes: list[str] = []
    if variant.mlp == "glu" and base.mlp == "mlp" and variant.d_ff == base.d_ff:
        d_ff = _round_to(2 * base.d_ff / 3, 8)
        notes.append(f"gated MLP at d_ff = 2/3 x {base.d_ff} = {d_ff} (three matrices instead of two: "
                     f"equal MLP parameters, Shazeer 2020)")
        variant = replace(variant, d_ff=d_ff)
    if variant.n_experts and not base.n_experts:  # dense -> MoE: the experts' width is the rule's
        routed = variant.n_experts_per_tok if moe_match == "active" else variant.n_experts
        share = routed + variant.n_shared_experts
        width = base.d_ff if base.mlp == variant.mlp else variant.d_ff
        moe_d_ff = _round_to(width / share, 8)
        notes.append(f"experts at moe_d_ff = {width} / ({routed} {'routed' if moe_match == 'active' else 'experts'} + "
                     f"{variant.n_shared_experts} shared) = {moe_d_ff}: equal {moe_match} parameters")
        variant = replace(variant, moe_d_ff=moe_d_ff)
    return variant, notes


def _round_to(x: float, multiple: int) -> int:
    return max(multiple, int(round(x / multiple)) * multiple)
