"""Evaluation: data install, lm-eval-identical prompts and metrics, batched/cached log-likelihood,
and agreement with lm-evaluation-harness + transformers on SmolLM2-135M-Instruct."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from evolm.eval import data as D
from evolm.eval.harness import evaluate, markdown_table, score_task
from evolm.eval.loglik import LoglikScorer, encode_pair, rolling_windows
from evolm.eval.tasks import TASKS, get_task

needs_data = pytest.mark.skipif(not (D.default_data_dir() / ".done").is_file(),
                                reason="missing asset benchmark data (required; install: make eval-data)")


def _smollm2():
    from evolm.interop.gguf import find_asset

    try:
        path = find_asset("smollm2")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    import evolm

    model, tok = evolm.load(path, dtype=torch.float32)
    return path, model, tok


@needs_data
def test_installed_sizes_match_the_published_splits():
    sizes = {("hellaswag", "validation"): 10042, ("arc_easy", "test"): 2376, ("arc_challenge", "test"): 1172,
             ("piqa", "validation"): 1838, ("winogrande", "validation"): 1267, ("lambada", "test"): 5153,
             ("gsm8k", "test"): 1319, ("humaneval", "test"): 164, ("openbookqa", "test"): 500}
    for (name, split), n in sizes.items():
        assert len(D.load(name, split)) == n, name
    subjects = D.mmlu_subjects()
    assert len(subjects) == 57
    assert sum(len(D.load(f"mmlu/{s}", "test")) for s in subjects) == 14042


def test_acc_and_acc_norm_follow_lm_eval():
    # acc: argmax of summed logprob; acc_norm: argmax of logprob / len(choice in characters)
    task = TASKS["piqa"]
    doc = {"goal": "g", "sol1": "a", "sol2": "a much longer answer", "label": 1}
    res = score_task(task, [doc, doc], [[(-1.0, False), (-5.0, False)], [(-1.0, False), (-5.0, False)]])
    assert res["acc"] == 0.0 and res["acc_norm"] == 1.0  # -5/20 > -1/1
    res = score_task(task, [doc, {**doc, "label": 0}], [[(-1.0, False), (-5.0, False)]] * 2)
    assert res["acc"] == 0.5
    assert res["acc_stderr"] == pytest.approx(np.std([0, 1], ddof=1) / math.sqrt(2))


def test_rolling_windows_score_every_token_once():
    toks = list(range(100, 123))
    for stride in (None, 4, 7):
        seen = []
        for ids, n in rolling_windows(toks, 0, max_length=8, stride=stride):
            assert len(ids) <= 9 and n <= len(ids) - 1
            seen.extend(ids[-n:])
        assert seen == toks


def test_encode_pair_moves_trailing_space_and_merges_like_running_text():
    _, _, tok = _smollm2()
    ctx, cont = encode_pair(tok, "Question: 2+2?\nAnswer: ", "4 apples")
    assert ctx == tok.encode("Question: 2+2?\nAnswer:", add_special_tokens=False)
    whole = tok.encode("Question: 2+2?\nAnswer: 4 apples", add_special_tokens=False)
    assert ctx + cont == whole


@needs_data
def test_prompts_equal_lm_evals_own_task_formatting(tmp_path):
    """lm-eval's ConfigurableTask (its own YAML + utils) on the same local rows gives our requests."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager, get_task_dict

    from evolm.eval.lm_eval_adapter import local_task_dir

    ours = ["hellaswag", "arc_easy", "piqa", "winogrande", "openbookqa", "sciq", "lambada_openai"]
    names = local_task_dir(tmp_path, tasks=ours)
    tdict = get_task_dict(names, TaskManager(include_path=str(tmp_path)))  # noqa: deprecated alias, stable
    for name, lname in zip(ours, names):
        lt = tdict[lname]
        ltdocs = list(lt.eval_docs)[:15]
        task = TASKS[name]
        docs = task.docs()[:15]
        for d_ref, d in zip(ltdocs, docs):
            reqs = lt.construct_requests(doc=d_ref, ctx=lt.fewshot_context(d_ref, 0), metadata=(lname, 0, 1))
            reqs = reqs if isinstance(reqs, list) else [reqs]
            assert [tuple(r.args[:2]) for r in reqs] == task.requests(d, ""), name
            if task.output_type == "multiple_choice":
                assert lt.doc_to_target(d_ref) == task.doc_to_target(d) or (
                    task.multiple_input and lt.doc_to_text(d_ref) == task.doc_to_target(d)), name


