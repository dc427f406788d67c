"""The `evolm` command, run as a user runs it (a subprocess), against real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from evolm import build, load
from evolm.presets import get_preset, list_presets

ROOT = Path(__file__).resolve().parents[1]


def evolm(*args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "evolm.cli", *args], capture_output=True, text=True,
                       env=env, input=input, timeout=300)
    if check:
        assert p.returncode == 0, p.stderr
    return p


def test_arch_list_shows_every_preset():
    out = evolm("arch", "list").stdout
    for name in list_presets():
        assert f"\n{name} " in "\n" + out
    assert "671B" in out and "37.6B" in out  # DeepSeek-V3 total and active


def test_arch_show_json_has_the_cost_card_keys():
    card = json.loads(evolm("arch", "show", "llama-3-8b", "--json", "--context", "4096").stdout)
    for key in ("params_total", "params_active", "kv_cache_bytes_per_token", "flops_per_token"):
        assert key in card
    assert card["params_total"] == sum(p.numel() for p in build("llama-3-8b", device="meta").parameters())
    assert card["kv_cache_bytes_per_token"] == 2 * 8 * 128 * 32 * 2  # k+v, 8 KV heads, 128 dims, 32 layers, bf16
    assert card["context_len"] == 4096


def test_arch_compare_shows_why_gqa_and_mla_matter():
    out = evolm("arch", "compare", "llama-2-7b", "llama-3-8b", "deepseek-v3", "--context", "8192").stdout
    assert "KV cache / token" in out
    assert "512 KiB" in out  # Llama 2 7B: MHA, 32 heads x 128 x 2 x 32 layers x 2 bytes
    assert "128 KiB" in out  # Llama 3 8B: GQA with 8 KV heads
    assert "68.6 KiB" in out  # DeepSeek-V3: MLA latent (512 + 64) x 61 layers x 2 bytes


def test_arch_diff_lists_the_lineage_as_config_changes():
    out = evolm("arch", "diff", "gpt2", "llama-3.2-1b").stdout
    for field in ("norm", "pos_emb", "mlp", "activation", "n_kv_heads", "rope_theta"):
        assert f"\n{field} " in "\n" + out
    rows = json.loads(evolm("arch", "diff", "llama-3-8b", "qwen3-8b", "--json").stdout)
    assert rows["qk_norm"] == [None, "head"]


def test_arch_reads_config_files(tmp_path):
    cfg = get_preset("tiny-gemma3")
    (tmp_path / "evolm.json").write_text(cfg.to_json())
    card = json.loads(evolm("arch", "show", str(tmp_path / "evolm.json"), "--json").stdout)
    assert card["params_total"] == sum(p.numel() for p in build(cfg).parameters())


def test_bad_input_gives_one_clear_line():
    p = evolm("arch", "show", "lama-3-8b", check=False)
    assert p.returncode == 2 and "unknown preset 'lama-3-8b'" in p.stderr and "llama-3-8b" in p.stderr
    assert "Traceback" not in p.stderr
    p = evolm("convert", "--model", "/nonexistent/folder", "--to", "hf", "--out", "/tmp/x", check=False)
    assert p.returncode == 2 and "/nonexistent/folder" in p.stderr and "Traceback" not in p.stderr


@pytest.fixture(scope="module")
def tiny_hf_model(tmp_path_factory):
    """A tiny Llama saved as a Hugging Face folder with a trained byte-level BPE tokenizer."""
    from evolm.loading import save
    from evolm.tokenizer import train_bpe

    tmp = tmp_path_factory.mktemp("hf")
    text = [(ROOT / "README.md").read_text(), (ROOT / "src/evolm/model.py").read_text()]
    tok = train_bpe(text, vocab_size=300, special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    model = build(get_preset("tiny-llama").replace(vocab_size=300))
    save(model, str(tmp / "model"), tokenizer=tok, fmt="hf")
    return tmp / "model", model


def test_convert_hf_to_evolm_and_back_keeps_logits(tiny_hf_model, tmp_path):
    src, model = tiny_hf_model
    evolm("convert", "--model", str(src), "--to", "evolm", "--out", str(tmp_path / "ev"))
    evolm("convert", "--model", str(tmp_path / "ev"), "--to", "hf", "--out", str(tmp_path / "hf"))
    x = torch.randint(0, 300, (2, 11))
    want = model.eval()(x)
    for path in (tmp_path / "ev", tmp_path / "hf"):
        got, tok = load(str(path))
        torch.testing.assert_close(got.eval()(x), want, rtol=0, atol=1e-6)
        assert tok is not None and tok.vocab_size == 300
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    torch.testing.assert_close(hf(x).logits, want, rtol=0, atol=1e-4)


def test_generate_streams_the_greedy_continuation(tiny_hf_model):
    src, model = tiny_hf_model
    from evolm.infer import SamplingParams, generate_text

    _, tok = load(str(src))
    want = generate_text(model.eval(), tok, "def forward", SamplingParams(max_new_tokens=12, temperature=0))
    out = evolm("generate", "--model", str(src), "--prompt", "def forward", "--max-new-tokens", "12",
                "--temperature", "0").stdout
    assert out == want + "\n"


def test_generate_fast_paths_from_the_command_line(tiny_hf_model):
    """--fuse / --quantize int8 give the library's output for the same fused / quantized model."""
    src, _ = tiny_hf_model
    from evolm.infer import SamplingParams, generate_text
    from evolm.quant.int8 import quantize_int8

    model, tok = load(str(src))
    want = generate_text(quantize_int8(model.eval().fuse_for_inference()), tok, "def forward",
                         SamplingParams(max_new_tokens=12, temperature=0))
    out = evolm("generate", "--model", str(src), "--prompt", "def forward", "--max-new-tokens", "12",
                "--fuse", "--quantize", "int8").stdout
    assert out == want + "\n"
    bad = evolm("generate", "--model", str(src), "--prompt", "x", "--quantize", "int3", check=False)
    assert bad.returncode != 0 and "int3" in bad.stderr


