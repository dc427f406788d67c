"""SFT on the shared loop: packed == unpacked loss, held-out loss falls, exact resume (full and
LoRA), the outputs (a model folder / a PEFT adapter), and clear errors."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from evolm import build
from evolm.post.data import CHATML, DataError, encode_examples, load_sft
from evolm.post.flags import parse
from evolm.post.sft import SFTConfig, SftTask, collate, plan_batches, run_sft
from evolm.presets import get_preset
from evolm.tokenizer import train_bpe

QUESTIONS = ["What is the capital of France?", "Name a colour.", "Add two and three.", "Say hello.",
             "What do cows drink?", "Count to three.", "Which animal barks?", "Spell cat."]
ANSWERS = ["Paris.", "Blue.", "Five.", "Hello!", "Water.", "One, two, three.", "A dog.", "C-A-T."]


def _rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        q, a = QUESTIONS[i % 8], ANSWERS[i % 8]
        if i % 3 == 0:  # multi-turn
            rows.append({"messages": [{"role": "system", "content": "Answer briefly."},
                                      {"role": "user", "content": q}, {"role": "assistant", "content": a},
                                      {"role": "user", "content": "Again?"}, {"role": "assistant", "content": a}]})
        elif i % 3 == 1:
            rows.append({"prompt": q, "response": a})
        else:
            rows.append({"instruction": q, "input": "", "output": a})
    return rows


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny Llama-style model + a BPE tokenizer with ChatML, saved as an evolm folder; data files."""
    from evolm.loading import save

    d = tmp_path_factory.mktemp("sft")
    texts = [f"{q} {a}" for q, a in zip(QUESTIONS, ANSWERS)] * 30 + ["Answer briefly. Again?"] * 10
    tok = train_bpe(texts, vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                    chat_template=CHATML)
    tok.pad_token = None
    cfg = get_preset("tiny-llama").replace(vocab_size=320, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                           head_dim=16, d_ff=128, max_seq_len=128, rope_scaling=None)
    torch.manual_seed(0)
    save(build(cfg), d / "base", tokenizer=tok)
    base_plain = build(cfg)
    plain = train_bpe(texts, vocab_size=320)  # no chat template
    save(base_plain, d / "base_no_template", tokenizer=plain)
    for name, n in (("train", 48), ("val", 8)):
        (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _rows(n)))
    return d, tok


def _args(workdir, out, *extra) -> SFTConfig:
    d, _ = workdir
    return parse(SFTConfig, ["--model", str(d / "base"), "--data", str(d / "train.jsonl"), "--val",
                             str(d / "val.jsonl"), "--out", str(out), "--steps", "8", "--batch-size", "4", "--max-len",
                             "96", "--lr", "3e-3", "--eval-every", "4", "--log-every", "1", "--ckpt-every", "3",
                             "--samples", "1", "--threads", "1", *extra])


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


# --- packing ----------------------------------------------------------------------------------
def test_packed_loss_and_grads_equal_unpacked(workdir):
    d, tok = workdir
    from evolm.loading import load

    model, _ = load(str(d / "base"))
    model.float()
    ex = encode_examples(tok, load_sft(d / "train.jsonl", limit=5), 96)
    unpacked = collate([[r] for r in ex], pad_id=0, packed=False)
    packed = collate([list(ex[:3]), list(ex[3:])], pad_id=0, packed=True)  # two rows, 3 + 2 conversations
    assert packed.input_ids.shape[0] == 2 and unpacked.input_ids.shape[0] == 5
    assert int((packed.targets != -100).sum()) == int((unpacked.targets != -100).sum())

    def loss_and_grads(b):
        model.zero_grad()
        kw = {"doc_ids": b.doc_ids, "position_ids": b.position_ids} if b.doc_ids is not None else {}
        loss = model(b.input_ids, targets=b.targets, **kw)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    lu, gu = loss_and_grads(unpacked)
    lp, gp = loss_and_grads(packed)
    torch.testing.assert_close(lp, lu, rtol=0, atol=1e-5)
    for a, b in zip(gp, gu):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # and without isolation the loss differs: the mask matters
    with torch.no_grad():
        leaky = model(packed.input_ids, targets=packed.targets)
    assert abs(float(leaky) - float(lu)) > 1e-4


def test_packing_plan_fills_rows_and_uses_every_example_once():
    lengths = [10, 30, 50, 20, 41, 5, 60, 12]
    batches = plan_batches(lengths, list(range(8)), batch_size=2, max_len=64, packing=True)
    rows = [row for b in batches for row in b]
    assert sorted(i for row in rows for i in row) == list(range(8))
    assert all(sum(lengths[i] - 1 for i in row) <= 64 for row in rows)
    assert all(len(b) <= 2 for b in batches)
    unpacked = plan_batches(lengths, list(range(8)), batch_size=3, max_len=64, packing=False)
    assert [len(b) for b in unpacked] == [3, 3, 2]


