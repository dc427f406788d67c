"""GRPO: advantages, the clipped surrogate and the k3 KL are the DeepSeekMath formulas (and TRL's
numbers), gradients reach only the policy's completion tokens, rewards parse answers, and a tiny
run raises its reward.

References: DeepSeekMath (Shao et al. 2024, arXiv:2402.03300) eq. 3-4 written out here as plain
Python loops; Schulman's k3 estimator checked for unbiasedness by exact expectation; TRL's
``GRPOTrainer._compute_loss`` where TRL is installed.
"""

from __future__ import annotations

import collections
import json
import math
import os
import statistics
import types

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evolm.config import ModelConfig  # noqa: E402
from evolm.model import Transformer  # noqa: E402
from evolm.post import rewards as R  # noqa: E402
from evolm.post.grpo import (GRPOConfig, GRPOOptions, GRPOTask, Prompt, group_advantages, grpo_loss,  # noqa: E402
                             k3_kl, load_task, run_grpo)
from evolm.post.logprobs import completion_batch, token_logprobs  # noqa: E402
from conftest import cli_config

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------------------------
# the math against the paper, written out independently
# ----------------------------------------------------------------------------------------------
def test_group_advantages_are_group_normalised_rewards():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    got = group_advantages(torch.tensor(rewards), 4).tolist()
    for g in range(3):
        r = rewards[4 * g:4 * g + 4]
        mu, sd = statistics.mean(r), statistics.stdev(r)  # sample std, as TRL
        for i in range(4):
            assert got[4 * g + i] == pytest.approx((r[i] - mu) / (sd + 1e-4), abs=1e-6)
    assert got[8:] == [0.0] * 4  # equal rewards: no signal
    unscaled = group_advantages(torch.tensor(rewards), 4, scale=False).tolist()
    assert unscaled[:4] == pytest.approx([0.5, -0.5, -0.5, 0.5])
    with pytest.raises(ValueError, match="groups of 5"):
        group_advantages(torch.tensor(rewards), 5)


def test_k3_is_the_formula_and_an_unbiased_nonnegative_kl_estimate():
    g = torch.Generator().manual_seed(0)
    logits_p, logits_q = torch.randn(50, generator=g, dtype=torch.float64), torch.randn(50, generator=g,
                                                                                          dtype=torch.float64)
    lp, lq = torch.log_softmax(logits_p, 0), torch.log_softmax(logits_q, 0)
    k3 = k3_kl(lp, lq)
    for i in range(5):
        ratio = math.exp(lq[i].item() - lp[i].item())
        assert k3[i].item() == pytest.approx(ratio - math.log(ratio) - 1, rel=1e-12)
    assert (k3 >= 0).all()
    exact_kl = (lp.exp() * (lp - lq)).sum()  # KL(p || q)
    assert (lp.exp() * k3).sum().item() == pytest.approx(exact_kl.item(), rel=1e-10)  # E_p[k3] = KL


def _paper_objective(logps, old, ref, adv, lengths, eps, beta):
    """-J of DeepSeekMath eq. 3 as nested Python loops over completions and tokens."""
    total = 0.0
    for i, n in enumerate(lengths):
        s = 0.0
        for t in range(n):
            rho = math.exp(logps[i][t] - old[i][t])
            surrogate = min(rho * adv[i], min(max(rho, 1 - eps), 1 + eps) * adv[i])
            kl = math.exp(ref[i][t] - logps[i][t]) - (ref[i][t] - logps[i][t]) - 1
            s += surrogate - beta * kl
        total += s / n
    return -total / len(lengths)


@pytest.mark.parametrize("beta,iterations", [(0.04, 1), (0.1, 2), (0.0, 2)])
def test_grpo_loss_is_the_papers_objective(beta, iterations):
    g = torch.Generator().manual_seed(1)
    B, T = 6, 7
    lengths = [7, 3, 5, 1, 6, 4]
    mask = torch.zeros(B, T)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    logps = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    old = logps + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3 if iterations > 1 else None
    ref = logps + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    loss, metrics = grpo_loss(logps, old, ref, adv, mask, clip=0.2, beta=beta)
    o = (old if old is not None else logps).tolist()
    want = _paper_objective(logps.tolist(), o, ref.tolist(), adv.tolist(), lengths, 0.2, beta)
    assert loss.item() == pytest.approx(want, rel=1e-10)
    if iterations > 1:
        assert 0 < metrics["clip_ratio"] < 1


