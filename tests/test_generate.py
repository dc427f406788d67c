"""Tests for evolm.infer (sampling, decode, text): decoding loop, samplers, stop conditions, streaming.

References: transformers' ``generate()`` and LogitsProcessors on the same weights / logits,
the uncached full forward pass, and a real byte-level BPE tokenizer from ``tokenizers``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from evolm.config import ModelConfig
from evolm.infer.decode import generate
from evolm.infer.sampling import (SamplingParams, apply_min_p, apply_repetition_penalty, apply_top_k, apply_top_p,
                                  process_logits)
from evolm.infer.text import IncrementalDecoder, StopStrings, generate_text, stream
from evolm.model import Transformer

V = 97  # tiny vocab

# ------------------------------------------------------------------------------------------
# tiny configs of each family (the lead may switch these to presets)
# ------------------------------------------------------------------------------------------
LLAMA = dict(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=128,
             norm="rmsnorm", norm_eps=1e-6, pos_emb="rope", mlp="glu", activation="silu", mlp_bias=False,
             tie_embeddings=False)
FAMILIES = {
    "llama": ModelConfig(name="tiny-llama", **LLAMA),
    "gpt2": ModelConfig(name="tiny-gpt2", vocab_size=V, d_model=64, n_layers=2, n_heads=4, max_seq_len=64,
                        qkv_bias=True, o_bias=True),
    "gemma3": ModelConfig(name="tiny-gemma3", vocab_size=V, d_model=64, n_layers=6, n_heads=4, n_kv_heads=1,
                          head_dim=16, d_ff=128, max_seq_len=128, norm="rmsnorm", norm_eps=1e-6,
                          norm_unit_offset=True, norm_placement="sandwich", pos_emb="rope",
                          rope_theta=1_000_000.0, rope_local_theta=10_000.0, qk_norm="head",
                          query_pre_attn_scalar=16, sliding_window=6, sliding_window_pattern=6,
                          mlp="glu", activation="gelu_tanh", mlp_bias=False, embed_scale=True,
                          tie_embeddings=False),  # (tied, random weights just copy the last token)
    "deepseek": ModelConfig(name="tiny-deepseek", vocab_size=V, d_model=64, n_layers=2, n_heads=4, d_ff=128,
                            max_seq_len=128, norm="rmsnorm", pos_emb="rope", rope_interleave=True,
                            attention="mla", q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                            qk_rope_head_dim=8, v_head_dim=16, mlp="glu", activation="silu", mlp_bias=False,
                            n_experts=4, n_experts_per_tok=2, moe_d_ff=32, n_shared_experts=1,
                            first_k_dense=1, router="sigmoid", router_bias=True, n_expert_groups=2,
                            topk_groups=1, routed_scaling_factor=2.5, tie_embeddings=False),
    "olmo2": ModelConfig(name="tiny-olmo2", **{**LLAMA, "norm_placement": "olmo2", "qk_norm": "full"}),
    "mistral": ModelConfig(name="tiny-mistral", **{**LLAMA, "sliding_window": 5}),
    # Llama 4: chunks of 5 on RoPE layers (counted from each row's first real token), NoPE layer 3
    # with its query temperature, L2 QK-norm, input-scaled sigmoid experts + a shared one every 2nd layer
    "llama4": ModelConfig(name="tiny-llama4", **{**LLAMA, "n_layers": 4}, rope_interleave=True, nope_layers=(3,),
                          attention_chunk_size=5, sliding_window_pattern=4, attn_temperature_tuning=True,
                          attn_floor_scale=4.0, qk_norm="l2", n_experts=4, n_experts_per_tok=1, moe_d_ff=64,
                          moe_layer_step=2, n_shared_experts=1, router="sigmoid", norm_topk_prob=False,
                          router_scales_input=True),
}

PROMPTS = [[5, 17, 3, 44, 9, 61, 2], [70, 8, 33], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [42]]


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights large enough that greedy tokens vary and logits are far from ties."""
    g = torch.Generator().manual_seed(seed)
    unit_offset = getattr(getattr(model, "config", None), "norm_unit_offset", False)  # Gemma: x * (1 + w)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            elif p.ndim == 1:  # norm scales around 1
                p.copy_((0.0 if unit_offset else 1.0) - 0.2 + 0.4 * torch.rand(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))
    return model.eval()


