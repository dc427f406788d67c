"""GGUF loading: dequantization, llama.cpp's weight conventions, and per-architecture parity.

Tiny random Hugging Face models are written as GGUF files the way llama.cpp's converter writes
them (its tensor names from the ``gguf`` package's own name map, Q/K rows permuted for the Llama
architecture, Gemma norms stored as 1 + w, experts stacked), then loaded by evolm and compared:
- against transformers loading the *same file* (llama, qwen2, qwen3, gemma2, gemma3), an
  independent GGUF reader, dequantizer and un-permutation;
- against the Hugging Face model the file was written from (olmo2, deepseek2, mixtral-style
  llama MoE), where transformers has no GGUF loader.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from evolm.interop.gguf import (GGUFError, GGUFFile, config_from_metadata, dequantize, find_asset,  # noqa: E402
                                load_gguf, unpermute_rope_rows)
from evolm.tokenizer import byte_alphabet  # noqa: E402

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
Q = gguf.GGMLQuantizationType
V = 256  # vocabulary: GPT-2's 256 byte symbols, so the files carry a real (byte-level) tokenizer


# ----------------------------------------------------------------------------------------------
# dequantization
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_dequantize_matches_gguf_reference(qtype):
    x = np.random.default_rng(0).standard_normal((6, 64)).astype(np.float32)
    raw = gguf.quants.quantize(x, qtype).view(np.uint8).reshape(6, -1)
    got = dequantize(raw, qtype, (6, 64))
    want = torch.from_numpy(gguf.quants.dequantize(raw, qtype).astype(np.float32)).reshape(6, 64)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert (got - torch.from_numpy(x)).abs().max() < 0.5  # and it is the tensor we quantized


def test_dequantize_k_quants_from_a_real_file():
    """Q4_K / Q6_K / Q5_0 / Q8_0 tensors of the real Gemma 3 file decode as gguf's reference does."""
    try:
        path = find_asset("gemma3")
    except FileNotFoundError as e:
        pytest.skip(f"real GGUF not installed ({e})")
    f = GGUFFile(path, tokenizer=False)
    seen = set()
    for name, t in f.tensors.items():
        if t.ggml_type in seen or t.ggml_type == Q.F32:
            continue
        seen.add(t.ggml_type)
        raw = f.raw(name)[:8]  # a few rows are enough
        shape = (min(8, t.shape[0]), *t.shape[1:])
        want = gguf.quants.dequantize(np.asarray(raw), Q(t.ggml_type))
        assert torch.equal(dequantize(raw, t.ggml_type, shape), torch.from_numpy(want.astype(np.float32)))
    assert {Q.Q4_K, Q.Q6_K, Q.Q5_0, Q.Q8_0} <= seen


def test_unpermute_inverts_llama_cpp_permute():
    def llama_cpp_permute(w, n_head):  # convert_hf_to_gguf.py: reorder rotate-half rows into pairs
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    w = torch.randn(4 * 8, 5)
    assert torch.equal(unpermute_rope_rows(llama_cpp_permute(w, 4), 4), w)
    b = torch.randn(2 * 8)
    assert torch.equal(unpermute_rope_rows(llama_cpp_permute(b, 2), 2), b)


