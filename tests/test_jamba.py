"""Hybrids: Jamba (Lieber et al. 2024, arXiv:2403.19887) as one evolm model whose layers mix mixers
(``mixer_pattern``), against transformers' JambaForCausalLM (its slow PyTorch paths) built from the
same tiny config with the same random weights."""

import json

import pytest
import torch

import evolm
from evolm.analysis.cost import cost_card, kv_cache_bytes, ssm_state_bytes
from evolm.cache import KVCache
from evolm.config import ConfigError, ModelConfig
from evolm.infer.decode import generate
from evolm.infer.sampling import SamplingParams
from evolm.interop.hf import (build_from_state_dict, config_from_hf, config_to_hf, hf_family, load_hf_folder,
                              save_hf_folder, state_dict_from_hf, state_dict_to_hf)
from evolm.presets import get_preset

transformers = pytest.importorskip("transformers")

V = 97


def _pair(seed=0, **over):
    """A tiny HF Jamba with random weights (norms, SSM parameters and biases perturbed off their init)
    and the evolm model holding the same weights. 5 layers, attention every 3rd from layer 1 (layers
    1, 4), 4 experts top-2 every 2nd from layer 1 (layers 1, 3): every mixer x channel combination."""
    torch.manual_seed(seed)
    kw = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=5, num_attention_heads=4,
              num_key_value_heads=2, attn_layer_period=3, attn_layer_offset=1, expert_layer_period=2,
              expert_layer_offset=1, num_experts=4, num_experts_per_tok=2, mamba_d_state=8, mamba_d_conv=4,
              mamba_expand=2, mamba_dt_rank=5, max_position_embeddings=256, use_mambapy=False,
              use_associative_scan=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    hf = transformers.JambaForCausalLM(transformers.JambaConfig(**{**kw, **over})).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("A_log", ".D", "layernorm.weight", "bias")):
                p.add_(0.1 * torch.randn_like(p))
    c = config_from_hf(hf.config.to_dict())  # through the family (interop/families/jamba.py)
    model = build_from_state_dict(c, state_dict_from_hf(hf.state_dict(), c, "jamba")).eval()
    return hf, model


def test_config_maps_the_periods():
    _, model = _pair()
    c = model.config
    assert c.mixer_pattern == ("mamba", "mha", "mamba")
    assert [c.layer_mixer(i) for i in range(5)] == ["mamba", "mha", "mamba", "mamba", "mha"]
    assert [c.layer_is_moe(i) for i in range(5)] == [False, True, False, True, False]
    kinds = [type(b.self_attn).__name__ + "+" + type(b.mlp).__name__ for b in model.layers]
    assert kinds == ["Mamba+MLP", "Attention+MoE", "Mamba+MLP", "Mamba+MoE", "Attention+MLP"]


def test_logits_match_transformers():
    hf, model = _pair()
    ids = torch.randint(3, V, (2, 40))
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    print(f"jamba logits max |diff| vs transformers: {diff:.2e}")
    assert diff <= 1e-4


def test_logits_match_with_biases_and_other_periods():
    """Projection biases, no conv bias, attention first in each group of 2, experts from layer 0."""
    hf, model = _pair(seed=1, num_hidden_layers=4, attn_layer_period=2, attn_layer_offset=0, expert_layer_period=3,
                      expert_layer_offset=0, mamba_proj_bias=True, mamba_conv_bias=False, num_experts_per_tok=1)
    assert model.config.mixer_pattern == ("mha", "mamba")
    ids = torch.randint(3, V, (1, 70))  # longer than one scan chunk
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    assert diff <= 1e-4, diff


def test_cached_greedy_generation_equals_transformers():
    hf, model = _pair()
    ids = torch.randint(3, V, (1, 12))
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=20)[0, 12:].tolist()
    ours = generate(model, ids, SamplingParams(max_new_tokens=20, temperature=0.0))[0]
    print(f"jamba greedy: 20 of 20 tokens equal: {ours == ref}")
    assert ours == ref


def test_cache_steps_equal_the_full_forward_and_hold_kv_only_for_attention():
    """Prefill then single tokens from the cache (keys/values on attention layers, conv + SSM states
    on Mamba layers) give the full-sequence logits; the cache holds what the cost card says."""
    _, model = _pair()
    ids = torch.randint(3, V, (2, 30))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, 2, 30)
        first = model(ids[:, :7], cache=cache)
        steps = [model(ids[:, t:t + 1], cache=cache) for t in range(7, 30)]
    torch.testing.assert_close(torch.cat([first, *steps], 1), full, atol=1e-5, rtol=1e-5)
    c = model.config
    assert sorted(cache._states) == [0, 2, 3]  # the Mamba layers
    assert cache.state_nbytes() == ssm_state_bytes(c, bytes_per_value=4, batch=2)
    assert cache.nbytes() == kv_cache_bytes(c, 30, bytes_per_value=4, batch=2) + cache.state_nbytes()


