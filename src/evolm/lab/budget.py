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

from evolm.analysis.cost import attention_forward_flops, cost_card, cross_attention_forward_flops
from evolm.config import ModelConfig
from evolm.data.objectives import ObjectiveConfig, seq2seq_lengths

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


def plan_tokens(config: ModelConfig, budget: Budget, seq_len: int, tokens_per_step: int,
                objective: ObjectiveConfig | None = None) -> TokenPlan:
    """Whole optimizer steps of ``tokens_per_step`` tokens that spend ``budget`` on ``config``
    trained at ``seq_len`` under ``objective`` (None: clm); a ValueError when whole steps cannot
    land within ``TOLERANCE``."""
    fpt = training_flops_per_token(config, seq_len, objective)
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


def training_flops_per_token(config: ModelConfig, seq_len: int, objective: ObjectiveConfig | None = None) -> int:
    """Training FLOPs per corpus token (what a step's ``tokens_per_step`` counts: windows x ``seq_len``).

    - ``clm``: the cost card's ``flops_per_token``.
    - ``mlm``: the head (BERT's transform and the vocabulary projection) runs at the ``rate`` share of
      the positions only (sparse prediction, ``model.sparse_prediction``): the card less its cost
      at the others.
    - ``span_corruption`` / ``denoise``: the card counts one source and one target token at one
      context; a window of L tokens is S source and U target tokens (``seq2seq_lengths``): S tokens
      through the encoder at context S, U through the decoder at self-context U and cross-context S.
    """
    card = cost_card(config, context_len=seq_len)
    if objective is None or objective.name == "clm":
        return card["flops_per_token"]
    if objective.seq2seq != bool(config.encoder_layers):
        raise ValueError(f"{config.name}: objective {objective.name} "
                         f"{'needs' if objective.seq2seq else 'is not for'} an encoder-decoder (encoder_layers > 0)")
    d = config.d_model
    if objective.name == "mlm":
        head = config.vocab_size * d + (d * d if config.head_transform else 0)
        return round(card["flops_per_token"] - 6 * (1 - objective.rate) * head)
    source, target = (max(1, round(n)) for n in seq2seq_lengths(objective, seq_len))
    enc = config.encoder_config()
    enc_card = cost_card(enc, context_len=source)
    enc_weights = enc_card["flops_params"] - config.vocab_size * d  # the encoder has no head: its card counts one
    dec_weights = card["flops_params"] - enc_weights
    cross = cross_attention_forward_flops(config, source)
    dec_self = attention_forward_flops(config, target) - attention_forward_flops(enc, target) \
        - cross_attention_forward_flops(config, target)
    forward = source * (2 * enc_weights + attention_forward_flops(enc, source)) \
        + target * (2 * dec_weights + dec_self + cross)
    return round(3 * forward / seq_len)


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