# ----------------------------------------------------------------------------------------------
# writing tiny GGUF files from Hugging Face models, as llama.cpp's converter does
# ----------------------------------------------------------------------------------------------
def write_gguf(path, arch: str, hf_model, meta: dict, quant: bool = True) -> None:
    """Write ``hf_model``'s weights as a GGUF of architecture ``arch`` with ``meta`` keys."""
    arch_enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    cfg = hf_model.config
    names = gguf.get_tensor_name_map(arch_enum, cfg.num_hidden_layers)
    w = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        full = key if key.startswith(("general.", "tokenizer.")) else f"{arch}.{key}"
        if isinstance(value, bool):
            w.add_bool(full, value)
        elif isinstance(value, int):
            w.add_uint32(full, value)
        elif isinstance(value, float):
            w.add_float32(full, value)
        elif isinstance(value, str):
            w.add_string(full, value)
        else:
            w.add_array(full, value)
    alphabet = byte_alphabet()
    w.add_tokenizer_model("gpt2")
    w.add_token_list([alphabet[b] for b in range(V)])
    w.add_token_types([1] * V)
    w.add_token_merges([])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)

    qtypes = [Q.Q8_0, Q.F16, Q.Q4_0, Q.BF16, Q.Q5_1]
    n = 0
    for hf_name, t in hf_model.state_dict().items():
        t = t.detach().float()
        base, suffix = hf_name.rsplit(".", 1)
        if base == "lm_head" and cfg.tie_word_embeddings:  # llama.cpp writes no output.weight then
            continue
        if base.endswith("experts") and suffix in ("gate_up_proj", "down_proj"):  # fused HF experts
            parts = {"gate_proj": t[:, : t.shape[1] // 2], "up_proj": t[:, t.shape[1] // 2:]} \
                if suffix == "gate_up_proj" else {"down_proj": t}
            for proj, part in parts.items():
                out = names.get_name(f"{base}.{proj}")
                w.add_tensor(out + ".weight", part.contiguous().numpy())
            continue
        if suffix == "e_score_correction_bias":
            w.add_tensor(names.get_name(f"{base}.e_score_correction") + ".bias", t.numpy())
            continue
        out = names.get_name(base)
        assert out is not None, f"no GGUF name for {hf_name}"
        if arch == "llama" and out.endswith(("attn_q", "attn_k")):  # llama.cpp's row permutation
            heads = cfg.num_attention_heads if out.endswith("attn_q") else cfg.num_key_value_heads
            t = t.reshape(heads, 2, t.shape[0] // heads // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)
        if arch.startswith("gemma") and out.endswith("norm"):
            t = t + 1.0  # Gemma's norms are stored as (1 + w)
        a = t.contiguous().numpy()
        if quant and a.ndim == 2 and a.shape[1] % 32 == 0:
            qt = qtypes[n % len(qtypes)]
            n += 1
            w.add_tensor(out + "." + suffix, gguf.quants.quantize(a, qt), raw_dtype=qt)
        else:
            w.add_tensor(out + "." + suffix, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _rope_theta(cfg) -> float:
    rp = cfg.rope_parameters  # Gemma 3 keeps one entry per layer type
    return rp["rope_theta"] if "rope_theta" in rp else rp["full_attention"]["rope_theta"]


def common_meta(cfg, **extra) -> dict:
    meta = {"general.name": "tiny", "context_length": 128, "embedding_length": cfg.hidden_size,
            "block_count": cfg.num_hidden_layers, "feed_forward_length": cfg.intermediate_size,
            "attention.head_count": cfg.num_attention_heads, "attention.head_count_kv": cfg.num_key_value_heads,
            "attention.layer_norm_rms_epsilon": float(cfg.rms_norm_eps), "vocab_size": V,
            "rope.freq_base": float(_rope_theta(cfg))}
    meta.update(extra)
    return meta


def _tiny(cls_name: str, **kw):
    cfg_cls = getattr(transformers, cls_name)
    base = dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False)
    base.update(kw)
    return cfg_cls(**base)


def _hf_from_config(cfg):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    with torch.no_grad():  # norms away from their init value, so (1 + w) and offsets are checked
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
            elif "bias" in name:
                p.normal_(0, 0.1)
    return model


REF_CASES = {
    # arch: (config class, config overrides, extra metadata)
    "llama": ("LlamaConfig", dict(rope_theta=50000.0), {"rope.dimension_count": 16}),
    "qwen2": ("Qwen2Config", dict(), {}),
    # transformers' GGUF loader ignores qwen3's attention.key_length (it keeps Qwen3Config's default
    # head_dim of 128, which real Qwen3 models use), so the tiny model uses 128 too
    "qwen3": ("Qwen3Config", dict(head_dim=128), {"attention.key_length": 128, "attention.value_length": 128}),
    "gemma2": ("Gemma2Config", dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=4, num_key_value_heads=1,
                                    num_attention_heads=2, tie_word_embeddings=True),
               {"attention.key_length": 256, "attention.value_length": 256, "attention.sliding_window": 4,
                "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=256, query_pre_attn_scalar=256, sliding_window=4, num_hidden_layers=6,
                                        num_key_value_heads=1, num_attention_heads=2, tie_word_embeddings=True,
                                        rope_theta=1_000_000.0),
               {"attention.key_length": 256, "attention.value_length": 256, "attention.sliding_window": 4}),
}


@pytest.mark.parametrize("arch", list(REF_CASES))
def test_gguf_matches_transformers_gguf_loader(arch, tmp_path):
    cls_name, overrides, extra = REF_CASES[arch]
    cfg = _tiny(cls_name, **overrides)
    hf = _hf_from_config(cfg)
    path = tmp_path / f"{arch}.gguf"
    write_gguf(path, arch, hf, common_meta(cfg, **extra))

    ours, tok = load_gguf(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32,
                                                            attn_implementation="eager").eval()
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = ref(ids).logits, ours(ids)
    assert (got - want).abs().max() < 1e-4, f"{arch}: max diff {(got - want).abs().max()}"
    assert ours.config.tie_embeddings == cfg.tie_word_embeddings
    assert tok.decode(tok.encode("héllo wörld")) == "héllo wörld"
    if arch == "llama":  # the tokenizer also builds from the gguf package's own reader
        from evolm.interop.gguf_vocab import tokenizer_from_gguf

        again = tokenizer_from_gguf(gguf.GGUFReader(str(path)))
        assert again.encode("héllo wörld") == tok.encode("héllo wörld") and again.eos_id == tok.eos_id == 1


def test_gguf_mixtral_style_llama_moe_matches_hf(tmp_path):
    cfg = _tiny("MixtralConfig", num_local_experts=4, num_experts_per_tok=2)
    hf = _hf_from_config(cfg)
    path = tmp_path / "moe.gguf"
    write_gguf(path, "llama", hf, common_meta(cfg, **{"expert_count": 4, "expert_used_count": 2}), quant=False)
    ours, _ = load_gguf(path)
    assert ours.config.n_experts == 4 and ours.config.n_experts_per_tok == 2
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4


def test_gguf_olmo2_matches_hf(tmp_path):
    cfg = _tiny("Olmo2Config", num_key_value_heads=4)
    hf = _hf_from_config(cfg)
    path = tmp_path / "olmo2.gguf"
    write_gguf(path, "olmo2", hf, common_meta(cfg), quant=False)
    ours, _ = load_gguf(path)
    assert ours.config.norm_placement == "olmo2" and ours.config.qk_norm == "full"
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4


def test_gguf_deepseek2_mla_moe_matches_hf(tmp_path):
    cfg = _tiny("DeepseekV3Config", num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8,
                qk_nope_head_dim=16, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
                topk_group=1, n_shared_experts=1, moe_intermediate_size=32, first_k_dense_replace=1,
                routed_scaling_factor=2.5, norm_topk_prob=True)
    hf = _hf_from_config(cfg)
    with torch.no_grad():
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
    meta = common_meta(cfg, **{
        "attention.q_lora_rank": 32, "attention.kv_lora_rank": 16, "attention.key_length": 24,
        "attention.value_length": 16, "rope.dimension_count": 8, "expert_count": 8, "expert_used_count": 2,
        "expert_shared_count": 1, "expert_feed_forward_length": 32, "leading_dense_block_count": 1,
        "expert_weights_scale": 2.5, "expert_weights_norm": True, "expert_gating_func": 2,
        "expert_group_count": 2, "expert_group_used_count": 1})
    path = tmp_path / "ds.gguf"
    write_gguf(path, "deepseek2", hf, meta, quant=False)
    ours, _ = load_gguf(path)
    c = ours.config
    assert (c.attention, c.router, c.router_bias, c.first_k_dense, c.n_shared_experts) == ("mla", "sigmoid", True, 1, 1)
    ids = torch.randint(0, V, (2, 10), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def test_errors_name_the_problem(tmp_path):
    with pytest.raises(GGUFError, match="no such GGUF file"):
        load_gguf(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + bytes(64))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        load_gguf(bad)
    with pytest.raises(GGUFError, match="architecture 'bloom' is not supported"):
        config_from_metadata({"general.architecture": "bloom"}, {"token_embd.weight": (V, 64)}, "x.gguf")
    with pytest.raises(GGUFError, match="'llama.attention.head_count' is missing"):
        config_from_metadata({"general.architecture": "llama", "llama.embedding_length": 64},
                             {"token_embd.weight": (V, 64)}, "x.gguf")
    with pytest.raises(GGUFError, match="IQ2_XXS|cannot be dequantized|type"):
        dequantize(np.zeros((1, 66), dtype=np.uint8), 999, (1, 256))
    # a truncated file names itself
    cfg = _tiny("LlamaConfig")
    good = tmp_path / "ok.gguf"
    write_gguf(good, "llama", _hf_from_config(cfg), common_meta(cfg))
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-4096])
    with pytest.raises(GGUFError, match="past the end of the file"):
        load_gguf(cut)
