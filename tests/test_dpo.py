"""DPO / cDPO / IPO / SimPO: the losses are the papers' formulas and TRL's numbers, completion
log-probs are transformers' log-softmax, the reference is what it should be, and a tiny run learns.

References:
- the formulas of Rafailov et al. 2023 (DPO), Mitchell 2023 (cDPO), Azar et al. 2023 (IPO, eq. 17,
  with TRL's per-token averaging) and Meng et al. 2024 (SimPO, eq. 6), written out here in plain
  Python floats;
- TRL itself where it is installed: ``DPOTrainer._compute_loss`` (sigmoid and IPO) and
  ``CPOTrainer.cpo_loss`` (sigmoid with label smoothing = cDPO, and SimPO), called on the same
  log-probs;
- transformers' Llama logits for the per-token log-probs.
"""

from __future__ import annotations

import collections
import json
import math
import os
import types

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evolm.config import ModelConfig  # noqa: E402
from evolm.model import Transformer  # noqa: E402
from evolm.post.dpo import (DPOConfig, DPOOptions, DPOTask, collate_pairs, encode_pairs,  # noqa: E402
                            preference_loss, run_dpo)
from evolm.post.logprobs import Reference, completion_batch, token_logprobs  # noqa: E402
from conftest import cli_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _rand_logps(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, generator=g, dtype=torch.float64) * 4 - 25) for _ in range(4)], \
        torch.randint(2, 30, (n,), generator=g), torch.randint(2, 30, (n,), generator=g)


# ----------------------------------------------------------------------------------------------
# the losses: paper formulas
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.0), (0.1, 0.2)])
def test_dpo_and_cdpo_are_the_papers_formula(beta, eps):
    (c, r, rc, rr), _, _ = _rand_logps(6, 1)
    out = preference_loss(c, r, rc, rr, beta=beta, label_smoothing=eps)
    for i in range(6):
        h = beta * ((c[i] - rc[i]) - (r[i] - rr[i])).item()
        want = -(1 - eps) * math.log(_sig(h)) - eps * math.log(_sig(-h))
        assert out.losses[i].item() == pytest.approx(want, rel=1e-10)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * (c[i] - rc[i]).item())
        assert out.rejected_rewards[i].item() == pytest.approx(beta * (r[i] - rr[i]).item())


def test_ipo_is_squared_distance_to_half_inverse_beta_of_token_averaged_log_ratios():
    (c, r, rc, rr), nc, nr = _rand_logps(5, 2)
    beta = 0.3
    out = preference_loss(c, r, rc, rr, loss_type="ipo", beta=beta, chosen_lengths=nc, rejected_lengths=nr)
    for i in range(5):
        h = (c[i] - rc[i]).item() / nc[i].item() - (r[i] - rr[i]).item() / nr[i].item()
        assert out.losses[i].item() == pytest.approx((h - 1 / (2 * beta)) ** 2, rel=1e-10)


def test_simpo_is_length_normalised_and_reference_free():
    (c, r, _, _), nc, nr = _rand_logps(5, 3)
    beta, gamma = 2.0, 0.8
    out = preference_loss(c, r, loss_type="simpo", beta=beta, gamma=gamma, chosen_lengths=nc, rejected_lengths=nr)
    for i in range(5):
        h = beta * c[i].item() / nc[i].item() - beta * r[i].item() / nr[i].item() - gamma
        assert out.losses[i].item() == pytest.approx(-math.log(_sig(h)), rel=1e-10)
        assert out.chosen_rewards[i].item() == pytest.approx(beta * c[i].item() / nc[i].item())


def test_policy_equal_to_reference_gives_log2_and_zero_rewards():
    x = torch.randn(4) - 20
    out = preference_loss(x, x - 3, x, x - 3, beta=0.1)
    assert torch.allclose(out.losses, torch.full((4,), math.log(2.0)))
    m = out.metrics()
    assert m["rewards/margin"] == 0 and m["rewards/accuracy"] == 0


