"""Seq2seq SFT (T5, BART) against transformers and PEFT.

References, fp32, tiny configs, batches padded in the encoder and in the decoder:
- a :mod:`evolm.post.seq2seq_sft` batch's loss is transformers' ``*ForConditionalGeneration(input_ids,
  attention_mask, labels=...)`` loss (which shifts the labels right itself) on the weights evolm
  exports, and every parameter's gradient is the same;
- LoRA on T5 with the default ``q_proj,v_proj`` targets is PEFT's ``LoraConfig(target_modules=["q", "v"])``
  on the transformers model: the same layers (self- and cross-attention, both stacks), and with the
  same adapter weights the same loss and adapter gradients;
- ``evolm sft`` on a tiny T5 lowers the held-out loss of a served data set.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import evolm  # noqa: E402
from evolm.interop.hf import hf_family, save_hf_folder, state_dict_to_hf  # noqa: E402
from evolm.post.data import IGNORE, Example  # noqa: E402
from evolm.post.lora import (LoRAConfig, _hf_names, apply_lora, load_adapter, lora_modules,  # noqa: E402
                             save_adapter)
from evolm.post.seq2seq_sft import Pair, collate_pairs, encode_pairs, shift_right  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PAD = 1


def spread(model) -> None:
    """Norms off 1, biases off 0, the matrices large enough that a wrong weight shows in the loss."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * (0.2 if p.ndim == 1 else 0.05))


def both(name: str, tmp_path):
    """An evolm preset with spread weights and transformers' model of its export (pad id set for the shift)."""
    torch.manual_seed(0)
    ours = evolm.build(name).eval()
    spread(ours)
    save_hf_folder(ours, tmp_path / name)
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / name, dtype=torch.float32).eval()
    hf.config.pad_token_id = PAD
    return ours, hf


