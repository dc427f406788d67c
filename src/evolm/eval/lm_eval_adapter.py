"""lm-evaluation-harness integration: an ``LM`` for evolm models, and offline task configs.

1. ``EvolmLM`` is registered as ``"evolm"``, so any lm-eval task runs on an evolm model::

       lm_eval --model evolm --model_args path=model.gguf,dtype=float32,batch_size=8 --tasks ...

   (the ``lm_eval`` CLI must import this module first; ``python -m evolm.eval.lm_eval_adapter
   <lm_eval args>`` does that and then runs lm-eval's CLI).
   ``loglikelihood`` / ``loglikelihood_rolling`` go through ``LoglikScorer`` (lm-eval's exact
   tokenization rules), ``generate_until`` through ``generation.generate_until`` (batched, HFLM's
   truncation, stop strings and EOS handling, greedy or sampled).

2. ``local_task_dir`` writes lm-eval task YAMLs that ``include`` lm-eval's own default task files
   and only swap the Hub dataset for our local JSONL copy (``dataset_path: json``), so lm-eval
   formats prompts with its own code on the same rows our tasks read: the agreement test.
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import data as D
from .loglik import LoglikScorer

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError:  # lm-eval is optional: only this adapter needs it
    LM = object

    def register_model(*_a, **_k):
        return lambda cls: cls


@register_model("evolm")
class EvolmLM(LM):
    def __init__(self, path: str, dtype: str = "float32", batch_size: int | str = 8,
                 max_length: int | None = None, device: str = "cpu", **_ignored):
        super().__init__()
        from evolm.infer.prepare import InferenceOptions, load_for_inference

        self.model, self.tokenizer = load_for_inference(path, InferenceOptions(device=device, dtype=dtype))
        bs = 8 if str(batch_size).startswith("auto") else int(batch_size)
        self.scorer = LoglikScorer(self.model, self.tokenizer, batch_size=bs, max_length=max_length,
                                   model_id=str(path))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        kw = {}
        for part in filter(None, arg_string.split(",")):
            k, _, v = part.partition("=")
            kw[k.strip()] = v.strip()
        for k, v in (additional_config or {}).items():
            if v is not None and k in ("batch_size", "device"):
                kw.setdefault(k, v)
        return cls(**kw)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return [tuple(r) for r in self.scorer.loglikelihood([tuple(req.args[:2]) for req in requests])]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self.scorer.loglikelihood_rolling([req.args[0] for req in requests])

    def generate_until(self, requests, disable_tqdm: bool = False):
        from .generation import generate_until

        return generate_until(self.model, self.tokenizer, [tuple(req.args[:2]) for req in requests],
                              batch_size=self.scorer.batch_size, max_length=self.scorer.max_length,
                              progress=not disable_tqdm)


# lm-eval task name -> (local dataset folder, split, lm-eval yaml relative to lm_eval/tasks)
LOCAL_TASKS = {
    "hellaswag": ("hellaswag", "validation", "hellaswag/hellaswag.yaml"),
    "arc_easy": ("arc_easy", "test", "arc/arc_easy.yaml"),
    "arc_challenge": ("arc_challenge", "test", "arc/arc_challenge.yaml"),
    "piqa": ("piqa", "validation", "piqa/piqa.yaml"),
    "winogrande": ("winogrande", "validation", "winogrande/default.yaml"),
    "sciq": ("sciq", "validation", "sciq/sciq.yaml"),
    "openbookqa": ("openbookqa", "test", "openbookqa/openbookqa.yaml"),
    "lambada_openai": ("lambada", "test", "lambada/lambada_openai.yaml"),
    "gsm8k_cot": ("gsm8k", "test", "gsm8k/gsm8k-cot.yaml"),
    "gsm8k": ("gsm8k", "test", "gsm8k/gsm8k.yaml"),
    "truthfulqa_mc1": ("truthfulqa", "validation", "truthfulqa/truthfulqa_mc1.yaml"),
    "truthfulqa_mc2": ("truthfulqa", "validation", "truthfulqa/truthfulqa_mc2.yaml"),
}


def local_task_dir(out_dir: str | Path, data_dir=None, tasks=None) -> list[str]:
    """Write ``local_<task>.yaml`` files under ``out_dir``; returns the task names to run."""
    import lm_eval

    root = Path(lm_eval.__file__).parent / "tasks"
    data_dir = Path(data_dir or D.default_data_dir()).resolve()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for task in tasks or LOCAL_TASKS:
        folder, split, yml = LOCAL_TASKS[task]
        f = data_dir / folder / f"{split}.jsonl"
        if not f.is_file():
            raise FileNotFoundError(f"{f} missing: run scripts/install_eval_data.py")
        slot = "validation_split" if split == "validation" else "test_split"
        other = "test_split" if slot == "validation_split" else "validation_split"
        # training/other splits are nulled: the local copy holds only the scored split
        (out_dir / f"local_{task}.yaml").write_text(
            f"include: {root / yml}\n"
            f"task: local_{task}\n"
            f"tag: []\n"
            f"dataset_path: json\n"
            f"dataset_name: null\n"
            f"dataset_kwargs:\n  data_files:\n    {split}: {f}\n"
            f"training_split: null\n{other}: null\n{slot}: {split}\n"
            f"fewshot_split: {split if task == 'gsm8k' else 'null'}\n"
        )
        names.append(f"local_{task}")
    return names


def main(argv=None) -> int:
    """``python -m evolm.eval.lm_eval_adapter ...`` = lm-eval's CLI with the evolm model registered."""
    from lm_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0]] + list(argv if argv is not None else sys.argv[1:])
    cli_evaluate()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