def test_generate_device_choice(tiny_hf_model):
    """--device cpu gives the default output; a device that is not there is a one-line error."""
    import torch

    src, _ = tiny_hf_model
    args = ("generate", "--model", str(src), "--prompt", "def forward", "--max-new-tokens", "6", "--temperature", "0")
    assert evolm(*args, "--device", "cpu").stdout == evolm(*args).stdout
    for bad_device, why in [("cuda:7", "no such CUDA device"), ("tpu", "expected auto, cpu, cuda")]:
        if bad_device == "cuda:7" and torch.cuda.device_count() > 7:
            continue
        bad = evolm(*args, "--device", bad_device, check=False)
        assert bad.returncode != 0 and why in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_serve_device_choice(tiny_hf_model):
    """`evolm serve --device` takes the same values as generate; a device that is not there is a
    one-line error before any model is loaded or port bound. ``auto`` is the GPU when one exists."""
    import torch

    from evolm.loading import resolve_device

    src, _ = tiny_hf_model
    for bad_device, why in [("cuda:7", "no such CUDA device"), ("tpu", "expected auto, cpu, cuda"),
                            ("meta", "expected auto, cpu, cuda")]:
        if bad_device == "cuda:7" and torch.cuda.device_count() > 7:
            continue
        bad = evolm("serve", "--model", str(src), "--device", bad_device, "--port", "1", check=False)
        assert bad.returncode != 0 and why in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        with pytest.raises(ValueError, match=why):
            resolve_device(bad_device)
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_generate_keep_blocks(tiny_hf_model):
    """--keep-blocks on the real SmolLM2 GGUF streams the float model's greedy text; on a folder of
    float weights, with --quantize, or on a GPU it is a one-line error."""
    from evolm.infer import SamplingParams, generate_text
    from evolm.interop.gguf import find_asset

    try:
        path = find_asset("smollm2")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    model, tok = load(path)
    want = generate_text(model, tok, "The capital of France is", SamplingParams(max_new_tokens=16, temperature=0))
    out = evolm("generate", "--model", path, "--prompt", "The capital of France is", "--max-new-tokens", "16",
                "--keep-blocks", "--fuse").stdout
    assert out == want + "\n"
    src, _ = tiny_hf_model
    for args, why in [(("--model", str(src)), "needs a GGUF file"),
                      (("--model", path, "--quantize", "int8"), "drop --quantize int8"),
                      (("--model", path, "--device", "cuda"), "CPU path" if __import__("torch").cuda.is_available()
                       else "no such CUDA device")]:
        bad = evolm("generate", *args, "--prompt", "x", "--keep-blocks", check=False)
        assert bad.returncode != 0 and why in bad.stderr and "Traceback" not in bad.stderr, bad.stderr