def tiny(family: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return randomize(Transformer(FAMILIES[family]), seed)


def left_pad(prompts):
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@torch.no_grad()
def greedy_uncached(model, prompts, n):
    """Reference: re-run the whole (left-padded) sequence every step, no cache."""
    ids, mask = left_pad(prompts)
    out = []
    for _ in range(n):
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        tok = model(ids, position_ids=pos, attention_mask=mask)[:, -1].argmax(-1)
        out.append(tok)
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    return torch.stack(out, 1).tolist()


# ------------------------------------------------------------------------------------------
# against transformers' generate()
# ------------------------------------------------------------------------------------------
def hf_pair(kind: str = "llama", seed: int = 0):
    """A tiny HF Llama/Mistral with random weights and our Transformer holding the same weights."""
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=128, tie_word_embeddings=False,
              pad_token_id=0, bos_token_id=None, eos_token_id=None)
    if kind == "mistral":
        hf_cfg = transformers.MistralConfig(sliding_window=5, **kw)
        hf = transformers.MistralForCausalLM(hf_cfg)
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    randomize(hf, seed)
    ours = Transformer(FAMILIES[kind]).eval()
    sd = {}
    for k, v in hf.state_dict().items():
        k = k.removeprefix("model.").replace("input_layernorm", "attn_norm")
        sd[k.replace("post_attention_layernorm", "mlp_norm")] = v
    ours.load_state_dict(sd, strict=True)
    return hf, ours


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_greedy_equals_transformers(kind):
    hf, ours = hf_pair(kind)
    n = 12
    ids, mask = left_pad(PROMPTS)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=n, do_sample=False, pad_token_id=0)
    ref = ref[:, ids.shape[1]:].tolist()
    assert generate(ours, PROMPTS, SamplingParams(max_new_tokens=n, temperature=0)) == ref
    # the same, given as a padded tensor with its mask
    assert generate(ours, ids, SamplingParams(max_new_tokens=n, temperature=0), attention_mask=mask) == ref
    assert len({t for row in ref for t in row}) > 4, "degenerate test: greedy output barely varies"


def test_stop_token_equals_transformers():
    hf, ours = hf_pair("llama")
    ids, mask = left_pad(PROMPTS)
    free = generate(ours, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0))
    eos = free[0][3]  # a token row 0 produces at step 3: row 0 must stop there
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                      eos_token_id=eos)[:, ids.shape[1]:].tolist()
    got = generate(ours, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0, stop_token_ids=[eos]))
    for row_ref, row_free, row in zip(ref, free, got):
        cut = row_free.index(eos) + 1 if eos in row_free else len(row_free)
        assert row == row_free[:cut] == row_ref[:cut]  # HF pads the rest of a finished row
    assert got[0][-1] == eos and len(got[0]) == free[0].index(eos) + 1


def test_sampling_equals_transformers_with_same_seed():
    """All processors at once, seeded: the same draws as HF generate(do_sample=True)."""
    hf, ours = hf_pair("llama")
    ids, mask = left_pad(PROMPTS)
    settings = dict(temperature=0.8, top_k=30, top_p=0.9, min_p=0.05, repetition_penalty=1.3)
    torch.manual_seed(1234)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=True, pad_token_id=0,
                      **settings)[:, ids.shape[1]:].tolist()
    got = generate(ours, PROMPTS, SamplingParams(max_new_tokens=10, seed=1234, **settings))
    assert got == ref


def test_repetition_penalty_greedy_equals_transformers():
    hf, ours = hf_pair("llama")
    ids, mask = left_pad(PROMPTS)
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                      repetition_penalty=1.8)[:, ids.shape[1]:].tolist()
    got = generate(ours, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0, repetition_penalty=1.8))
    assert got == ref
    assert got != generate(ours, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0))


# ------------------------------------------------------------------------------------------
# cache and batching
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_greedy_equals_uncached(family):
    model = tiny(family)
    n = 16  # prompt + generation run well past the sliding windows (5, 6)
    got = generate(model, PROMPTS, SamplingParams(max_new_tokens=n, temperature=0))
    assert got == greedy_uncached(model, PROMPTS, n)
    assert all(len(set(row)) > 3 for row in got), "degenerate test: greedy output barely varies"


@pytest.mark.parametrize("family", list(FAMILIES))
def test_batched_equals_alone(family):
    # (left padding is contiguous, so a window counted in cache slots covers the same real tokens)
    model = tiny(family)
    if family == "llama4":
        # Llama 4's query temperature counts cache slots, left padding included, as transformers does
        # (test_parity_hf.py decodes a padded batch against it), so a padded row is not itself alone;
        # its chunks, counted from each row's first real token, are
        torch.manual_seed(0)
        model = randomize(Transformer(FAMILIES[family].replace(attn_temperature_tuning=False)), 0)
    params = SamplingParams(max_new_tokens=10, temperature=0)
    batched = generate(model, PROMPTS, params)
    assert batched == [generate(model, [p], params)[0] for p in PROMPTS]