@pytest.mark.slow  # importing TRL takes ~10-25 s
@pytest.mark.parametrize("beta,clip_high", [(0.04, None), (0.0, 0.28)])
def test_grpo_loss_equals_trl(beta, clip_high):
    pytest.importorskip("trl")
    from trl.trainer.grpo_trainer import GRPOTrainer

    g = torch.Generator().manual_seed(2)
    B, T = 8, 6
    mask = (torch.arange(T)[None] < torch.randint(1, T + 1, (B, 1), generator=g)).long()
    logps = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    old = logps.detach() + torch.randn(B, T, generator=g) * 0.3
    ref = logps.detach() + torch.randn(B, T, generator=g) * 0.5
    adv = torch.randn(B, generator=g)

    class Acc:
        num_processes = 1
        gather = staticmethod(lambda x: x)
        reduce = staticmethod(lambda x, reduction="sum": x)

    fake = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros(B, T), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token", beta=beta,
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None), loss_type="grpo",
        epsilon_low=0.2, epsilon_high=clip_high or 0.2, use_vllm=False, model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1, _entropy_bonus_enabled=False, aux_loss_enabled=False,
        accelerator=Acc, _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
    inputs = {"prompt_ids": torch.zeros(B, 2, dtype=torch.long), "prompt_mask": torch.ones(B, 2, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask,
              "advantages": adv, "old_per_token_logps": old, "ref_per_token_logps": ref}
    want = GRPOTrainer._compute_loss(fake, None, inputs)
    want_grad, = torch.autograd.grad(want, logps)
    got, metrics = grpo_loss(logps, old, ref, adv, mask, clip=0.2, beta=beta, clip_high=clip_high)
    got_grad, = torch.autograd.grad(got, logps)
    assert got.item() == pytest.approx(want.item(), abs=1e-6)
    assert torch.allclose(got_grad, want_grad, atol=1e-7)
    if beta:
        assert metrics["kl"] == pytest.approx(fake._metrics["train"]["kl"][0], abs=1e-6)


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------
def _tiny(vocab: int = 64, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=128,
                                   norm="rmsnorm", pos_emb="rope", mlp="glu", activation="silu", init_std=0.05))


def test_gradients_reach_only_the_policy_through_completion_tokens():
    """One update per batch: grad = -1/G sum_i A_i/|o_i| sum_t grad log pi(o_it) (+ KL); prompts and
    padding contribute nothing, and the frozen reference gets no gradient."""
    import copy

    policy = _tiny()
    ref = copy.deepcopy(policy).requires_grad_(False)
    with torch.no_grad():  # make the reference differ
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    prompts, comps = [[1, 2, 3], [4, 5], [6, 7, 8, 9]], [[10, 11], [12, 13, 14, 15], [16]]
    ids, mask = completion_batch(prompts, comps)
    adv = torch.tensor([1.0, -0.5, 0.25])

    captured = {}

    def keep_logits(module, inputs, output):
        output.retain_grad()
        captured["logits"] = output

    h = policy.register_forward_hook(keep_logits)
    logps = token_logprobs(policy, ids, mask)
    h.remove()
    with torch.no_grad():
        ref_lp = token_logprobs(ref, ids, mask)
    loss, _ = grpo_loss(logps, None, ref_lp, adv, mask, beta=0.1)
    loss.backward()
    grad_logits = captured["logits"].grad  # (B, k, V): the last k positions; position t predicts token t + 1
    off = ids.shape[1] - grad_logits.shape[1]  # columns before it had no head at all (logits_to_keep)
    for b, (p, c) in enumerate(zip(prompts, comps)):
        scored = range(len(p) - 1, len(p) + len(c) - 1)  # positions whose next token is a completion token
        for t in range(ids.shape[1]):
            norm = grad_logits[b, t - off].abs().sum().item() if t >= off else 0.0
            assert (norm > 0) == (t in scored), (b, t, norm)
    assert all(p.grad is None for p in ref.parameters())

    # beta = 0: the gradient is exactly the policy-gradient formula
    policy.zero_grad()
    logps = token_logprobs(policy, ids, mask)
    loss, _ = grpo_loss(logps, None, None, adv, mask, beta=0.0)
    loss.backward()
    got = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    logps = token_logprobs(policy, ids, mask)
    n_tok = mask.sum(1).float()
    (-(adv * (logps * mask).sum(1) / n_tok).mean()).backward()
    for n, p in policy.named_parameters():
        assert torch.allclose(got[n], p.grad, atol=1e-7), n