@pytest.mark.parametrize("mixer,module", [("hyena", "Hyena"), ("mamba2", "Mamba2")])
def test_a_hybrid_of_any_recurrent_mixer_decodes_from_its_cache(mixer, module):
    """The pattern takes any recurrent mixer: Hyena (nn/hyena.py) or Mamba-2 (nn/mamba2.py) alternating
    with RoPE attention; prefill then single steps give the full forward."""
    extra = dict(mamba_d_head=8, mamba_chunk_size=8) if mixer == "mamba2" else {}
    c = ModelConfig(vocab_size=V, d_model=32, n_layers=4, n_heads=4, max_seq_len=64, norm="rmsnorm", pos_emb="rope",
                    mixer_pattern=(mixer, "mha"), mlp="glu", activation="silu", **extra)
    torch.manual_seed(0)
    model = evolm.build(c).eval()
    assert [type(b.self_attn).__name__ for b in model.layers] == [module, "Attention"] * 2
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, 2, 64)
        outs = [model(ids[:, :7], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=1e-5)


def test_a_mamba2_layer_in_the_pattern_is_validated():
    """Mamba-2's sizes are checked wherever its layers come from, not only with attention='mamba2'."""
    with pytest.raises(ConfigError, match="mamba_d_head"):
        ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=4, norm="rmsnorm", pos_emb="rope",
                    mixer_pattern=("mamba2", "mha"), mamba_d_head=7)


def test_left_padded_batch_equals_rows_alone():
    _, model = _pair()
    a, b = torch.randint(3, V, (1, 20)), torch.randint(3, V, (1, 13))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 7, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        torch.testing.assert_close(out[0], model(a)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1, 7:], model(b)[0], atol=1e-5, rtol=1e-5)


def test_hf_folder_round_trip(tmp_path):
    hf, model = _pair()
    assert hf_family(model.config) == "jamba"
    folder = save_hf_folder(model, tmp_path / "m")
    assert "model.layers.1.feed_forward.experts.3.up_proj.weight" in json.dumps(
        list(state_dict_to_hf(model.state_dict(), model.config, "jamba")))  # the Hub's per-expert layout
    back_hf = transformers.JambaForCausalLM.from_pretrained(folder).eval()
    back = load_hf_folder(folder).eval()
    ids = torch.randint(3, V, (1, 25))
    with torch.no_grad():
        ref = hf(ids).logits
        assert (back_hf(ids).logits - ref).abs().max().item() <= 1e-5
        assert (back(ids) - ref).abs().max().item() <= 1e-4
    assert back.config.diff(model.config) == {}
    # transformers 5's fused expert layout reads too
    fused = state_dict_to_hf(model.state_dict(), model.config, "jamba", fused_experts=True)
    assert set(fused) == set(hf.state_dict())
    h = config_to_hf(model.config)
    assert (h["attn_layer_period"], h["attn_layer_offset"], h["expert_layer_period"], h["expert_layer_offset"]) == \
        (3, 1, 2, 1)


def test_preset_parameter_count_equals_transformers():
    """jamba-v0.1 (ai21labs/Jamba-v0.1's config) counts exactly transformers' model of that config."""
    c = get_preset("jamba-v0.1")
    with torch.device("meta"):
        hf = transformers.JambaForCausalLM(transformers.JambaConfig(mamba_dt_rank=256))
    n_hf = sum(p.numel() for p in hf.parameters())
    model = evolm.build("jamba-v0.1", device="meta")
    n = sum(p.numel() for p in model.parameters())
    card = cost_card(c, 262144)
    print(f"jamba-v0.1: {n:,} params (transformers {n_hf:,}), active {card['params_active']:,}, "
          f"KV at 256K {card['kv_cache_bytes_at_context'] / 2**30:.2f} GiB, "
          f"states {card['state_bytes_per_sequence']:,} B")
    assert n == n_hf == card["params_total"]
    assert config_to_hf(c)["attn_layer_period"] == 8 and config_to_hf(c)["attn_layer_offset"] == 4