def test_learned_positions_limit_is_checked():
    model = tiny("gpt2")  # max_seq_len 64
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[1] * 60], SamplingParams(max_new_tokens=10, temperature=0))


def test_input_validation():
    model = tiny("llama")
    greedy = SamplingParams(max_new_tokens=2, temperature=0)
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, torch.tensor([[1, 2, 3]]), greedy, attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1, 2], []], greedy)
    with pytest.raises(ValueError, match="vocab_size"):
        generate(model, [[1, V]], greedy)
    with pytest.raises(ValueError, match="tokenizer"):
        generate(model, [[1, 2]], SamplingParams(stop=["x"]))
    assert generate(model, [[1], [2, 3]], SamplingParams(max_new_tokens=0)) == [[], []]
    assert generate(model, [1, 2, 3], greedy) == generate(model, [[1, 2, 3]], greedy)


def test_model_mode_is_restored():
    model = tiny("llama").train()
    generate(model, [[1, 2]], SamplingParams(max_new_tokens=2, temperature=0))
    assert model.training


# ------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(min_p=1.5), "min_p"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=-1), "max_new_tokens"), (dict(seed=-3), "seed"), (dict(stop=[""]), "stop"),
    (dict(stop_token_ids=[-1]), "stop_token_ids"), (dict(temperature=float("nan")), "temperature"),
])
def test_params_validation(bad, match):
    with pytest.raises(ValueError, match=f"SamplingParams: field '{match}'"):
        SamplingParams(**bad)


def test_params_normalize_single_values():
    p = SamplingParams(stop="END", stop_token_ids=7)
    assert p.stop == ("END",) and p.stop_token_ids == (7,)


def _hf_processors():
    return pytest.importorskip("transformers.generation.logits_process")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_processors_equal_transformers(seed):
    lp = _hf_processors()
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(5, 1000, generator=g) * 3
    history = torch.randint(0, 1000, (5, 40), generator=g)
    seen = torch.zeros(5, 1000, dtype=torch.bool).scatter_(1, history, True)
    for k in (1, 7, 50, 2000):
        assert torch.equal(apply_top_k(logits, k), lp.TopKLogitsWarper(k)(history, logits.clone()))
    for p in (0.05, 0.5, 0.9, 0.999, 1.0):
        assert torch.equal(apply_top_p(logits, p), lp.TopPLogitsWarper(p)(history, logits.clone()))
    for m in (0.0, 0.01, 0.1, 0.5, 1.0):
        assert torch.equal(apply_min_p(logits, m), lp.MinPLogitsWarper(m)(history, logits.clone()))
    for r in (0.7, 1.3, 2.0):
        ref = lp.RepetitionPenaltyLogitsProcessor(r)(history, logits.clone())
        assert torch.equal(apply_repetition_penalty(logits, seen, r), ref)
    # the whole chain, in generate()'s order
    settings = dict(temperature=0.7, top_k=100, top_p=0.8, min_p=0.02, repetition_penalty=1.2)
    chain = lp.LogitsProcessorList([lp.RepetitionPenaltyLogitsProcessor(1.2), lp.TemperatureLogitsWarper(0.7),
                                    lp.TopKLogitsWarper(100), lp.TopPLogitsWarper(0.8), lp.MinPLogitsWarper(0.02)])
    got = process_logits(logits, SamplingParams(**settings), seen)
    assert torch.equal(got, chain(history, logits.clone()))


def test_processor_formulas():
    # CTRL / HF repetition penalty: divide positive logits, multiply negative ones
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]
    # min-p: threshold = min_p * p_max; probs (0.5, 0.3, 0.15, 0.05), min_p 0.2 -> keep p >= 0.1
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = torch.isfinite(apply_min_p(logits, 0.2))
    assert kept.tolist() == [[True, True, True, False]]
    # top-p 0.75 on the same: 0.5 + 0.3 reach it; 0.15 and 0.05 go
    assert torch.isfinite(apply_top_p(logits, 0.75)).tolist() == [[True, True, False, False]]


def test_seeded_sampling_reproducible():
    model = tiny("llama")
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=7)
    a, b = generate(model, PROMPTS, p), generate(model, PROMPTS, p)
    assert a == b
    assert a != generate(model, PROMPTS, SamplingParams(max_new_tokens=12, temperature=1.0, top_p=0.95, seed=8))