def test_bad_settings_say_what_is_wrong():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="label-smoothing"):
        preference_loss(x, x, x, x, label_smoothing=0.5)
    with pytest.raises(ValueError, match="unknown preference loss"):
        preference_loss(x, x, x, x, loss_type="kto")
    with pytest.raises(ValueError, match="only simpo works without a reference"):
        preference_loss(x, x, beta=0.1)
    with pytest.raises(ValueError, match="--reference none gives none"):
        DPOOptions(loss="dpo", reference="none")
    assert DPOOptions(loss="simpo", reference="none").loss_beta == 2.0


# ----------------------------------------------------------------------------------------------
# the losses: TRL's own code on the same inputs
# ----------------------------------------------------------------------------------------------
class _Acc:
    device = torch.device("cpu")
    num_processes = 1
    gather = staticmethod(lambda x: x)
    gather_for_metrics = staticmethod(lambda x: x)


@pytest.fixture(scope="module")
def trl_trainers():
    pytest.importorskip("trl")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.cpo.cpo_trainer import CPOTrainer
    from trl.trainer.dpo_trainer import DPOTrainer

    return DPOTrainer, CPOTrainer


@pytest.mark.slow  # importing TRL takes ~10-25 s
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_and_ipo_equal_trl_dpotrainer(trl_trainers, loss_type):
    """TRL's DPOTrainer._compute_loss on per-token log-probs we hand it (its model is faked)."""
    DPOTrainer, _ = trl_trainers
    B, T, beta = 4, 10, 0.3
    g = torch.Generator().manual_seed(0)
    cm = torch.zeros(2 * B, T, dtype=torch.long)
    for i in range(2 * B):
        s = 1 + i % 3
        cm[i, s:T - i % 4] = 1
    per_token = (torch.randn(2 * B, T - 1, generator=g) * 0.5 - 2) * cm[:, 1:]
    ref_c, ref_r = torch.randn(B, generator=g) * 3 - 10, torch.randn(B, generator=g) * 3 - 10

    def fake_model(**kw):
        z = torch.zeros(2 * B, T - 1)
        return types.SimpleNamespace(log_probs=per_token, entropy=z, mean_logits=z, is_top1=z.bool())

    fake_self = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=_Acc, aux_loss_enabled=False, ld_alpha=None,
        precompute_ref_logps=True, f_divergence_type="reverse_kl", loss_types=[loss_type], loss_weights=[1.0],
        beta=beta, label_smoothing=0.0, use_weighting=False, _total_train_tokens=0, _tp_size=1,
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)))
    inputs = dict(input_ids=torch.zeros(2 * B, T, dtype=torch.long), attention_mask=torch.ones(2 * B, T),
                  completion_mask=cm, ref_chosen_logps=ref_c, ref_rejected_logps=ref_r)
    want = DPOTrainer._compute_loss(fake_self, fake_model, inputs, False)

    logps, n = per_token.sum(1), cm[:, 1:].sum(1)
    ours = preference_loss(logps[:B], logps[B:], ref_c, ref_r, loss_type={"sigmoid": "dpo"}.get(loss_type, loss_type),
                           beta=beta, chosen_lengths=n[:B], rejected_lengths=n[B:])
    assert ours.losses.mean().item() == pytest.approx(want.item(), abs=1e-6)
    trl_metrics = {k: v[0] for k, v in fake_self._metrics["train"].items()}
    m = ours.metrics()
    for ours_key, trl_key in (("rewards/chosen", "rewards/chosen"), ("rewards/rejected", "rewards/rejected"),
                              ("rewards/margin", "rewards/margins"), ("rewards/accuracy", "rewards/accuracies")):
        assert m[ours_key] == pytest.approx(trl_metrics[trl_key], abs=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type,beta,eps", [("sigmoid", 0.2, 0.15), ("simpo", 2.0, 0.0), ("simpo", 2.5, 0.1)])
def test_cdpo_and_simpo_equal_trl_cpo_loss(trl_trainers, loss_type, beta, eps):
    """cDPO = TRL's sigmoid loss with label smoothing; SimPO = TRL's CPO trainer with loss_type='simpo'."""
    _, CPOTrainer = trl_trainers
    (c, r, rc, rr), nc, nr = _rand_logps(7, 4)
    fake_self = types.SimpleNamespace(alpha=0.0, beta=beta, label_smoothing=eps, loss_type=loss_type,
                                      simpo_gamma=0.7, accelerator=_Acc)
    if loss_type == "sigmoid":  # DPO's logits: CPO's formula on the log-ratios
        want, _, _ = CPOTrainer.cpo_loss(fake_self, c - rc, r - rr)
        ours = preference_loss(c, r, rc, rr, beta=beta, label_smoothing=eps)
    else:  # TRL averages the log-probs per token for SimPO (average_log_prob=True)
        want, want_c, want_r = CPOTrainer.cpo_loss(fake_self, c / nc, r / nr)
        ours = preference_loss(c, r, loss_type="simpo", beta=beta, gamma=0.7, label_smoothing=eps,
                               chosen_lengths=nc, rejected_lengths=nr)
        assert torch.allclose(ours.chosen_rewards, want_c) and torch.allclose(ours.rejected_rewards, want_r)
    assert torch.allclose(ours.losses, want, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# completion log-probs
# ----------------------------------------------------------------------------------------------
def test_completion_logprobs_match_transformers_log_softmax():
    """Right-padded prompt+completion rows scored in one pass == transformers' Llama, row by row."""
    transformers = pytest.importorskip("transformers")
    from evolm.interop.hf import build_from_state_dict, config_from_hf, state_dict_from_hf

    hf_cfg = dict(model_type="llama", vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_cfg)).eval()
    cfg = config_from_hf(dict(hf_cfg))
    ours = build_from_state_dict(cfg, state_dict_from_hf(hf.state_dict(), cfg, "llama")).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (3, 7, 1, 5)]
    comps = [torch.randint(0, 96, (n,), generator=g).tolist() for n in (6, 2, 9, 4)]
    ids, mask = completion_batch(prompts, comps, pad_id=0)
    with torch.no_grad():
        lp = token_logprobs(ours, ids, mask)
        for b, (p, c) in enumerate(zip(prompts, comps)):
            row = torch.tensor([p + c])
            ref = torch.log_softmax(hf(row).logits[0].double(), -1)
            want = ref[len(p) - 1:-1].gather(-1, torch.tensor(c)[:, None])[:, 0]
            got = lp[b, len(p):len(p) + len(c)]
            assert torch.allclose(got.double(), want, atol=1e-5), (b, got, want)
            assert lp[b, :len(p)].abs().sum() == 0 and lp[b, len(p) + len(c):].abs().sum() == 0