def test_clipped_tokens_get_no_gradient():
    logps = torch.tensor([[0.0, -1.0, -1.0, -1.0]], requires_grad=True)
    old = torch.tensor([[0.0, -1.5, -1.0, -0.5]])  # ratios e^0.5 (clipped for A>0), 1, e^-0.5
    mask = torch.tensor([[0, 1, 1, 1]])
    loss, m = grpo_loss(logps, old, None, torch.tensor([1.0]), mask, clip=0.2, beta=0.0)
    loss.backward()
    assert logps.grad[0, 1] == 0 and logps.grad[0, 2] != 0 and logps.grad[0, 3] != 0
    assert m["clip_ratio"] == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------------------------
# rewards
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", "18"),
    ("The answer is 1,234.", "1,234"),
    ("13 + 14 = 27", "27"),
    ("It costs $5.50, so the answer: 11", "11"),
    ("no number here", None),
    ("#### -3", "-3"),
])
def test_extract_answer(text, want):
    assert R.extract_answer(text) == want


def test_exact_numeric_compares_values_and_reads_gsm8k_references():
    gsm = "Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 duck eggs a day.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18"
    assert R.exact_numeric("q", "so she earns 18 dollars", gsm) == 1.0
    assert R.exact_numeric("q", "#### 18.0", "18") == 1.0
    assert R.exact_numeric("q", "The answer is 1,000", "1000") == 1.0
    assert R.exact_numeric("q", "#### 17", gsm) == 0.0
    assert R.exact_numeric("q", "I don't know", "5") == 0.0
    with pytest.raises(ValueError, match="holds no number"):
        R.exact_numeric("q", "5", "five")


def test_format_reward_wants_the_gsm8k_answer_line_at_the_end():
    assert R.format_reward("q", "2 + 2 = 4\n#### 4", "4") == 1.0
    assert R.format_reward("q", "#### 4.\n", "4") == 1.0
    assert R.format_reward("q", "#### 4 is my answer, or maybe 5", "4") == 0.0
    assert R.format_reward("q", "4", "4") == 0.0