@needs_data
def test_mmlu_five_shot_prompt_is_lm_evals():
    task = get_task("mmlu_anatomy")[0]
    docs = task.docs()[:2]
    ctx = task.contexts(docs, 5, seed=0)
    dev = D.load("mmlu/anatomy", "dev")
    assert ctx[0].startswith("The following are multiple choice questions (with answers) about anatomy.\n\n")
    assert ctx[0].count("\nAnswer: ") == 5 and ctx[0].endswith("\n\n")
    assert dev[0]["question"].strip() in ctx[0]
    req = task.requests(docs[0], ctx[0])
    assert [r[1] for r in req] == [" A", " B", " C", " D"]


@needs_data
def test_loglik_batched_cached_and_resumable(tmp_path):
    _, model, tok = _smollm2()
    reqs = [(TASKS["piqa"].requests(d, "")) for d in TASKS["piqa"].docs()[:3]]
    flat = [r for rs in reqs for r in rs] + [("", "Hello world")]
    a = LoglikScorer(model, tok, batch_size=1, progress=False).loglikelihood(flat)
    cache = tmp_path / "c.jsonl"
    b = LoglikScorer(model, tok, batch_size=8, cache_path=cache, progress=False).loglikelihood(flat)
    for (x, gx), (y, gy) in zip(a, b):  # right padding: batch size changes nothing
        assert x == pytest.approx(y, abs=1e-3) and gx == gy
    with open(cache, "a") as f:
        f.write('{"k": "torn')  # an interrupted write
    boom = LoglikScorer(model, tok, batch_size=8, cache_path=cache, progress=False)
    boom.model = None  # any forward would fail: everything must come from the cache
    assert boom.loglikelihood(flat) == b


@needs_data
@pytest.mark.slow
def test_per_request_loglik_equals_transformers_on_smollm2():
    """Same GGUF weights through transformers (dequantized, fp32): logprobs agree per request."""
    transformers = pytest.importorskip("transformers")
    path, model, tok = _smollm2()
    ref = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                            dtype=torch.float32).eval()
    reqs = [r for d in TASKS["arc_easy"].docs()[:3] for r in TASKS["arc_easy"].requests(d, "")]
    ours = LoglikScorer(model, tok, batch_size=4, progress=False).loglikelihood(reqs)
    for (ctx, cont), (ll, _) in zip(reqs, ours):
        c, x = encode_pair(tok, ctx, cont)
        ids = torch.tensor([c + x])
        with torch.no_grad():
            lp = torch.log_softmax(ref(ids).logits[0, :-1].float(), -1)
        want = lp[len(c) - 1:].gather(-1, torch.tensor(x)[:, None]).sum().item()
        assert ll == pytest.approx(want, abs=2e-3)


@needs_data
@pytest.mark.slow
def test_scores_equal_lm_eval_hflm_on_smollm2(tmp_path):
    """The issue's acceptance test on a small subset: evolm's harness vs lm-eval + transformers."""
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evolm.eval.lm_eval_adapter import local_task_dir

    path, model, tok = _smollm2()
    tasks, limit = ["hellaswag", "arc_easy", "piqa"], 6
    ours = evaluate(model, tok, tasks, limit=limit, batch_size=8, out=tmp_path / "r.json", progress=False)
    assert json.loads((tmp_path / "r.json").read_text())["results"]["piqa"]["acc"] == ours["results"]["piqa"]["acc"]
    print(markdown_table(ours))
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    hft = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    names = local_task_dir(tmp_path / "tasks", tasks=tasks)
    ref = simple_evaluate(HFLM(pretrained=hf, tokenizer=hft, batch_size=8), tasks=names, limit=limit,
                          num_fewshot=0, task_manager=TaskManager(include_path=str(tmp_path / "tasks")))
    for t, ln in zip(tasks, names):
        for m in ("acc", "acc_norm"):
            assert abs(ours["results"][t][m] - ref["results"][ln][f"{m},none"]) <= 0.005, (t, m)