# --- runs --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def full_run(workdir):
    out = workdir[0] / "full"
    summary = run_sft(_args(workdir, out), log=lambda s: None)
    return out, summary


def test_full_sft_lowers_held_out_loss_and_saves_a_model(full_run, workdir):
    out, s = full_run
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "val_loss" in rows[0] and "loss" not in rows[0]  # before training
    assert [r["step"] for r in rows[1:]] == list(range(1, 9))
    assert all(k in rows[1] for k in ("loss", "lr", "tokens", "tokens_per_s", "trained_tokens", "grad_norm"))
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 4, 8]
    assert s["val_loss"] < s["initial_eval"]["val_loss"] - 0.5
    assert s["trainable_params"] == s["total_params"]
    assert (out / "loss.png").is_file() and (out / "sft_summary.json").is_file()
    from evolm.loading import load

    model, tok = load(str(out))  # the run folder is a model + tokenizer (with the chat template)
    assert tok.chat_template == CHATML
    assert len(s["samples"]) == 1


def test_full_sft_resume_is_bit_exact(full_run, workdir, tmp_path):
    out = tmp_path / "r"
    run_sft(_args(workdir, out, "--stop-after", "5"), log=lambda s: None)  # past the step-3 checkpoint
    assert not (out / "model.safetensors").exists()
    run_sft(_args(workdir, out, "--resume"), log=lambda s: None)
    assert _losses(out) == _losses(full_run[0])


def test_packed_run_trains(workdir, tmp_path):
    s = run_sft(_args(workdir, tmp_path / "p", "--packing", "--batch-size", "1", "--steps", "4"), log=lambda s: None)
    assert s["val_loss"] < s["initial_eval"]["val_loss"]


def test_lora_sft_trains_only_adapters_saves_peft_folder_and_resumes_exactly(workdir, tmp_path):
    pytest.importorskip("evolm.post.lora")
    lora = ("--lora", "--lora-r", "4", "--lora-alpha", "8", "--lora-targets", "q_proj,v_proj", "--steps", "6")
    a = run_sft(_args(workdir, tmp_path / "a", *lora), log=lambda s: None)
    assert a["trainable_params"] == 2 * (4 * (64 + 64) + 4 * (64 + 32))  # 2 layers x (q: 64->64, v: 64->32)
    assert a["val_loss"] < a["initial_eval"]["val_loss"]
    files = {p.name for p in (tmp_path / "a").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    ck = sorted((tmp_path / "a" / "checkpoints").iterdir())[-1]
    assert (ck / "trainable.safetensors").stat().st_size < 50_000  # adapters only, not the base
    run_sft(_args(workdir, tmp_path / "b", *lora, "--stop-after", "4"), log=lambda s: None)
    run_sft(_args(workdir, tmp_path / "b", *lora, "--resume"), log=lambda s: None)
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")
    # the adapter loads back onto the base and gives the trained model's held-out loss
    from evolm.loading import load
    from evolm.post.lora import load_adapter

    model, tok = load(str(workdir[0] / "base"))
    load_adapter(model, tmp_path / "a")
    task = SftTask(encode_examples(tok, load_sft(workdir[0] / "train.jsonl", limit=4), 96),
                   encode_examples(tok, load_sft(workdir[0] / "val.jsonl"), 96), batch_size=4, max_len=96,
                   packing=False, pad_id=0, seed=0)
    with torch.no_grad():
        assert task.evaluate(model.eval())["val_loss"] == pytest.approx(a["val_loss"], abs=1e-5)


# --- errors --------------------------------------------------------------------------------------
def test_qlora_sft_resume_is_bit_exact(workdir, tmp_path):
    """NF4 base + adapters: the checkpoint holds only the adapters; the base is re-quantized on resume."""
    pytest.importorskip("evolm.post.lora")
    q = ("--qlora", "--lora-r", "4", "--lora-alpha", "8", "--lora-targets", "q_proj,v_proj", "--steps", "6")
    a = run_sft(_args(workdir, tmp_path / "a", *q), log=lambda s: None)
    assert a["val_loss"] < a["initial_eval"]["val_loss"]
    run_sft(_args(workdir, tmp_path / "b", *q, "--stop-after", "4"), log=lambda s: None)
    run_sft(_args(workdir, tmp_path / "b", *q, "--resume"), log=lambda s: None)
    assert _losses(tmp_path / "b") == _losses(tmp_path / "a")


def test_model_without_chat_template_is_a_clear_error(workdir, tmp_path):
    args = dataclasses.replace(_args(workdir, tmp_path / "x"), model=str(workdir[0] / "base_no_template"))
    with pytest.raises(DataError, match="has no chat template"):
        run_sft(args, log=lambda s: None)


def test_row_without_assistant_turn_names_the_line(workdir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "q", "response": "a"}) + "\n"
                   + json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    args = dataclasses.replace(_args(workdir, tmp_path / "y"), data=str(bad))
    with pytest.raises(DataError, match=r"bad.jsonl:2: no assistant turn"):
        run_sft(args, log=lambda s: None)
