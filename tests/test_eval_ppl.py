"""Perplexity / bits-per-byte (strided sliding window and lm-eval's rolling windows) against
transformers and lm-eval's HFLM on the same tiny weights; LAMBADA's bootstrap stderr equal to
lm-eval's; TruthfulQA MC1/MC2 equal to lm-eval's task code; evaluation during training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from evolm.eval import data as D
from evolm.eval.harness import bootstrap_perplexity_stderr, evaluate_in_training, score_task
from evolm.eval.loglik import LoglikScorer, rolling_windows
from evolm.eval.perplexity import evaluate_perplexity, load_corpus
from evolm.eval.tasks import TASKS

transformers = pytest.importorskip("transformers")
from test_eval_generative import tiny_pair  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
needs_data = pytest.mark.skipif(not (D.default_data_dir() / ".done").is_file(),
                                reason="missing asset benchmark data (required; install: make eval-data)")
TEXT = ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are "
        "done, there will be 21 trees. How many trees did the grove workers plant today? Olivia has $23. She "
        "bought five bagels for $3 each. How much money does she have left? ") * 3


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("tinyppl"))


def _hf_guide_nll(hf, ids: list[int], max_length: int, stride: int) -> tuple[float, int]:
    """HF's "Perplexity of fixed-length models" loop with transformers' own loss: total NLL and
    the number of tokens it scored (labels that survive the internal shift)."""
    seq = torch.tensor([ids])
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, seq.shape[1], stride):
        end = min(begin + max_length, seq.shape[1])
        trg_len = end - prev_end
        inp = seq[:, begin:end]
        labels = inp.clone()
        labels[:, :-trg_len] = -100
        with torch.no_grad():
            loss = hf(inp, labels=labels).loss.item()
        n = int((labels[:, 1:] != -100).sum())
        nll, count, prev_end = nll + loss * n, count + n, end
        if end == seq.shape[1]:
            break
    return nll, count


@pytest.mark.parametrize("max_length,stride", [(32, 16), (32, 8), (48, 47)])
def test_strided_perplexity_equals_transformers_hf_guide(tiny, max_length, stride):
    model, tok, hf, _ = tiny
    ids = tok.encode(TEXT)
    assert len(ids) > 3 * max_length
    nll, count = _hf_guide_nll(hf, ids, max_length, stride)
    scorer = LoglikScorer(model, tok, batch_size=4, max_length=max_length, progress=False)
    ll = scorer.loglikelihood_rolling([TEXT], stride=stride, prefix=False)[0]
    assert count == len(ids) - 1
    assert -ll == pytest.approx(nll, rel=1e-4)
    assert math.exp(-ll / count) == pytest.approx(math.exp(nll / count), rel=1e-4)


def test_rolling_loglikelihood_equals_lm_eval_hflm(tiny):
    """stride=None is lm-eval's loglikelihood_rolling: compare with HFLM on the same weights."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model, tok, hf, hft = tiny
    texts = [TEXT, TEXT[:50], "Hello"]
    lm = HFLM(pretrained=hf, tokenizer=hft, batch_size=2, max_length=40)
    reqs = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(t,), idx=i) for i, t in enumerate(texts)]
    ref = lm.loglikelihood_rolling(reqs, disable_tqdm=True)
    ours = LoglikScorer(model, tok, batch_size=2, max_length=40, progress=False).loglikelihood_rolling(texts)
    assert ours == pytest.approx(ref, rel=1e-4)


def test_long_windows_use_the_fused_loss_and_agree(tiny):
    model, tok, _, _ = tiny
    a = LoglikScorer(model, tok, batch_size=2, max_length=64, progress=False)
    b = LoglikScorer(model, tok, batch_size=2, max_length=64, progress=False)
    b.max_logits = 1  # every window through model(x, targets=...)
    for stride in (None, 16):
        assert b.loglikelihood_rolling([TEXT], stride=stride)[0] == pytest.approx(
            a.loglikelihood_rolling([TEXT], stride=stride)[0], rel=1e-5)