def test_temperature_scales_the_logits_before_normalising():
    model = _tiny_model(vocab=50)
    ids, mask = completion_batch([[1, 2, 3]], [[4, 5]])
    with torch.no_grad():
        logits = model(ids)[0].double() / 0.7
        want = torch.log_softmax(logits, -1)[2:4].gather(-1, ids[0, 3:5, None])[:, 0]
        got = token_logprobs(model, ids, mask, temperature=0.7)[0, 3:5]
    assert torch.allclose(got.double(), want, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# a tiny chat model, tokenizer and preference data
# ----------------------------------------------------------------------------------------------
def _tiny_model(vocab: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=vocab, d_model=48, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                                   max_seq_len=256, norm="rmsnorm", pos_emb="rope", mlp="glu", activation="silu",
                                   tie_embeddings=True, init_std=0.05))


COLORS = ["red", "blue", "green", "black", "white", "pink", "gold", "gray"]


def _pairs_rows(n: int, seed: int = 0) -> list[dict]:
    """A preference a tiny model learns in a few steps: the chosen reply agrees ("Sure, red."), the
    rejected one refuses with another colour ("No. blue.")."""
    import random

    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.sample(COLORS, 2)
        rows.append({"prompt": f"Say {a}.", "chosen": f"Sure, {a}.", "rejected": f"No. {b}."})
    return rows


