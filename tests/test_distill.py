"""Distillation: the divergence is TRL's GKD loss (values and gradients), the fused chunked loss is the
unchunked one and never holds more than a chunk of logits, a tiny run moves the student towards the
teacher and resumes bit for bit (also on-policy), and mismatched vocabularies are refused by name.

Reference: TRL's ``GKDTrainer.generalized_jsd_loss`` (TRL is installed for tests), called on the
full logits; its gradients come from autograd through it.
"""

from __future__ import annotations

import json
import os
import random

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from evolm.model import build  # noqa: E402
from evolm.post.distill import (DistillConfig, DistillOptions, DistillTask, VocabularyMismatchError,  # noqa: E402
                                check_vocabularies, continuation_batch, run_distill)
from evolm.post.distill_loss import fused_distill_loss, generalized_jsd_loss  # noqa: E402
from evolm.post.common import LoopOptions  # noqa: E402
from evolm.presets import get_preset  # noqa: E402
from conftest import cli_config  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

BETAS = [0.0, 0.5, 1.0]


@pytest.fixture(scope="module")
def trl_jsd():
    pytest.importorskip("trl")
    from trl.experimental.gkd.gkd_trainer import GKDTrainer

    return GKDTrainer.generalized_jsd_loss


def _logits(seed: int, shape=(3, 7, 50), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=dtype) * 3
    y = torch.randn(*shape, generator=g, dtype=dtype) * 3
    labels = torch.randint(0, shape[-1], shape[:-1], generator=g)
    labels[0, :3] = -100  # a prompt
    labels[2, 5:] = -100  # padding
    return x, y, labels


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