def test_overflowed_scores_draw_among_the_overflowed_tokens_and_dead_rows_are_an_error():
    from evolm.infer.sampling import sample

    p = SamplingParams(temperature=1e-300)
    logits = torch.tensor([[1.0, 3.0, -2.0, 3.0], [0.5, 0.1, 0.2, 0.0]])
    scores = process_logits(logits, p)  # 3 / 1e-300 overflows float32: softmax would give NaN
    assert scores.tolist() == [[-math.inf, 0.0, -math.inf, 0.0], [0.0, -math.inf, -math.inf, -math.inf]]
    g = torch.Generator().manual_seed(0)
    picks = {tuple(sample(scores, p, g).tolist()) for _ in range(50)}
    assert {a for a, _ in picks} == {1, 3} and {b for _, b in picks} == {0}
    inf = torch.tensor([[0.0, math.inf, 1.0, math.inf]])  # logits already infinite: drawn among them
    assert {int(sample(inf, SamplingParams(temperature=1.0), g)) for _ in range(50)} == {1, 3}
    with pytest.raises(ValueError, match=r"row\(s\) \[0\] have no finite score"):
        sample(torch.tensor([[float("nan")] * 3, [0.0, 1.0, 2.0]]), SamplingParams(temperature=1.0), g)


def test_top_k_1_equals_greedy():
    model = tiny("deepseek")
    greedy = generate(model, PROMPTS, SamplingParams(max_new_tokens=10, temperature=0))
    assert generate(model, PROMPTS, SamplingParams(max_new_tokens=10, temperature=1.3, top_k=1, seed=3)) == greedy


def test_min_p_1_equals_greedy():
    model = tiny("llama")
    greedy = generate(model, PROMPTS, SamplingParams(max_new_tokens=10, temperature=0))
    assert generate(model, PROMPTS, SamplingParams(max_new_tokens=10, min_p=1.0, seed=5)) == greedy


def test_repetition_penalty_discourages_repeats():
    model = tiny("llama")
    plain = generate(model, PROMPTS, SamplingParams(max_new_tokens=24, temperature=0))
    strong = generate(model, PROMPTS, SamplingParams(max_new_tokens=24, temperature=0, repetition_penalty=1e6))
    # an enormous penalty makes every already-present token lose to any unseen positive logit
    assert sum(len(set(r)) for r in strong) > sum(len(set(r)) for r in plain)


# ------------------------------------------------------------------------------------------
# streaming with a real byte-level BPE tokenizer
# ------------------------------------------------------------------------------------------
def _bytes_to_chars() -> dict[int, str]:
    """GPT-2's byte -> printable-character table used by byte-level BPE."""
    from evolm.tokenizer import byte_alphabet

    return byte_alphabet()


CORPUS = ["héllo wörld, naïve café", "日本語のテキスト", "emoji 😀🎉 and ünïcödé", "Hello world! STOP here"] * 20


class ByteTokenizer:
    """A real `tokenizers` byte-level BPE behind the protocol generation expects."""

    def __init__(self):
        tk = pytest.importorskip("tokenizers")
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(CORPUS, trainer)
        self.tok = tok
        self.eos_ids = [tok.token_to_id("<eos>")]
        table = _bytes_to_chars()
        self.byte_ids = [tok.token_to_id(table[b]) for b in range(256)]
        assert None not in self.byte_ids

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def bytes(self, text: str) -> list[int]:
        """One token per UTF-8 byte: every multibyte character is split across tokens."""
        return [self.byte_ids[b] for b in text.encode("utf-8")]


class ScriptedModel(nn.Module):
    """A stand-in model whose greedy continuation is a fixed script of token ids."""

    def __init__(self, vocab_size: int, script: list[int]):
        super().__init__()
        self.config = ModelConfig(vocab_size=vocab_size, d_model=8, n_layers=1, n_heads=1, max_seq_len=4096)
        self.dummy = nn.Parameter(torch.zeros(1))
        self.script, self.step, self.prompts = list(script), 0, []

    def forward(self, input_ids, position_ids=None, attention_mask=None, cache=None, last_only=False):
        if self.step == 0:
            self.prompts.append(input_ids.tolist())
        B, T = input_ids.shape
        logits = torch.zeros(B, T, self.config.vocab_size)
        logits[:, -1, self.script[min(self.step, len(self.script) - 1)]] = 10.0
        self.step += 1
        return logits[:, -1:] if last_only else logits


def run_stream(tok, script, **params):
    model = ScriptedModel(tok.vocab_size, script)
    p = SamplingParams(max_new_tokens=len(script), temperature=0, **params)
    return list(stream(model, tok, tok.encode("Hi"), p))