def test_sliding_windows_score_every_token_once_with_bounded_context():
    toks = list(range(1, 40))
    for prefix in (0, None):
        seq = ([] if prefix is None else [prefix]) + toks
        seen = []
        for ids, n in rolling_windows(toks, prefix, max_length=10, stride=4):
            assert len(ids) <= 10 and 1 <= n <= len(ids) - 1
            seen.extend(ids[-n:])
        assert seen == seq[1:]


def test_corpus_sources_and_bits_per_byte(tiny, tmp_path):
    """A file, a folder, JSONL and token shards of the same documents give the same log-likelihood."""
    model, tok, _, _ = tiny
    docs = [TEXT[:300], TEXT[300:500]]
    (tmp_path / "one.txt").write_text(docs[0])
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"{i}.txt").write_text(d)
    (tmp_path / "docs.jsonl").write_text("".join(__import__("json").dumps({"text": d}) + "\n" for d in docs))
    shards = tmp_path / "shards"
    shards.mkdir()
    toks = [tok.encode(d) for d in docs]
    np.concatenate([np.array(t, dtype=np.uint16) for t in toks]).tofile(shards / "val_000.bin")
    np.save(shards / "val_000.idx.npy", np.cumsum([0] + [len(t) for t in toks]).astype(np.int64))
    scorer = LoglikScorer(model, tok, batch_size=2, max_length=48, progress=False)
    m_folder = evaluate_perplexity(scorer, folder, stride=24)
    for src in (tmp_path / "docs.jsonl", shards):
        m = evaluate_perplexity(scorer, src, stride=24)
        assert m["loglikelihood"] == pytest.approx(m_folder["loglikelihood"], rel=1e-5), src
        assert m["n_tokens"] == m_folder["n_tokens"] == sum(len(t) for t in toks)
    one = evaluate_perplexity(scorer, tmp_path / "one.txt")
    nbytes = len(docs[0].encode())
    assert one["bits_per_byte"] == pytest.approx(-one["loglikelihood"] / (nbytes * math.log(2)))
    assert one["byte_perplexity"] == pytest.approx(2 ** one["bits_per_byte"])
    assert one["word_perplexity"] == pytest.approx(math.exp(-one["loglikelihood"] / len(docs[0].split())), rel=0.05)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_corpus(tmp_path / "missing")


def test_lambada_perplexity_stderr_is_lm_evals_bootstrap(monkeypatch):
    pytest.importorskip("lm_eval")
    from lm_eval.api.metrics import bootstrap_stderr, perplexity

    monkeypatch.setenv("DISABLE_MULTIPROC", "1")
    lls = list(np.random.RandomState(0).normal(-3, 2, size=257))
    want = bootstrap_stderr(perplexity, lls, iters=3000)
    assert bootstrap_perplexity_stderr(lls, iters=3000) == pytest.approx(want, rel=1e-9)
    docs = [{"text": "a b"}] * len(lls)
    res = score_task(TASKS["lambada"], docs, [[(x, True)] for x in lls], bootstrap_iters=3000)
    assert res["perplexity_stderr"] == pytest.approx(want, rel=1e-9) and not math.isnan(res["perplexity_stderr"])


# A FORMAT FIXTURE, not TruthfulQA: three items in the shape of the original data/mc_task.json
# (no package registry serves TruthfulQA's multiple-choice data today), to check the conversion and
# that our requests and MC1/MC2 scores equal lm-eval's on the same rows.
MC_TASK_FIXTURE = [
    {"question": "Fixture question one?",
     "mc1_targets": {"Right one.": 1, "Wrong one a.": 0, "Wrong one b.": 0},
     "mc2_targets": {"Right one.": 1, "Also right.": 1, "Wrong one a.": 0, "Wrong one b.": 0}},
    {"question": "Fixture question two?",
     "mc1_targets": {"Right two.": 1, "Wrong two.": 0},
     "mc2_targets": {"Right two.": 1, "Wrong two.": 0, "Wrong two b.": 0}},
    {"question": "Fixture question three?",
     "mc1_targets": {"Right three.": 1, "Wrong three a.": 0, "Wrong three b.": 0, "Wrong three c.": 0},
     "mc2_targets": {"Right three.": 1, "Right three too.": 1, "Wrong three a.": 0}},
]