# ----------------------------------------------------------------------------------------------
# the divergence is TRL's
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_loss_and_gradient_equal_trl_generalized_jsd(trl_jsd, beta, temperature, dtype):
    x, y, labels = _logits(int(beta * 10 + temperature * 100), dtype=dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    for lab in (labels, None):
        xr = x.clone().requires_grad_()
        ref = trl_jsd(xr, y, labels=lab, beta=beta, temperature=temperature)
        (g_ref,) = torch.autograd.grad(ref, xr)
        xo = x.clone().requires_grad_()
        ours = generalized_jsd_loss(xo, y, lab, beta=beta, temperature=temperature)
        (g_ours,) = torch.autograd.grad(ours, xo)
        if lab is None:  # TRL's batchmean without labels divides by the batch size, not the tokens
            ref = ref * x.shape[0] / (x.shape[0] * x.shape[1])
            g_ref = g_ref * x.shape[0] / (x.shape[0] * x.shape[1])
        _close(ours.detach(), ref.detach(), tol)
        _close(g_ours, g_ref, tol)


def test_every_label_masked_gives_zero_like_trl(trl_jsd):
    x, y, labels = _logits(5)
    labels[:] = -100
    xr = x.clone().requires_grad_()
    ours = generalized_jsd_loss(xr, y, labels, beta=0.5)
    assert ours.item() == trl_jsd(x, y, labels=labels, beta=0.5).item() == 0.0
    (g,) = torch.autograd.grad(ours, xr)
    assert not g.any()


def test_ends_are_forward_and_reverse_kl():
    x, y, _ = _logits(6, dtype=torch.float64)
    ls, lt = torch.log_softmax(x, -1), torch.log_softmax(y, -1)
    fkl = (lt.exp() * (lt - ls)).sum(-1).mean()
    rkl = (ls.exp() * (ls - lt)).sum(-1).mean()
    assert generalized_jsd_loss(x, y, beta=0.0).item() == pytest.approx(fkl.item(), rel=1e-12)
    assert generalized_jsd_loss(x, y, beta=1.0).item() == pytest.approx(rkl.item(), rel=1e-12)


# ----------------------------------------------------------------------------------------------
# fused with the heads, chunked
# ----------------------------------------------------------------------------------------------
def _heads(seed: int, n=37, d_s=12, d_t=20, vocab=64, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    labels = torch.randint(0, vocab, (n,), generator=g)
    labels[::5] = -100
    return r(n, d_s), r(vocab, d_s) * 0.5, r(vocab) * 0.1, r(n, d_t), r(vocab, d_t) * 0.5, r(vocab) * 0.1, labels


@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("softcap", [None, 5.0])
def test_fused_chunked_loss_and_gradients_equal_unchunked_and_trl(trl_jsd, beta, softcap):
    h_s, w_s, b_s, h_t, w_t, b_t, labels = _heads(int(beta * 10))
    T = 1.5

    def dense():
        x = h_s @ w_s.T + b_s
        y = h_t @ w_t.T + b_t
        if softcap:
            x, y = softcap * torch.tanh(x / softcap), softcap * torch.tanh(y / softcap)
        return trl_jsd(x, y, labels=labels, beta=beta, temperature=T)

    results = []
    for chunk in (None, 1000, 8, 1):
        params = [t.clone().requires_grad_() for t in (h_s, w_s, b_s)]
        if chunk is None:
            h_s, w_s, b_s = params
            loss = dense()
            h_s, w_s, b_s = (t.detach() for t in params)
        else:
            loss = fused_distill_loss(params[0], params[1], h_t, w_t, labels, b_student=params[2], b_teacher=b_t,
                                      beta=beta, temperature=T, student_softcap=softcap, teacher_softcap=softcap,
                                      chunk=chunk)
        results.append((loss.detach(), torch.autograd.grad(loss * 3.0, params)))  # an upstream factor too
    (ref, ref_g), rest = results[0], results[1:]
    for loss, grads in rest:
        _close(loss, ref, 1e-10)
        for g, gr in zip(grads, ref_g):
            _close(g, gr, 1e-10)


class _Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op produces."""

    def __init__(self):
        super().__init__()
        self.shapes, self.products = [], []  # every output; matrix products' outputs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
                if func.__name__.split(".")[0] in ("mm", "addmm", "bmm"):
                    self.products.append(tuple(t.shape))
        return out


def test_fused_loss_never_holds_more_than_a_chunk_of_logits():
    n, vocab, chunk = 96, 64, 8
    h_s, w_s, _, h_t, w_t, _, labels = _heads(3, n=n, vocab=vocab, dtype=torch.float32)
    h_s.requires_grad_()
    w_s.requires_grad_()
    with _Shapes() as rec:
        loss = fused_distill_loss(h_s, w_s, h_t, w_t, labels, beta=0.5, chunk=chunk)
        loss.backward()
    heads_t = {(h_s.shape[1], vocab), (h_t.shape[1], vocab)}  # W.T views, not logits
    logit_blocks = [s for s in rec.shapes if len(s) == 2 and s[1] == vocab and s not in heads_t]
    assert logit_blocks and max(s[0] for s in logit_blocks) == chunk
    assert max((a * b for a, b in (s for s in rec.shapes if len(s) == 2)), default=0) < n * vocab


def test_evaluation_under_no_grad_computes_no_gradient():
    h_s, w_s, _, h_t, w_t, _, labels = _heads(5, dtype=torch.float32)
    w_s.requires_grad_()
    with torch.no_grad(), _Shapes() as rec:
        loss = fused_distill_loss(h_s, w_s, h_t, w_t, labels, chunk=8)
    assert rec.products and all(s[1] == w_s.shape[0] for s in rec.products)  # logits only: no dW, no dh
    assert loss.item() == pytest.approx(fused_distill_loss(h_s, w_s.detach(), h_t, w_t, labels).item(), rel=1e-6)


def test_mismatched_heads_are_refused():
    h_s, w_s, _, h_t, w_t, _, labels = _heads(4)
    with pytest.raises(ValueError, match="student head has 64 outputs, teacher head 63"):
        fused_distill_loss(h_s, w_s, h_t, w_t[:-1], labels)


# ----------------------------------------------------------------------------------------------
# batches
# ----------------------------------------------------------------------------------------------
def test_continuation_batch_trains_on_completion_tokens_only():
    b = continuation_batch([[5, 6, 7], [8, 9]], [[1, 2], [3, 4, 0, 7]], pad_id=0, source="student")
    assert b.input_ids.tolist() == [[5, 6, 7, 1, 0], [8, 9, 3, 4, 0]]
    # logits at position t predict token t + 1: the prompt's last position predicts the first new token
    assert b.labels.tolist() == [[-100, -100, 1, 2, -100], [-100, 3, 4, 0, 7]]


# ----------------------------------------------------------------------------------------------
# runs
# ----------------------------------------------------------------------------------------------
WORDS = "the king queen sword crown river stone light dark night day walks sings falls rises over under".split()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A text file, a BPE tokenizer and a saved tiny teacher with confident (peaked) predictions."""
    from evolm.loading import save
    from evolm.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("distill")
    rng = random.Random(0)
    docs = [{"id": f"d{d}", "text": "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + "."
                                              for _ in range(30))} for d in range(40)]
    data = root / "text.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in docs))
    tok = train_bpe([d["text"] for d in docs], vocab_size=320, special_tokens=["<|endoftext|>"])
    torch.manual_seed(1)
    teacher = build(get_preset("tiny-llama", vocab_size=len(tok)))
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40)
    save(teacher, root / "teacher", tokenizer=tok)
    return root, data, tok


def _config(setup, out, steps=8, stop_after=None, resume=False, objective=None, **kw) -> DistillConfig:
    root, data, tok = setup
    return DistillConfig(teacher=str(root / "teacher"), student="tiny-llama", data=str(data), out=str(out),
                         student_override=(f"vocab_size={len(tok)}", "n_layers=1"), seq_len=32, batch_size=4,
                         val_rows=4, objective=objective or DistillOptions(),
                         loop=LoopOptions(steps=steps, lr=1e-2, warmup_ratio=0.0, schedule="cosine", eval_every=0,
                                          log_every=1, stop_after=stop_after, resume=resume, seed=3), **kw)