def pairs(vocab: int) -> list[Pair]:
    """Sources and targets of different lengths: both sides of the batch carry padding."""
    g = torch.Generator().manual_seed(2)
    lens = [(9, 4), (5, 7), (7, 2)]

    def draw(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    return [Pair(draw(s), draw(t)) for s, t in lens]


def test_shift_right_is_transformers():
    from transformers.models.bart.modeling_bart import shift_tokens_right

    y = torch.tensor([[5, 6, 7, IGNORE], [8, IGNORE, IGNORE, IGNORE]])
    torch.testing.assert_close(shift_right(y, 2, PAD), shift_tokens_right(y, PAD, 2), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-t5-v1_1", "tiny-bart"])
def test_batch_loss_and_gradients_match_transformers(name, tmp_path):
    ours, hf = both(name, tmp_path)
    b = collate_pairs(pairs(ours.config.vocab_size), PAD, ours.config.decoder_start_token_id)
    assert (b.attention_mask == 0).any() and (b.targets == IGNORE).any()
    loss = ours(b.input_ids, attention_mask=b.attention_mask, decoder_input_ids=b.decoder_input_ids, targets=b.targets)
    ref = hf(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.targets).loss
    assert abs(loss.item() - ref.item()) <= 1e-5, (loss.item(), ref.item())
    loss.backward()
    ref.backward()
    grads = state_dict_to_hf({n: p.grad for n, p in ours.named_parameters()}, ours.config, hf_family(ours.config))
    theirs = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    # every parameter compared; BART's logits bias is a buffer in transformers (never trained there)
    assert set(theirs) <= set(grads)
    assert len(theirs) + ("final_logits_bias" in grads) == sum(1 for _ in ours.parameters())
    worst = 0.0
    for n, g in theirs.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")
        worst = max(worst, (grads[n] - g).abs().max().item())
    assert worst < 1e-5


def test_lora_on_t5_is_peft_q_v(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    ours, hf = both("tiny-t5", tmp_path)
    names = apply_lora(ours, LoRAConfig(r=4, alpha=8))  # the default targets: q_proj, v_proj
    assert len(names) == 2 * (2 * ours.config.n_layers + ours.config.encoder_layers)  # self + cross, both stacks
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for m in lora_modules(ours).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.3)
    save_adapter(ours, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["q", "v"] and cfg["task_type"] == "SEQ_2_SEQ_LM"
    pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"],
                                                 task_type="SEQ_2_SEQ_LM"))
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    result = peft.set_peft_model_state_dict(pm, saved)
    assert not result.unexpected_keys
    lora_params = [n for n, _ in pm.named_parameters() if "lora_" in n]
    assert len(lora_params) == len(saved)  # PEFT's q/v set is exactly ours
    b = collate_pairs(pairs(ours.config.vocab_size), PAD, ours.config.decoder_start_token_id)
    loss = ours(b.input_ids, attention_mask=b.attention_mask, decoder_input_ids=b.decoder_input_ids, targets=b.targets)
    ref = pm(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.targets).loss
    assert abs(loss.item() - ref.item()) <= 1e-5, (loss.item(), ref.item())
    torch.manual_seed(0)
    fresh = evolm.build("tiny-t5").eval()
    spread(fresh)
    assert sorted(load_adapter(fresh, tmp_path / "adapter")) == sorted(names)  # and back into evolm
    with torch.no_grad():
        again = fresh(b.input_ids, attention_mask=b.attention_mask, decoder_input_ids=b.decoder_input_ids,
                      targets=b.targets)
    assert abs(again.item() - loss.item()) <= 1e-6
    with torch.no_grad(), pm.disable_adapter():  # the adapter is not a no-op
        base = pm(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.targets).loss
    assert abs(base.item() - ref.item()) > 1e-3
    loss.backward()
    ref.backward()
    theirs = {n: p.grad for n, p in pm.named_parameters() if "lora_" in n}
    hf_names = _hf_names(ours, names)  # evolm module -> transformers module, as the adapter file names them
    for n, m in lora_modules(ours).items():
        for ab in ("lora_A", "lora_B"):
            want = theirs[f"base_model.model.{hf_names[n]}.{ab}.default.weight"]
            torch.testing.assert_close(getattr(m, ab).weight.grad, want, rtol=1e-4, atol=1e-6)


def test_encode_pairs_puts_the_prompt_in_the_encoder():
    from evolm.tokenizer import train_bpe

    tok = train_bpe(["write a headline for the story about rain and wind in the north"] * 5, vocab_size=300,
                    special_tokens=["<|endoftext|>"])
    ex = Example([{"role": "system", "content": "be brief"}, {"role": "user", "content": "rain in the north"},
                  {"role": "assistant", "content": "wind"}])
    (p,) = encode_pairs(tok, [ex], max_len=64)
    assert p.source == tok.encode("be brief\n\nrain in the north")
    assert p.target == tok.encode("wind", False) + [tok.eos_id]
    (cut,) = encode_pairs(tok, [ex], max_len=3)
    assert len(cut.source) == 3 and cut.target[-1] == tok.eos_id and len(cut.target) <= 3


def test_evolm_sft_trains_a_tiny_t5(tmp_path):
    """`evolm sft` on the served Alpaca demo set: a random tiny T5 v1.1 with a BPE tokenizer trained on
    the data learns; the held-out loss falls."""
    from evolm.loading import save
    from evolm.post.data import default_data_dir, load_sft
    from evolm.post.flags import parse
    from evolm.post.sft import SFTConfig, run_sft
    from evolm.tokenizer import train_bpe

    if not (default_data_dir() / "alpaca_en_demo" / "train.jsonl").is_file():
        pytest.skip("data/post/alpaca_en_demo is not installed (make data)")
    texts = [m["content"] for e in load_sft("alpaca_en_demo", "train", limit=200) for m in e.messages]
    tok = train_bpe(texts, vocab_size=512, special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    save(evolm.build("tiny-t5-v1_1"), str(tmp_path / "t5"), tokenizer=tok, fmt="hf")
    config = parse(SFTConfig, ["--model", str(tmp_path / "t5"), "--data", "alpaca_en_demo", "--out",
                               str(tmp_path / "run"), "--steps", "30", "--lr", "3e-3", "--batch-size", "8",
                               "--max-len", "96", "--limit", "240", "--val-limit", "24", "--eval-every", "30",
                               "--samples", "1", "--warmup", "3"])
    summary = run_sft(config, log=lambda s: None)
    before, after = summary["initial_eval"]["val_loss"], summary["val_loss"]
    assert after < before - 0.5, (before, after)
    back, _ = evolm.load(tmp_path / "run")  # the whole fine-tuned model, ready for `evolm generate`
    assert back.config.encoder_layers == 2