def test_stream_never_splits_utf8():
    tok = ByteTokenizer()
    text = "héllo 日本語 😀🎉 ünï"
    script = tok.bytes(text)
    pieces = run_stream(tok, script)
    assert "".join(pieces) == tok.decode(script) == text
    assert all("\ufffd" not in p for p in pieces)
    assert len(pieces) > 5  # it streams, rather than emitting everything at the end
    # mixed: BPE merges plus split bytes
    script = tok.encode("naïve café ") + tok.bytes("😀") + tok.encode(" 日本語のテキスト")
    pieces = run_stream(tok, script)
    assert "".join(pieces) == tok.decode(script) and all("\ufffd" not in p for p in pieces)


def test_stream_random_tokens_concatenate_to_decode():
    """A real tiny model, random weights: whatever bytes it emits, pieces join to decode(ids)."""
    tok = ByteTokenizer()
    cfg = FAMILIES["llama"].replace(vocab_size=tok.vocab_size)
    torch.manual_seed(0)
    model = randomize(Transformer(cfg))
    prompt = tok.encode("héllo wörld")
    for seed in range(3):
        p = SamplingParams(max_new_tokens=40, temperature=1.0, seed=seed, ignore_eos=True)
        ids = generate(model, [prompt], p)[0]
        pieces = list(stream(model, tok, prompt, p))
        assert "".join(pieces) == tok.decode(ids)
        assert all(not p.endswith("\ufffd") for p in pieces[:-1])


def test_stream_stops_at_eos_and_excludes_it():
    tok = ByteTokenizer()
    script = tok.encode("Hello world") + tok.eos_ids + tok.encode(" more")
    assert "".join(run_stream(tok, script)) == "Hello world"
    assert "".join(run_stream(tok, script, ignore_eos=True)) == tok.decode(script)


@pytest.mark.parametrize("parts, stops, expected", [
    (["Hello", " ST", "OP", " here"], ["STOP"], "Hello "),  # spans two tokens
    (["Hello", " S", "T", "O", "P", " here"], ["STOP"], "Hello "),  # spans four
    (["Hello STOP here"], ["STOP"], "Hello "),  # inside one token
    (["a S", "T", "x", "yz"], ["STOP"], "a STxyz tail"),  # a false start is released
    (["one", " two", " three"], ["three", "two"], "one "),  # the earliest stop wins
    (["ab", "c"], ["abc tail!"], "abc tail"),  # ends before the stop string completes
    (["caf", "é!", " end"], ["é!"], "caf"),
])
def test_stream_stop_strings(parts, stops, expected):
    tok = ByteTokenizer()
    script = [t for part in parts for t in tok.bytes(part)] + tok.encode(" tail")  # then " tail"
    pieces = run_stream(tok, script, stop=stops)
    assert "".join(pieces) == expected


def test_stop_strings_hold_back_only_possible_starts():
    s = StopStrings(["STOP"])
    assert s.push("Hello S") == "Hello "  # "S" may start "STOP"
    assert s.push("T") == ""
    assert s.push("ay") == "STay"  # not a stop after all
    assert s.push(" ST") == " "
    assert s.push("OP and more") == "" and s.stopped
    assert s.flush() == ""


def test_incremental_decoder_sentencepiece_style():
    """A decoder that drops the first token's leading space must not eat spaces mid-stream."""
    class MetaspaceLike:
        pieces = {0: "▁Hello", 1: "▁world", 2: "!", 3: "▁again"}

        def decode(self, ids):
            return "".join(self.pieces[i] for i in ids).replace("▁", " ").removeprefix(" ")

    tok = MetaspaceLike()
    dec = IncrementalDecoder(tok)
    pieces = [dec.push(i) for i in (0, 1, 2, 3)] + [dec.flush()]
    assert "".join(pieces) == tok.decode([0, 1, 2, 3]) == "Hello world! again"


# ------------------------------------------------------------------------------------------
# generate_text
# ------------------------------------------------------------------------------------------
class ChatTokenizer(ByteTokenizer):
    def apply_chat_template(self, messages, add_generation_prompt=False):
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def test_generate_text_plain_and_chat():
    tok = ChatTokenizer()
    script = tok.encode("Sure: café") + tok.eos_ids + tok.encode("junk")
    model = ScriptedModel(tok.vocab_size, script)
    p = SamplingParams(max_new_tokens=len(script), temperature=0)
    assert generate_text(model, tok, "Hi there", p) == "Sure: café"
    assert model.prompts[-1] == [tok.encode("Hi there")]
    model = ScriptedModel(tok.vocab_size, script)
    assert generate_text(model, tok, "Hi there", p, chat=True) == "Sure: café"
    assert model.prompts[-1] == [tok.encode("<user>Hi there</user><assistant>")]