def test_distillation_lowers_the_kl_to_the_teacher_and_resumes_bitwise(setup, tmp_path):
    fkl = DistillOptions(beta=0.0)
    full = run_distill(_config(setup, tmp_path / "a", steps=12, objective=fkl), log=lambda s: None)
    assert full["val_kl"] < 0.7 * full["before"]["val_kl"]
    run_distill(_config(setup, tmp_path / "b", steps=12, stop_after=5, objective=fkl), log=lambda s: None)
    resumed = run_distill(_config(setup, tmp_path / "b", steps=12, resume=True, objective=fkl), log=lambda s: None)
    assert resumed["losses"] == full["losses"] and len(full["losses"]) == 12
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    from evolm.loading import load

    student, tok = load(tmp_path / "a")  # the run folder is a model with the teacher's tokenizer
    assert student.config.n_layers == 1 and tok is not None and len(tok) == len(setup[2])


def test_on_policy_run_samples_from_the_student_and_resumes_bitwise(setup, tmp_path):
    opts = DistillOptions(beta=1.0, lmbda=0.5, prompt_len=8, max_new_tokens=6)
    rows = lambda s: [json.loads(x) for x in (s / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    full = run_distill(_config(setup, tmp_path / "a", steps=6, objective=opts), log=lambda s: None)
    flags = [r["on_policy"] for r in rows(tmp_path / "a") if "on_policy" in r]
    assert 0 < sum(flags) < len(flags)  # some steps on the student's samples, some on the data
    run_distill(_config(setup, tmp_path / "b", steps=6, stop_after=3, objective=opts), log=lambda s: None)
    resumed = run_distill(_config(setup, tmp_path / "b", steps=6, resume=True, objective=opts), log=lambda s: None)
    assert resumed["losses"] == full["losses"]


def test_cross_entropy_baseline_runs_no_teacher_while_training(setup):
    root, data, tok = setup
    from evolm.loading import load

    teacher, _ = load(root / "teacher")
    student = build(get_preset("tiny-llama", vocab_size=len(tok), n_layers=1))
    rows = torch.randint(0, len(tok), (8, 17))
    calls = []
    teacher.register_forward_hook(lambda *a: calls.append(1))
    task = DistillTask(student, teacher, rows, rows[:2], DistillOptions(kd_weight=0.0, ce_weight=1.0),
                       batch_size=4, tokenizer=tok, seed=0)
    loss, m = task.loss(student, task.next_batch())
    assert not calls and set(m) >= {"ce", "tokens"} and "kd" not in m
    want = student(rows[task.order[:4], :-1], targets=rows[task.order[:4], 1:])
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    held_out = task.evaluate(student)
    assert set(held_out) >= {"val_kl", "val_loss"} and "val_distill" not in held_out
    assert calls  # the held-out KL needs the teacher


# ----------------------------------------------------------------------------------------------
# vocabularies
# ----------------------------------------------------------------------------------------------
def test_vocabulary_size_mismatch_names_both_sizes(setup, tmp_path, capsys):
    from evolm.cli import main

    root, data, _ = setup
    with pytest.raises(SystemExit):
        main(["distill", "--teacher", str(root / "teacher"), "--student", "tiny-llama", "--data", str(data),
              "--out", str(tmp_path / "r"), "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "320" in err[0] and "512" in err[0] and "same vocabulary" in err[0]


def test_same_size_different_tokens_names_the_first_differing_token(setup):
    from evolm.tokenizer import train_bpe

    _, _, tok = setup
    rng = random.Random(1)
    words = ["".join(rng.choice("xyzqjkvw") for _ in range(rng.randint(2, 7))) for _ in range(400)]
    other = train_bpe([" ".join(rng.choice(words) for _ in range(2000))], vocab_size=len(tok),
                      special_tokens=["<|endoftext|>"])
    assert len(other) == len(tok)
    a = build(get_preset("tiny-llama", vocab_size=len(tok), n_layers=1))
    b = build(get_preset("tiny-llama", vocab_size=len(tok), n_layers=1))
    first = next(i for i in range(len(tok)) if tok.id_to_token(i) != other.id_to_token(i))
    with pytest.raises(VocabularyMismatchError, match=f"differ first at id {first}: teacher "
                                                      f"{tok.id_to_token(first)!r}, student"):
        check_vocabularies(a, b, tok, other, "T", "S")
    check_vocabularies(a, b, tok, tok, "T", "S")  # the same tokenizer passes


def test_flags_fill_the_config_and_bad_values_are_named(setup, tmp_path):
    root, data, _ = setup
    c = cli_config(DistillConfig, teacher=root / "teacher", student="tiny-llama", data=data, beta=0.0, lmbda=0.25,
                   seq_kd=True, student_override="n_layers=2", steps=3)
    assert (c.objective.beta, c.objective.lmbda, c.objective.seq_kd, c.student_override, c.loop.steps) == \
        (0.0, 0.25, True, ("n_layers=2",), 3)
    with pytest.raises(ValueError, match=r"DistillOptions.beta \(--beta\): beta must be in \[0, 1\]"):
        DistillOptions(beta=1.5)
    with pytest.raises(ValueError, match=r"--student-override 'n_layers': expected KEY=VALUE"):
        DistillConfig(teacher="t", student="s", data="d", student_override=("n_layers",))