@pytest.fixture(scope="module")
def chat_tokenizer():
    from evolm.post.data import CHATML
    from evolm.tokenizer import train_bpe

    texts = [f"<|im_start|>user\nSay {a}.<|im_end|>\n<|im_start|>assistant\nSure, {a}. No. {a}.<|im_end|>\n"
             for a in COLORS] * 20
    return train_bpe(texts, vocab_size=300, special_tokens=["<|im_end|>", "<|im_start|>"], chat_template=CHATML)


@pytest.fixture
def pref_files(tmp_path):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in _pairs_rows(48, 0)))
    val.write_text("".join(json.dumps(r) + "\n" for r in _pairs_rows(16, 1)))
    return train, val


def _encoded(tok, path):
    from evolm.post.data import load_preferences

    enc, dropped = encode_pairs(tok, load_preferences(path), 128)
    assert dropped == 0
    return enc


def test_batch_is_chosen_rows_then_rejected_rows_with_response_masks(chat_tokenizer, pref_files):
    enc = _encoded(chat_tokenizer, pref_files[0])[:3]
    b = collate_pairs(enc, pad_id=0)
    assert b["input_ids"].shape[0] == 6
    for i, e in enumerate(enc):
        n = len(e["chosen_ids"])
        assert b["input_ids"][i, :n].tolist() == e["chosen_ids"]
        resp = [t for t, lab in zip(e["chosen_ids"], e["chosen_labels"]) if lab != -100]
        assert b["input_ids"][i][b["completion_mask"][i].bool()].tolist() == resp
        assert chat_tokenizer.decode(resp).startswith(json.loads(pref_files[0].read_text().splitlines()[i])["chosen"])
        m = len(e["rejected_ids"])
        assert b["input_ids"][3 + i, :m].tolist() == e["rejected_ids"]


def test_one_forward_pass_scores_chosen_and_rejected(chat_tokenizer, pref_files):
    enc = _encoded(chat_tokenizer, pref_files[0])
    model = _tiny_model(chat_tokenizer.vocab_size)
    task = DPOTask(model, enc, [], DPOOptions(reference="precompute", batch_size=4))
    calls = []
    h = model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape))
    loss, metrics = task.loss(model, task.next_batch())
    h.remove()
    assert len(calls) == 1 and calls[0][0] == 8
    assert loss.item() == pytest.approx(math.log(2), abs=1e-5)  # the policy is still the reference
    assert metrics["rewards/margin"] == pytest.approx(0, abs=1e-5)


@pytest.mark.parametrize("mode", ["copy", "precompute"])
def test_reference_is_the_frozen_starting_model(chat_tokenizer, pref_files, mode):
    enc = _encoded(chat_tokenizer, pref_files[0])[:8]
    model = _tiny_model(chat_tokenizer.vocab_size)
    task = DPOTask(model, enc, [], DPOOptions(reference=mode, batch_size=4))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    batch = task.next_batch()
    with torch.no_grad():
        ref_before = Reference(model, "copy").sequence_logprobs(batch["input_ids"], batch["completion_mask"])
    loss, _ = task.loss(model, batch)
    loss.backward()
    opt.step()
    opt.zero_grad()
    assert torch.allclose(batch["ref_logps"], ref_before, atol=1e-5)
    if task.ref.frozen is not None:
        assert all(p.grad is None and not p.requires_grad for p in task.ref.frozen.parameters())
        again = task.ref.sequence_logprobs(batch["input_ids"], batch["completion_mask"])
        assert torch.allclose(again, ref_before, atol=1e-5)
    else:
        assert mode == "precompute"  # the copy was dropped after use
    loss2, m = task.loss(model, batch)
    assert loss2.item() < loss.item()  # the step moved the policy, not the reference