def test_chat_keeps_history_and_stops_at_the_end_of_turn():
    """`evolm chat` on the real SmolLM2-135M-Instruct: two turns, greedy, each reply equal to the
    library's generation for the same conversation."""
    from evolm.infer.sampling import SamplingParams
    from evolm.infer.text import chat_prompt_ids, stream
    from evolm.interop.gguf import find_asset

    try:
        path = find_asset("smollm2")
    except FileNotFoundError as e:
        pytest.skip(str(e))
    p = evolm("chat", "--model", path, "--max-new-tokens", "24",
              input="What is the capital of France?\nAnd of Italy?\n/exit\n")
    replies = [line.split("assistant> ", 1)[1] for line in p.stdout.splitlines() if "assistant> " in line]
    assert len(replies) == 2
    model, tok = load(path)
    params = SamplingParams(max_new_tokens=24, temperature=0)
    history = []
    for question, reply in zip(["What is the capital of France?", "And of Italy?"], replies):
        history.append({"role": "user", "content": question})
        want = "".join(stream(model.eval(), tok, chat_prompt_ids(tok, history), params))
        assert reply == want.split("\n")[0] or reply == want
        history.append({"role": "assistant", "content": want})
    assert "Paris" in replies[0]


# modules `evolm generate` must not import: compiling machinery (torch.compile is off on the CPU), and
# what only other commands use (their parsers are built only when they run)
NOT_ON_THE_GENERATE_PATH = ("torch._dynamo", "torch._inductor", "evolm.eval.harness", "evolm.serve.app", "fastapi",
                            "uvicorn", "evolm.post.sft", "evolm.lab.grid", "evolm.data.synthesize", "transformers")


def test_generate_imports_only_its_own_path(tiny_hf_model):
    """`evolm generate` (a subprocess, the defaults) on an HF folder and on the real GGUF file imports
    none of ``NOT_ON_THE_GENERATE_PATH``: each costs start-up time (seconds for torch._dynamo)."""
    from evolm.interop.gguf import find_asset

    src, _ = tiny_hf_model
    models = [str(src)]
    try:
        models.append(str(find_asset("smollm2")))
    except FileNotFoundError:
        pass
    script = ("import runpy, sys\n"
              "try:\n    runpy.run_module('evolm.cli', run_name='__main__')\nexcept SystemExit as e:\n"
              "    assert not e.code, e.code\n"
              f"print('IMPORTED', [m for m in {NOT_ON_THE_GENERATE_PATH!r} if m in sys.modules])\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    for model in models:
        p = subprocess.run([sys.executable, "-c", script, "generate", "--model", model, "--prompt", "hi",
                            "--max-new-tokens", "2"], capture_output=True, text=True, env=env, timeout=300)
        assert p.returncode == 0, p.stderr
        assert "IMPORTED []" in p.stdout, (model, p.stdout[-500:])


@pytest.mark.parametrize("model", ["wordpiece", "unigram"])
def test_tokenizer_train_wordpiece_and_unigram(model, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The quick brown fox jumps over the lazy dog.\nTo be, or not to be.\n" * 200)
    out = evolm("tokenizer", "train", str(corpus), "--model", model, "--vocab-size", "120",
                "--out", str(tmp_path / "tok")).stdout
    assert {"wordpiece": "WordPiece", "unigram": "unigram"}[model] in out
    from evolm.tokenizer import Tokenizer

    tok = Tokenizer.from_hf_dir(tmp_path / "tok")
    assert tok.decode(tok.encode("the lazy dog."), skip_special_tokens=True) == "the lazy dog."
    assert tok.encode("fox")[0 if model == "wordpiece" else -1] == tok.token_to_id(
        "[CLS]" if model == "wordpiece" else "</s>")
    bad = evolm("tokenizer", "train", str(corpus), "--model", "unigram", "--lowercase", "--out",
                str(tmp_path / "x"), check=False)
    assert bad.returncode == 2 and "lowercase" in bad.stderr