def test_cost_card_counts_kv_only_for_attention_layers():
    c = get_preset("jamba-v0.1")
    card = cost_card(c, 262144)
    # 4 attention layers of 32: keys + values of 8 heads x 128, bf16, at 256K tokens = 4 GiB (the paper's 4GB)
    assert card["kv_cache_bytes_at_context"] == 4 * 2 * 8 * 128 * 2 * 262144 == 4 * 2**30
    dense = c.replace(mixer_pattern=(), mamba_dt_b_c_norm=False)  # the same model, attention everywhere
    assert cost_card(dense, 262144)["kv_cache_bytes_at_context"] == 8 * card["kv_cache_bytes_at_context"]
    # 28 Mamba layers: 3 conv inputs (bf16) and a float32 (8192, 16) state each
    assert card["state_bytes_per_sequence"] == 28 * (8192 * 3 * 2 + 8192 * 16 * 4)
    assert cost_card(dense)["state_bytes_per_sequence"] == 0
    # attention FLOPs grow with context only through the 4 attention layers
    grow = cost_card(c, 2048)["attention_flops_per_token"] - cost_card(c, 1024)["attention_flops_per_token"]
    assert grow == 3 * 4 * 2 * 1024 * 32 * (128 + 128)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="mixer_pattern.*entry 1 is 'ssm'"):
        ModelConfig(mixer_pattern=("mamba", "ssm"))
    with pytest.raises(ConfigError, match="mixer_pattern.*'mla', an attention kind other than attention='mha'"):
        ModelConfig(mixer_pattern=("mamba", "mla"))
    with pytest.raises(ConfigError, match="mamba_dt_b_c_norm.*no layer's mixer is 'mamba'"):
        ModelConfig(mamba_dt_b_c_norm=True)
    with pytest.raises(ConfigError, match="mask.*state-space mixer \\('mamba'\\)"):
        ModelConfig(mixer_pattern=("mamba", "mha"), mask="bidirectional")
    bad = transformers.JambaConfig().to_dict()
    bad["attn_layer_offset"] = 9
    with pytest.raises(ConfigError, match="attn_layer_offset=9 and attn_layer_period=8"):
        config_from_hf(bad)
    # another family cannot write a hybrid: the llama family names the field it lacks
    c = get_preset("jamba-v0.1").replace(n_experts=0, moe_aux_loss_coef=0.0)
    with pytest.raises(ConfigError, match="mixer_pattern"):
        config_to_hf(c.replace(mamba_dt_b_c_norm=False, pos_emb="rope"), model_type="llama")
    # a pattern with two attention layers per group is not Jamba's period/offset
    with pytest.raises(ConfigError, match="jamba.*mixer_pattern"):
        config_to_hf(c.replace(mixer_pattern=("mha", "mamba", "mha")), model_type="jamba")


def test_compiled_decoding_caches_hold_both_kinds(serving_tools):
    """What generate(compile=True) does, run eagerly: a prefill collector (PrefillKV) hands keys/values
    and states to a StaticKVCache, whose static mode updates both in place; the logits are the full
    forward's."""
    _, model = _pair()
    cache = serving_tools.static_steps_equal_full(model, torch.randint(3, V, (2, 12)), 6)
    assert sorted(cache._states) == [0, 2, 3]


def test_gguf_export_says_jamba_is_not_written_yet():
    from evolm.interop.gguf_export import ExportError, gguf_architecture

    _, model = _pair()
    with pytest.raises(ExportError, match="is a jamba model; GGUF export writes"):
        gguf_architecture(model.config)


def test_config_json_round_trip_and_pruning_refused():
    c = get_preset("jamba-v0.1")
    back = ModelConfig.from_dict(json.loads(c.to_json()))
    assert back == c and back.mixer_pattern == c.mixer_pattern
    from evolm.prune.structured import PruneError, Target, check_prunable

    check_prunable(c, Target.of(c))  # nothing cut: fine
    with pytest.raises(PruneError, match="hybrid \\(mixer_pattern="):
        check_prunable(c, Target(c.n_heads, c.n_kv_heads, c.d_ff, c.d_model, 24))


def test_server_engine_decodes_as_generate(serving_tools):
    """The server's slot cache holds each request's keys/values (attention layers) and states (Mamba
    layers): requests of different lengths sharing decode steps give generate()'s tokens."""
    _, model = _pair()
    with torch.no_grad():  # sharpen the random model's logits so argmax is far from ties
        model.embed_tokens.weight.mul_(4)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (3, 11, 20, 7)]
    max_new = [12, 5, 9, 10]
    ref = [generate(model, p, SamplingParams(max_new_tokens=m, temperature=0))[0] for p, m in zip(prompts, max_new)]
    assert serving_tools.served_greedy(model, prompts, max_new) == ref  # 3 at once, the 4th joins later


def test_trains_gradients_flow():
    """Every parameter of both mixer kinds, the router and the experts gets a gradient, and a few
    AdamW steps learn a sequence."""
    _, model = _pair()
    model.train()
    ids = torch.randint(3, V, (2, 16))
    loss = model(ids[:, :-1], targets=ids[:, 1:])
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = loss.item()
    for _ in range(12):
        opt.zero_grad()
        loss = model(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        opt.step()
    print(f"jamba: 12 AdamW steps on one batch, loss {first:.2f} -> {loss.item():.2f}")
    assert loss.item() < 0.5 * first, (first, loss.item())


def test_packed_documents_are_refused_naming_the_mixer():
    """Layer 0 attends, but the Mamba layers would carry their state across documents."""
    _, model = _pair(attn_layer_offset=0)
    ids = torch.randint(3, V, (1, 8))
    with pytest.raises(ValueError, match="packed documents.*'mamba' mixer"):
        model(ids, doc_ids=torch.tensor([[0, 0, 0, 0, 1, 1, 1, 1]]))