def test_lora_reference_is_the_base_with_adapters_off(chat_tokenizer, pref_files):
    from evolm.post.lora import LoRAConfig, apply_lora, lora_modules

    enc = _encoded(chat_tokenizer, pref_files[0])[:4]
    model = _tiny_model(chat_tokenizer.vocab_size)
    base = _tiny_model(chat_tokenizer.vocab_size)  # same seed: same weights
    apply_lora(model, LoRAConfig(r=4, alpha=8))
    for m in lora_modules(model).values():
        torch.nn.init.normal_(m.lora_B.weight, std=0.5)  # a trained adapter: policy != base
    task = DPOTask(model, enc, [], DPOOptions(batch_size=4))
    assert task.ref.mode == "adapters" and task.ref.frozen is None
    b = collate_pairs(enc)
    with torch.no_grad():
        want = token_logprobs(base, b["input_ids"], b["completion_mask"]).sum(-1)
        policy = token_logprobs(model, b["input_ids"], b["completion_mask"]).sum(-1)
    got = task.ref.sequence_logprobs(b["input_ids"], b["completion_mask"])
    assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(policy, want, atol=1e-3)
    again = token_logprobs(model, b["input_ids"], b["completion_mask"]).sum(-1)  # adapters are back on
    assert torch.allclose(again.detach(), policy, atol=1e-6)
    loss, _ = task.loss(model, task.next_batch())
    loss.backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)


def test_held_out_metrics_equal_pair_by_pair_scoring(chat_tokenizer, pref_files):
    """Batched, padded, length-sorted evaluation == each pair scored alone, without padding."""
    enc = _encoded(chat_tokenizer, pref_files[1])
    model = _tiny_model(chat_tokenizer.vocab_size, seed=3)
    ref = _tiny_model(chat_tokenizer.vocab_size, seed=4)
    task = DPOTask(ref, [enc[0]], enc, DPOOptions(beta=0.2, eval_batch_size=5))
    with torch.no_grad():
        got = task.evaluate(model)
        losses, acc, lp_acc = [], [], []
        for e in enc:
            def score(m, side):
                ids = torch.tensor([e[f"{side}_ids"]])
                mask = (torch.tensor([e[f"{side}_labels"]]) != -100).long()
                return token_logprobs(m, ids, mask).sum().item()
            hc = score(model, "chosen") - score(ref, "chosen")
            hr = score(model, "rejected") - score(ref, "rejected")
            losses.append(-math.log(_sig(0.2 * (hc - hr))))
            acc.append(float(hc > hr))
            lp_acc.append(float(score(model, "chosen") > score(model, "rejected")))
    assert got["val_loss"] == pytest.approx(sum(losses) / len(enc), abs=1e-5)
    assert got["val_rewards/accuracy"] == pytest.approx(sum(acc) / len(enc))
    assert got["val_logp_accuracy"] == pytest.approx(sum(lp_acc) / len(enc))


def test_no_reference_possible_is_a_clear_error(chat_tokenizer, pref_files):
    enc = _encoded(chat_tokenizer, pref_files[0])[:4]
    with pytest.raises(ValueError, match="no LoRA adapters to switch off"):
        DPOTask(_tiny_model(chat_tokenizer.vocab_size), enc, [], DPOOptions(reference="adapters"))


# ----------------------------------------------------------------------------------------------
# the command, end to end
# ----------------------------------------------------------------------------------------------
def _save_tiny(tmp_path, tok, seed=0):
    from evolm.loading import save

    path = tmp_path / "tiny-chat"
    save(_tiny_model(tok.vocab_size, seed), path, tokenizer=tok)
    return path


