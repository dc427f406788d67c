"""The cost card, checked against the models themselves: parameter counts against the meta-device
model, KV-cache bytes against hand arithmetic and the real KVCache, FLOPs against hand arithmetic
(the PaLM/Chinchilla formula) and torch's own FLOP counter."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import evolm
from evolm.analysis import compare_table, cost_card, diff_configs, format_card
from evolm.analysis.cost import human_bytes, human_count, human_flops, kv_cache_bytes
from evolm.presets import get_preset, list_presets

ALL = list_presets()


def _part_of(name: str) -> str:
    """Which card part a parameter belongs to, from our module names alone."""
    name = name.removeprefix("encoder.")  # an encoder-decoder's encoder: the same parts
    if name.startswith(("vision_model.", "multi_modal_projector.")):
        return "vision"
    if name.endswith(("attn_gate", "mlp_gate")):  # a vision model's gated cross-attention layer
        return "attention"
    if name.startswith(("embed_tokens.", "pos_embed.", "type_embed.", "rel_pos.")):
        return "embeddings"
    if name.startswith("head."):
        return "head"
    if name.startswith("lm_head."):
        return "lm_head"
    if name.startswith("norm.") or name.endswith(("_norm.weight", "_norm.bias", "_layernorm.weight")):
        return "norms"
    if ".self_attn." in name or ".cross_attn." in name:
        return "attention"
    if ".mlp.experts." in name:
        return "experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if ".mlp.gate.weight" in name and name.count(".") == 4:  # layers.i.mlp.gate.weight: the router
        return "router"
    if ".mlp." in name:
        return "mlp"
    raise AssertionError(f"unclassified parameter {name}")


@pytest.mark.parametrize("name", ALL)
def test_params_match_meta_model(name):
    model = evolm.build(name, device="meta")
    card = cost_card(model.config)
    by_part = dict.fromkeys(card["params_by_part"], 0)
    for pname, p in model.named_parameters():
        by_part[_part_of(pname)] += p.numel()
    assert card["params_total"] == sum(p.numel() for p in model.parameters())
    assert sum(card["params_by_part"].values()) == card["params_total"]
    assert card["params_by_part"] == by_part
    # active: all but the unused share of each routed-expert tensor
    c = model.config
    inactive = sum(p.numel() * (c.n_experts - c.n_experts_per_tok) // c.n_experts
                   for n, p in model.named_parameters() if ".mlp.experts." in n)
    assert card["params_active"] == card["params_total"] - inactive
    assert card["params_non_embedding"] == model.num_params(exclude_embeddings=True) - by_part["lm_head"]


def test_card_is_json_and_has_the_cli_keys():
    card = cost_card("mixtral-8x7b", context_len=4096)
    again = json.loads(json.dumps(card))
    assert again == card
    for key in ("name", "params_total", "params_active", "params_by_part", "kv_cache_bytes_per_token",
                "kv_cache_bytes_at_context", "flops_per_token", "forward_flops_per_token", "context_len"):
        assert key in card
    assert card["context_len"] == 4096 and cost_card("gpt2")["context_len"] == 1024
    with pytest.raises(ValueError, match="context_len"):
        cost_card("gpt2", context_len=0)


# --- KV cache --------------------------------------------------------------------------------
def test_kv_cache_gqa_llama3_8b():
    card = cost_card("llama-3-8b")
    assert card["kv_cache_bytes_per_token"] == 8 * 128 * 2 * 32 * 2 == 131072  # 128 KiB
    assert card["kv_cache_bytes_per_token_uncapped"] == 131072
    assert card["kv_cache_bytes_at_context"] == 131072 * 8192  # 1 GiB at 8k
    mha = cost_card("llama-2-7b")  # 32 KV heads: 4x the cache of Llama 3 8B's GQA
    assert mha["kv_cache_bytes_per_token"] == 32 * 128 * 2 * 32 * 2 == 4 * 131072


def test_kv_cache_mla_deepseek_v3():
    card = cost_card("deepseek-v3", context_len=4096)
    assert card["kv_cache_bytes_per_token"] == (512 + 64) * 61 * 2 == 70272
    assert card["kv_cache_bytes_at_context"] == 70272 * 4096
    # what plain MHA with the same 128 heads of 192/128 dims would have stored per token
    assert 61 * 128 * (192 + 128) * 2 / 70272 > 70


def test_kv_cache_sliding_window_caps():
    # Gemma 3 27B: 62 layers, every 6th global -> 10 global, 52 local (window 1024); 16 KV heads x 128
    per_layer = 2 * 16 * 128 * 2
    card = cost_card("gemma-3-27b", context_len=131072)
    assert card["kv_cache_bytes_per_token_uncapped"] == 62 * per_layer
    assert card["kv_cache_bytes_at_context"] == per_layer * (10 * 131072 + 52 * 1024)
    assert card["kv_cache_bytes_per_token"] == per_layer * (10 + 52 * 1024 / 131072)
    short = cost_card("gemma-3-27b", context_len=1024)  # within the window nothing is capped
    assert short["kv_cache_bytes_per_token"] == short["kv_cache_bytes_per_token_uncapped"]
    # Gemma 3 1B: 26 layers -> global layers 5, 11, 17, 23; one KV head of 256; window 512
    g1 = cost_card("gemma-3-1b", context_len=32768)
    assert g1["kv_cache_bytes_at_context"] == 2 * 256 * 2 * (4 * 32768 + 22 * 512)
    # Mistral 7B: every layer local (4096) -> at 32k the cache is 1/8 of the uncapped one
    m = cost_card("mistral-7b", context_len=32768)
    assert m["kv_cache_bytes_per_token"] == m["kv_cache_bytes_per_token_uncapped"] / 8


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-deepseek", "tiny-gemma3"])
def test_kv_bytes_match_the_real_cache(name):
    """Fill evolm's KVCache in bf16 and compare its bytes with the card.

    ``KVCache.for_model`` gives sliding-window layers a ring buffer of ``window`` slots: that is
    the capped figure. A plain ``KVCache`` keeps every token in every layer: the uncapped one.
    """
    torch.manual_seed(0)
    model = evolm.build(name, dtype=torch.bfloat16).eval()
    c, T = model.config, 48
    ids = torch.randint(0, c.vocab_size, (1, T))
    ring, plain = evolm.KVCache.for_model(model, batch=1, max_len=T), evolm.KVCache(batch=1, max_len=T)
    with torch.no_grad():
        model(ids, cache=ring)
        model(ids, cache=plain)
    card = cost_card(c, T)
    assert ring.nbytes() == card["kv_cache_bytes_at_context"] == kv_cache_bytes(c, T)
    assert plain.nbytes() == card["kv_cache_bytes_per_token_uncapped"] * T
    if c.sliding_window is not None:
        assert ring.nbytes() < plain.nbytes()


# --- FLOPs -----------------------------------------------------------------------------------
def test_flops_gpt2_by_hand():
    """6N + 12 * n_layers * n_heads * head_dim * T (PaLM, Appendix B), N by hand."""
    d, L, V, T = 768, 12, 50257, 1024
    per_layer = (4 * d * d + 4 * d) + (8 * d * d + 5 * d) + 4 * d  # attn, MLP (+biases), 2 LayerNorms
    n = L * per_layer + 2 * d + V * d  # + final norm + the (tied) LM head matmul; no embedding lookups
    card = cost_card("gpt2")
    assert card["flops_params"] == n
    assert card["flops_per_token"] == 6 * n + 12 * L * 12 * 64 * T
    assert card["forward_flops_per_token"] == 2 * n + 4 * L * 12 * 64 * T
    # the weights dominate at 1k context: attention adds ~15%
    assert 0.10 < card["attention_flops_per_token"] / card["flops_per_token"] < 0.2


def test_flops_sliding_window_and_mla_by_hand():
    g = cost_card("gemma-3-27b", context_len=8192)
    att = 2 * 32 * (128 + 128) * (10 * 8192 + 52 * 1024)
    assert g["forward_flops_per_token"] - 2 * g["flops_params"] == att
    ds = cost_card("deepseek-v3", context_len=4096)
    assert ds["forward_flops_per_token"] - 2 * ds["flops_params"] == 61 * 2 * 4096 * 128 * (192 + 128)
    # active compute of DeepSeek-V3 is ~37B parameters, not 671B
    assert 36e9 < ds["flops_params"] < 38e9


def _counted(model, T, device):
    x = torch.zeros(1, T, dtype=torch.long, device=device)
    with FlopCounterMode(display=False) as fwd:
        model(x)
    with FlopCounterMode(display=False) as train:
        model(x).float().sum().backward()
    return fwd.get_total_flops() / T, train.get_total_flops() / T


@pytest.mark.parametrize("name,device,T", [("gpt2", "meta", 1024), ("llama-3-8b", "meta", 2048),
                                           ("tiny-deepseek", "cpu", 64)])
def test_flops_match_torch_flop_counter(name, device, T):
    """torch counts the matmuls of a real forward/backward; it ignores bias adds and norms."""
    torch.manual_seed(0)
    model = evolm.build(name, device=device)
    card = cost_card(model.config, context_len=T)
    small = card["params_by_part"]["norms"] + sum(
        m.bias.numel() for m in model.modules() if isinstance(m, torch.nn.Linear) and m.bias is not None)
    fwd, train = _counted(model, T, device)
    assert fwd == card["forward_flops_per_token"] - 2 * small
    assert train == card["flops_per_token"] - 6 * small


# --- formatting --------------------------------------------------------------------------------
def test_human_units():
    assert human_count(124_439_808) == "124M" and human_count(8.03e9) == "8.03B"
    assert human_count(27_009_346_304) == "27.0B" and human_count(0) == "0"
    assert human_bytes(131072) == "128 KiB" and human_bytes(2 ** 30) == "1.00 GiB"
    assert human_flops(1.5e9) == "1.50 GFLOP"


def test_format_card_and_compare_table():
    cards = [cost_card(n) for n in ("gpt2", "llama-3-8b", "mixtral-8x7b", "gemma-3-27b", "deepseek-v3")]
    text = format_card(cards[1])
    assert "llama-3-8b" in text and "8.03B" in text and "128 KiB" in text
    table = compare_table(cards)
    lines = table.splitlines()
    assert lines[0].split()[1:] == ["gpt2", "llama-3-8b", "mixtral-8x7b", "gemma-3-27b", "deepseek-v3"]
    active = next(line for line in lines if line.startswith("params active"))
    assert active.split()[-5:] == ["124M", "8.03B", "12.9B", "27.0B", "37.6B"]
    assert len({len(line) for line in lines}) == 1  # aligned columns


def test_diff_configs():
    d = dict((f, (a, b)) for f, a, b in diff_configs("llama-3-8b", "mistral-7b"))
    assert d == {"vocab_size": (128256, 32000), "max_seq_len": (8192, 32768),
                 "rope_theta": (500000.0, 10000.0), "sliding_window": (None, 4096)}
    assert diff_configs("llama-3-8b", get_preset("llama-3-8b")) == []
    fields = [f for f, _, _ in diff_configs("gpt2", "llama-3-8b")]
    assert {"norm", "pos_emb", "mlp", "activation", "n_kv_heads", "tie_embeddings"} <= set(fields)
    assert "moe_d_ff" not in fields and "d_ff" in fields  # a derived default is not a difference
    assert ("moe_d_ff", 14336, 768) in diff_configs("mixtral-8x7b", "qwen3-30b-a3b")