def test_user_reward_functions_load_from_module_or_file(tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("def short(prompt, completion, answer):\n    return -len(completion) / 10\n"
                 "def wrong(prompt):\n    return 0.0\nVALUE = 3\n")
    fn = R.load_reward_fn(f"{f}:short")
    assert fn("p", "abc", "a") == pytest.approx(-0.3)
    assert R.load_reward_fn("evolm.post.rewards:exact_numeric") is R.exact_numeric
    with pytest.raises(ValueError, match="expected 'module:function'"):
        R.load_reward_fn("evolm.post.rewards")
    with pytest.raises(ValueError, match="cannot import module 'no_such_mod'"):
        R.load_reward_fn("no_such_mod:f")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        R.load_reward_fn(f"{f}:nope")
    with pytest.raises(ValueError, match="not a function"):
        R.load_reward_fn(f"{f}:VALUE")
    with pytest.raises(ValueError, match="must accept three positional arguments"):
        R.load_reward_fn(f"{f}:wrong")
    with pytest.raises(ValueError, match="file .* not found"):
        R.load_reward_fn(f"{tmp_path}/missing.py:f")
    with pytest.raises(ValueError, match="unknown built-in reward 'acc'"):
        R.resolve_rewards("acc")
    rs = R.resolve_rewards("exact_numeric,format", [f"{f}:short"], [1.0, 0.5, 2.0])
    total, parts = R.score(rs, "p", "#### 4", "4")
    assert total == pytest.approx(1.0 + 0.5 - 2 * 0.6) and set(parts) == {"exact_numeric", "format", "short"}


def test_tasks():
    train, val = load_task("arith", 10, 4)
    assert len(train) == 10 and len(val) == 4
    a, b = [int(x) for x in train[0].text.split("What is ")[1].split("?")[0].split(" + ")]
    assert train[0].answer == str(a + b)
    assert {p.text for p in train}.isdisjoint({p.text for p in val}) or len(train) > 0
    with pytest.raises(ValueError, match="neither a built-in task"):
        load_task("nope")


def test_gsm8k_mini_reads_the_local_benchmark_copy():
    try:
        train, val = load_task("gsm8k-mini", 5, 3)
    except FileNotFoundError as e:
        pytest.skip(f"missing asset benchmark data (required; install: make eval-data): {e}")
    assert len(train) == 5 and len(val) == 3
    assert "#### <number>" in train[0].text and train[0].answer.strip().splitlines()[-1].startswith("####")
    ref = R.extract_answer(train[0].answer)
    assert R.exact_numeric(train[0].text, f"The total is {ref}.\n#### {ref}", train[0].answer) == 1.0


# ----------------------------------------------------------------------------------------------
# end to end on a tiny model
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def word_tokenizer():
    from evolm.tokenizer import train_bpe

    texts = ["yes no maybe yes no yes", "Say yes or no.", "Question: answer"] * 30
    return train_bpe(texts, vocab_size=280, special_tokens=["<|endoftext|>"])


def _model_dir(tmp_path, tok):
    from evolm.loading import save

    path = tmp_path / "tiny"
    save(_tiny(tok.vocab_size), path, tokenizer=tok)
    return path


def _args(**kw) -> GRPOConfig:
    return cli_config(GRPOConfig, **kw)


SEED = 0


def test_tiny_run_raises_the_reward(tmp_path, word_tokenizer):
    """Reward = share of lowercase letters in the completion (a dense signal: a random model scores ~0.1)."""
    rfile = tmp_path / "my_reward.py"
    rfile.write_text("def lower(prompt, completion, answer):\n"
                     "    return sum(c.islower() for c in completion) / max(1, len(completion))\n")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Question {i}: Say yes or no.", "answer": "yes"}) + "\n"
                               for i in range(20)))
    s = run_grpo(_args(model=_model_dir(tmp_path, word_tokenizer), task=prompts, reward="", reward_fn=f"{rfile}:lower",
                       no_chat=True, out=tmp_path / "run", steps=30, group=8, prompts_per_step=2,
                       max_new_tokens=6, lr=1e-2, beta=0.04, warmup_ratio=0, n_val=4, log_every=1, seed=SEED))
    curve = s["reward_curve"]
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert last > first + 0.2, curve
    assert s["val_reward"] > s["before"]["val_reward"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward", "kl", "clip_ratio", "reward_std", "completion_len"} <= set(rows[-1])
    assert (tmp_path / "run" / "grpo_eval.json").is_file()


def test_grpo_resumes_exactly(tmp_path, word_tokenizer):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Say yes {i}", "answer": str(i)}) + "\n" for i in range(9)))
    rfile = tmp_path / "len_reward.py"
    rfile.write_text("def length(prompt, completion, answer):\n    return float(len(completion))\n")
    common = dict(model=_model_dir(tmp_path, word_tokenizer), task=prompts, reward_fn=f"{rfile}:length",
                  reward="", no_chat=True, steps=4, group=4, prompts_per_step=1, max_new_tokens=4, lr=1e-2,
                  iterations=2, warmup_ratio=0)
    full = run_grpo(_args(out=tmp_path / "a", **common))
    run_grpo(_args(out=tmp_path / "b", stop_after=2, **common))
    resumed = run_grpo(_args(out=tmp_path / "b", resume=True, **common))
    assert resumed["losses"] == full["losses"]  # bit for bit: the cached rollout batch is restored too
    assert resumed["reward_curve"] == full["reward_curve"]


def test_clear_errors(tmp_path, word_tokenizer):
    with pytest.raises(ValueError, match="cannot import module 'nowhere'"):
        run_grpo(_args(model=tmp_path / "absent", task="arith", reward_fn="nowhere:f"))
    with pytest.raises(ValueError, match="--reference none gives none"):
        GRPOOptions(reference="none", beta=0.04)
    with pytest.raises(ValueError, match="precompute does not apply"):
        GRPOOptions(reference="precompute")
    with pytest.raises(ValueError, match="--group must be >= 2"):
        GRPOOptions(group=1)
    model = _tiny(word_tokenizer.vocab_size)
    with pytest.raises(ValueError, match="no chat template"):
        task = GRPOTask(model, word_tokenizer, [Prompt("hi", "1")], [], R.resolve_rewards("exact_numeric"),
                        GRPOOptions(beta=0.0))
        task.make_batch()


def test_prompt_file_errors_name_the_line(tmp_path):
    from evolm.post.grpo import read_prompts

    with pytest.raises(FileNotFoundError, match="no such prompt file"):
        read_prompts(tmp_path / "missing.jsonl")
    f = tmp_path / "p.jsonl"
    for text, msg in [('{"prompt": "2+2?", "answer": 4}\n{oops\n', r"p\.jsonl:2: not valid JSON"),
                      ('{"answer": 4}\n', r"p\.jsonl:1: field 'prompt' must be"),
                      ('{"prompt": "x", "answer": [1]}\n', r"p\.jsonl:1: field 'answer' must be"),
                      ('\n\n', r"no prompts \(empty file\)")]:
        f.write_text(text)
        with pytest.raises(ValueError, match=msg):
            read_prompts(f)
    f.write_text('{"question": "1+1?", "answer": 2}\n\n{"prompt": [{"role": "user", "content": "3+4?"}], "answer": "7"}\n')
    got = read_prompts(f)
    assert [p.answer for p in got] == ["2", "7"]