def _args(**kw) -> DPOConfig:
    return cli_config(DPOConfig, **kw)


def test_chosen_equal_to_rejected_names_the_line(tmp_path, chat_tokenizer):
    model = _save_tiny(tmp_path, chat_tokenizer)
    bad = tmp_path / "bad.jsonl"
    rows = _pairs_rows(4) + [{"prompt": "Say red.", "chosen": "Sure, red.", "rejected": "Sure, red."}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"bad.jsonl:5: 'chosen' == 'rejected'"):
        run_dpo(_args(model=model, data=bad, out=tmp_path / "run", steps=1))


@pytest.mark.parametrize("loss", ["dpo", "ipo", "simpo"])
def test_tiny_run_raises_held_out_preference_accuracy(tmp_path, chat_tokenizer, pref_files, loss):
    model = _save_tiny(tmp_path, chat_tokenizer)
    lr = {"dpo": 1e-2, "ipo": 1e-2, "simpo": 1e-2}[loss]
    extra = {"activation_checkpointing": True} if loss == "ipo" else {}  # the same run, less memory
    s = run_dpo(_args(model=model, data=pref_files[0], val=pref_files[1], out=tmp_path / "run", steps=24,
                      batch_size=4, lr=lr, loss=loss, warmup_ratio=0, log_every=4, **extra))
    before, after = s["before"], {k: v for k, v in s.items() if k.startswith("val_")}
    assert after["val_loss"] < before["val_loss"]
    assert after["val_rewards/accuracy"] > max(0.8, before["val_rewards/accuracy"])
    assert after["val_rewards/margin"] > before["val_rewards/margin"]
    assert after["val_logp_accuracy_avg"] >= before["val_logp_accuracy_avg"]
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0  # the starting model, where policy == reference:
    start = {"dpo": math.log(2), "ipo": (1 / (2 * 0.1)) ** 2}  # -log sigmoid(0); (0 - 1/(2 beta))^2
    if loss in start:
        assert rows[0]["val_loss"] == pytest.approx(start[loss], abs=1e-4)
    assert {"rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"} <= set(rows[1])
    assert json.loads((tmp_path / "run" / "dpo_eval.json").read_text())["before"] == before
    from evolm.loading import load

    trained, tok = load(tmp_path / "run")  # the run folder is a model
    assert tok is not None and trained.config.vocab_size == chat_tokenizer.vocab_size


def test_lora_run_writes_an_adapter_and_resumes_exactly(tmp_path, chat_tokenizer, pref_files):
    model = _save_tiny(tmp_path, chat_tokenizer)
    common = dict(model=model, data=pref_files[0], val=pref_files[1], steps=6, batch_size=4, lr=1e-2,
                  lora=True, lora_r=4, lora_targets="q_proj,v_proj", warmup_ratio=0)
    full = run_dpo(_args(out=tmp_path / "a", **common))
    run_dpo(_args(out=tmp_path / "b", stop_after=3, **common))
    resumed = run_dpo(_args(out=tmp_path / "b", resume=True, **common))
    assert resumed["losses"] == full["losses"]
    assert (tmp_path / "a" / "adapter" / "adapter_config.json").is_file()
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "model.safetensors")
    b = load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_full_parameter_run_resumes_bit_exactly(tmp_path, chat_tokenizer, pref_files):
    model = _save_tiny(tmp_path, chat_tokenizer)
    common = dict(model=model, data=pref_files[0], val=pref_files[1], steps=5, batch_size=4, lr=1e-3, warmup_ratio=0)
    full = run_dpo(_args(out=tmp_path / "a", **common))
    run_dpo(_args(out=tmp_path / "b", stop_after=3, **common))
    resumed = run_dpo(_args(out=tmp_path / "b", resume=True, **common))
    assert resumed["losses"] == full["losses"]
    from safetensors.torch import load_file

    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