def test_truthfulqa_mc_task_converts_to_the_hf_schema(tmp_path):
    import json

    src = tmp_path / "mc_task.json"
    src.write_text(json.dumps(MC_TASK_FIXTURE))
    out = D.install_truthfulqa(src, tmp_path)
    rows = D.load("truthfulqa", "validation", tmp_path)
    assert out.is_file() and len(rows) == 3
    assert rows[0]["mc1_targets"] == {"choices": ["Right one.", "Wrong one a.", "Wrong one b."], "labels": [1, 0, 0]}
    assert rows[2]["mc2_targets"]["labels"] == [1, 1, 0]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q", "mc1_targets": {"a": 1, "b": 1}, "mc2_targets": {"a": 1}}]))
    with pytest.raises(ValueError, match="item 0: 'mc1_targets' must have exactly one correct answer"):
        D.install_truthfulqa(bad, tmp_path / "x")


def test_installed_truthfulqa_is_the_published_817_questions():
    """Runs when the user converted TruthfulQA's mc_task.json; else listed as an optional missing asset."""
    try:
        rows = D.load("truthfulqa", "validation")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    assert len(rows) == 817
    assert all(r["mc1_targets"]["labels"].count(1) == 1 and r["mc1_targets"]["labels"][0] == 1 for r in rows)
    assert sum(len(r["mc2_targets"]["choices"]) for r in rows) > 817 * 4


def test_truthfulqa_missing_is_an_optional_asset(tmp_path):
    from evolm.assets import MissingAsset

    with pytest.raises(MissingAsset, match="missing asset TruthfulQA .optional"):
        D.load("truthfulqa", "validation", tmp_path)


@pytest.mark.slow  # lm-eval's TaskManager indexes every task YAML first
def test_truthfulqa_requests_and_mc2_equal_lm_eval(tmp_path):
    pytest.importorskip("lm_eval")
    import json

    from lm_eval.tasks import TaskManager, get_task_dict
    from lm_eval.tasks.truthfulqa.utils import process_results_mc2

    from evolm.eval.lm_eval_adapter import local_task_dir

    (tmp_path / "mc_task.json").write_text(json.dumps(MC_TASK_FIXTURE))
    data = tmp_path / "data"
    D.install_truthfulqa(tmp_path / "mc_task.json", data)
    names = local_task_dir(tmp_path / "tasks", data_dir=data, tasks=["truthfulqa_mc1", "truthfulqa_mc2"])
    tdict = get_task_dict(names, TaskManager(include_path=str(tmp_path / "tasks")))
    rng = np.random.RandomState(0)
    for name, lname in zip(["truthfulqa_mc1", "truthfulqa_mc2"], names):
        lt, task = tdict[lname], TASKS[name]
        docs = task.docs(data)[:10]
        assert len(docs) == len(list(lt.eval_docs)) == 3
        for d_ref, d in zip(list(lt.eval_docs)[:10], docs):
            reqs = lt.construct_requests(doc=d_ref, ctx=lt.fewshot_context(d_ref, 0), metadata=(lname, 0, 1))
            assert [tuple(r.args[:2]) for r in reqs] == task.requests(d, "")
        lls = [[(float(x), False) for x in rng.normal(-20, 5, len(task.doc_to_choice(d)))] for d in docs]
        ours = score_task(task, docs, lls)["acc"]
        if name == "truthfulqa_mc2":
            want = np.mean([process_results_mc2(d, r)["acc"] for d, r in zip(docs, lls)])
        else:
            want = np.mean([float(np.argmax([x for x, _ in r]) == 0) for r in lls])
        assert ours == pytest.approx(want)


@needs_data
def test_evaluate_in_training_is_flat_fast_and_side_effect_free(tiny, tmp_path, monkeypatch):
    model, tok, _, _ = tiny
    monkeypatch.chdir(tmp_path)
    model.train()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    scores = evaluate_in_training(model, tok, ["arc_easy", "piqa", "lambada"], limit=4, batch_size=4)
    assert model.training
    assert torch.equal(torch.get_rng_state(), state) and (np.random.get_state()[1] == np_state).all()
    assert {"arc_easy/acc", "arc_easy/acc_norm", "piqa/acc", "lambada/perplexity"} <= set(scores)
    assert all(isinstance(v, float) for v in scores.values())
    assert list(tmp_path.iterdir()) == []  # no cache or results files
