"""Exactness against transformers, family by family.

For each family a tiny transformers model is built from a config with seeded random weights
(norm weights and biases pushed away from 1/0 so that a misplaced norm or bias shows), saved
with ``save_pretrained`` (so the config.json and weight layout are exactly what transformers
writes: defaults omitted, MoE experts per expert) and read back with ``evolm.interop.hf``.
Then, in fp32:
- logits over a padded batch of sequences with different lengths agree to 1e-4 (left and right
  padding, explicit position ids, sliding windows shorter than the sequences);
- greedy decoding with our KV cache gives the same tokens as transformers' ``generate`` (batch 1,
  and a left-padded batch of 2), and as our own uncached forward.
"""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

from evolm.config import ConfigError  # noqa: E402
from evolm.interop.hf import (HF_DEFAULTS, build_from_state_dict, config_from_hf, load_hf_folder,  # noqa: E402
                              state_dict_from_hf)

pytestmark = pytest.mark.usefixtures("one_thread")

V = 128
LLAMA = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)
MLA = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
           num_key_value_heads=4,
           kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8,
           num_experts_per_tok=2, moe_intermediate_size=32, n_shared_experts=1, first_k_dense_replace=1,
           max_position_embeddings=128, initializer_range=0.1)
FALCON = dict(model_type="falcon", vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              ffn_hidden_size=96, max_position_embeddings=128, initializer_range=0.1)
# Llama 4: chunks of 5 (shorter than the test sequences), NoPE every 4th layer with its temperature
# growing from slot 3 on (floor_scale 4), MoE every 2nd layer, top-1 of 4 experts + a shared one
LLAMA4 = dict(model_type="llama4_text", **{**LLAMA, "num_hidden_layers": 4, "intermediate_size": 48},
              intermediate_size_mlp=96, head_dim=16, attention_chunk_size=5, num_local_experts=4,
              num_experts_per_tok=1, attn_temperature_tuning=True, floor_scale=4, attn_scale=0.5)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.9, "mscale_all_dim": 1.1}

CASES: dict[str, dict] = {
    "gpt2": dict(model_type="gpt2", vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                 initializer_range=0.1),
    "openai-gpt": dict(model_type="openai-gpt", vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                       initializer_range=0.1),
    # Falcon-7B: parallel attention + MLP from one LayerNorm, multi-query attention, no biases
    "falcon-7b": dict(**FALCON),
    # Falcon-40B: the new decoder (ln_attn / ln_mlp in parallel, 2 K/V groups), biases, tanh GELU,
    # an untied head and linear RoPE scaling
    "falcon-40b": dict(**FALCON, new_decoder_architecture=True, num_kv_heads=2, bias=True,
                       activation="gelu_pytorch_tanh", tie_word_embeddings=False,
                       rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}),
    # Falcon2-11B: the new decoder's grouped K/V heads with one norm
    "falcon2-11b": dict(**FALCON, new_decoder_architecture=True, num_kv_heads=2, num_ln_in_parallel_attn=1),
    # parallel_attn=false: a pre-norm block, multi-head attention
    "falcon-sequential": dict(**FALCON, parallel_attn=False, multi_query=False),
    "llama": dict(model_type="llama", **LLAMA, attention_bias=True, mlp_bias=True),
    "llama3-rope": dict(model_type="llama", **LLAMA, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama-linear-rope": dict(model_type="llama", **LLAMA, tie_word_embeddings=True,
                              rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.5}),
    "mistral": dict(model_type="mistral", **{**LLAMA, "num_hidden_layers": 3}, head_dim=32, sliding_window=5),
    "mixtral": dict(model_type="mixtral", **LLAMA, num_local_experts=4, num_experts_per_tok=2),
    "qwen2": dict(model_type="qwen2", **LLAMA, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", **LLAMA, head_dim=32),
    "qwen3_moe": dict(model_type="qwen3_moe", **{**LLAMA, "num_hidden_layers": 3}, head_dim=32, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=False, mlp_only_layers=[0]),
    "gemma": dict(model_type="gemma", **LLAMA, head_dim=16),
    "gemma2": dict(model_type="gemma2", **{**LLAMA, "num_hidden_layers": 4}, head_dim=16, query_pre_attn_scalar=24,
                   sliding_window=4, attn_logit_softcapping=1.5, final_logit_softcapping=3.0),
    "gemma3": dict(model_type="gemma3_text", **{**LLAMA, "num_hidden_layers": 6}, head_dim=16,
                   query_pre_attn_scalar=16, sliding_window=4, rope_parameters={
                       "full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "olmo2": dict(model_type="olmo2", **LLAMA, rms_norm_eps=1e-6),
    # Scout's wiring (L2 QK-norm, llama3 RoPE scaling) with Maverick's dense/MoE alternation
    "llama4": dict(**LLAMA4, interleave_moe_layer_step=2, use_qk_norm=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    # no QK-norm, every layer MoE and top-2, NoPE layers listed by hand, tied embeddings
    "llama4-nope-list": dict(**{**LLAMA4, "num_hidden_layers": 3, "num_experts_per_tok": 2}, use_qk_norm=False,
                             no_rope_layers=[1, 0, 1], tie_word_embeddings=True),
    "deepseek_v3": dict(model_type="deepseek_v3", **MLA, q_lora_rank=None, n_group=4, topk_group=2,
                        routed_scaling_factor=2.5, rope_parameters=YARN),
    "deepseek_v3-qlora": dict(model_type="deepseek_v3", **MLA, q_lora_rank=24, n_group=2, topk_group=1,
                              routed_scaling_factor=1.5, norm_topk_prob=False, rope_interleave=False),
    "deepseek_v2": dict(model_type="deepseek_v2", **MLA, q_lora_rank=None, topk_method="group_limited_greedy",
                        n_group=4, topk_group=2, rope_parameters=YARN),
}
LENGTHS = [12, 7, 3]


def tiny_hf_model(hf_cfg: dict, attn: str = "eager"):
    """A seeded transformers causal LM whose norms and biases are not at their 1 / 0 init."""
    cfg = AutoConfig.for_model(**copy.deepcopy(hf_cfg))
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1:  # norm scales and every bias
                p.add_(0.2 * torch.randn_like(p))
        for name, b in m.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return m.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """family -> (transformers model, evolm model read back from its save_pretrained folder)."""
    made: dict = {}

    def get(family: str):
        if family not in made:
            hf = tiny_hf_model(CASES[family])
            folder = tmp_path_factory.mktemp(family)
            hf.save_pretrained(folder)
            made[family] = (hf, load_hf_folder(folder))
        return made[family]

    return get


def hf_logits(hf, ids, mask, pos):
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits


def our_logits(model, ids, mask, pos):
    with torch.no_grad():
        return model(ids, position_ids=pos, attention_mask=mask)


# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", list(CASES))
@pytest.mark.parametrize("left", [True, False], ids=["left-pad", "right-pad"])
def test_logits_match(family, left, pair, batch_tools):
    hf, ours = pair(family)
    ids, mask, pos = batch_tools.padded_batch(V, LENGTHS, left=left)
    diff = batch_tools.max_real_diff(hf_logits(hf, ids, mask, pos), our_logits(ours, ids, mask, pos), mask)
    assert diff <= 1e-4, f"{family}: max |logit diff| {diff:.2e}"


@pytest.mark.parametrize("family", [f for f in CASES if f not in ("gemma2", "openai-gpt")])  # no SDPA path
def test_logits_match_sdpa(family, batch_tools):
    """The same against transformers' SDPA attention path (eager is checked above)."""
    hf = tiny_hf_model(CASES[family], attn="sdpa")
    assert hf.config._attn_implementation == "sdpa"
    c = config_from_hf(hf.config.to_dict())
    ours = build_from_state_dict(c, state_dict_from_hf(hf.state_dict(), c, hf.config.model_type))
    ids, mask, pos = batch_tools.padded_batch(V, LENGTHS, left=True)
    diff = batch_tools.max_real_diff(hf_logits(hf, ids, mask, pos), our_logits(ours, ids, mask, pos), mask)
    assert diff <= 1e-4, f"{family}: max |logit diff| {diff:.2e}"


# --------------------------------------------------------------------------------------------
def _new_cache(model, batch: int, max_len: int):
    from evolm.cache import KVCache
    if hasattr(KVCache, "for_model"):
        return KVCache.for_model(model, batch, max_len)
    return KVCache(batch, max_len)


def our_greedy(model, ids, mask, n_new: int, cached: bool = True):
    """Greedy continuation of a left-padded batch: tokens (B, n_new) and each step's logits (B, n_new, V)."""
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    toks, steps = [], []
    with torch.no_grad():
        if cached:
            cache = _new_cache(model, ids.shape[0], ids.shape[1] + n_new)
            logits = model(ids, position_ids=pos, attention_mask=mask, cache=cache)[:, -1]
            for _ in range(n_new):
                tok = logits.argmax(-1, keepdim=True)
                toks.append(tok)
                steps.append(logits)
                pos = pos[:, -1:] + 1
                logits = model(tok, position_ids=pos, attention_mask=torch.ones_like(tok), cache=cache)[:, -1]
        else:
            for _ in range(n_new):
                logits = model(ids, position_ids=pos, attention_mask=mask)[:, -1]
                tok = logits.argmax(-1, keepdim=True)
                toks.append(tok)
                steps.append(logits)
                ids, mask = torch.cat((ids, tok), 1), torch.cat((mask, torch.ones_like(tok)), 1)
                pos = torch.cat((pos, pos[:, -1:] + 1), 1)
    return torch.cat(toks, 1), torch.stack(steps, 1)


def hf_greedy(hf, ids, mask, n_new: int):
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                          do_sample=False, eos_token_id=None, pad_token_id=0, output_logits=True,
                          return_dict_in_generate=True)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, 1)


@pytest.mark.parametrize("family", list(CASES))
def test_greedy_decoding_matches(family, pair, batch_tools):
    """Cached decoding (sliding windows wrap: prompt + 12 tokens > window) equals transformers' generate."""
    hf, ours = pair(family)
    n_new = 12
    for lengths in ([6], [9, 4]):  # batch 1, and a left-padded batch of 2
        ids, mask, _ = batch_tools.padded_batch(V, lengths, left=True, seed=1)
        want, want_logits = hf_greedy(hf, ids, mask, n_new)
        got, got_logits = our_greedy(ours, ids, mask, n_new, cached=True)
        assert torch.equal(got, want), f"{family} {lengths}: cached greedy {got.tolist()} != {want.tolist()}"
        diff = (got_logits - want_logits).abs().max().item()
        assert diff <= 1e-4, f"{family} {lengths}: per-step logits differ by {diff:.2e}"
        uncached, _ = our_greedy(ours, ids, mask, n_new, cached=False)
        assert torch.equal(uncached, want), f"{family} {lengths}: uncached greedy differs"


# --------------------------------------------------------------------------------------------
def test_fused_expert_layout(batch_tools):
    """transformers 5's in-memory layout (stacked experts) converts as well as the per-expert files."""
    for family in ("mixtral", "qwen3_moe", "deepseek_v3"):
        hf = tiny_hf_model(CASES[family])
        sd = hf.state_dict()
        assert any(k.endswith("experts.gate_up_proj") for k in sd)
        c = config_from_hf(hf.config.to_dict())
        ours = build_from_state_dict(c, state_dict_from_hf(sd, c, hf.config.model_type))
        ids, mask, pos = batch_tools.padded_batch(V, LENGTHS)
        diff = batch_tools.max_real_diff(hf_logits(hf, ids, mask, pos), our_logits(ours, ids, mask, pos), mask)
        assert diff <= 1e-4, family


def test_gemma3_multimodal_wrapper(batch_tools):
    """A `gemma3` (image+text) folder: nested text_config, weights under model.language_model."""
    hf = tiny_hf_model(CASES["gemma3"])
    text = hf.config.to_dict()
    wrapper = {"model_type": "gemma3", "text_config": text, "vision_config": {"hidden_size": 8},
               "tie_word_embeddings": True}
    c = config_from_hf(wrapper)
    sd = {k.replace("model.", "model.language_model.", 1): v for k, v in hf.state_dict().items()}
    sd["model.vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(2, 2)
    sd["model.multi_modal_projector.mm_input_projection_weight"] = torch.zeros(2, 2)
    ours = build_from_state_dict(c, state_dict_from_hf(sd, c, "gemma3"))
    ids, mask, pos = batch_tools.padded_batch(V, LENGTHS)
    assert batch_tools.max_real_diff(hf_logits(hf, ids, mask, pos), our_logits(ours, ids, mask, pos), mask) <= 1e-4


def test_llama4_case_exercises_each_part(pair, batch_tools):
    """The tiny Llama 4 is sensitive to every part it tests: switching one off in our copy (same
    weights) moves the logits well past the parity tolerance."""
    hf, ours = pair("llama4")
    ids, mask, pos = batch_tools.padded_batch(V, LENGTHS, left=True)
    want = hf_logits(hf, ids, mask, pos)
    c = ours.config
    for change in (dict(attention_chunk_size=None, sliding_window_pattern=1), dict(attn_temperature_tuning=False),
                   dict(qk_norm=None), dict(rope_interleave=False), dict(nope_layers=()),
                   dict(router_scales_input=False), dict(n_shared_experts=0)):
        sd = {k: v for k, v in ours.state_dict().items() if "n_shared_experts" not in change or "shared" not in k}
        other = build_from_state_dict(c.replace(**change), sd)
        diff = batch_tools.max_real_diff(want, our_logits(other, ids, mask, pos), mask)
        assert diff > 1e-3, f"llama4 without {change}: logits still within {diff:.1e}"
    assert [c.layer_is_moe(i) for i in range(4)] == [False, True, False, True]
    assert [c.layer_chunk(i) for i in range(4)] == [5, 5, 5, None] and c.nope_layers == (3,)


def test_llama4_multimodal_wrapper(batch_tools):
    """A `llama4` (image+text) folder: nested text_config, weights under language_model."""
    hf = tiny_hf_model(CASES["llama4"])
    wrapper = {"model_type": "llama4", "text_config": hf.config.to_dict(), "vision_config": {"hidden_size": 8},
               "tie_word_embeddings": False}
    c = config_from_hf(wrapper)
    sd = {"language_model." + k: v for k, v in hf.state_dict().items()}
    sd["vision_model.patch_embedding.linear.weight"] = torch.zeros(2, 2)
    sd["multi_modal_projector.linear_1.weight"] = torch.zeros(2, 2)
    ours = build_from_state_dict(c, state_dict_from_hf(sd, c, "llama4"))
    ids, mask, pos = batch_tools.padded_batch(V, LENGTHS)
    assert batch_tools.max_real_diff(hf_logits(hf, ids, mask, pos), our_logits(ours, ids, mask, pos), mask) <= 1e-4


def test_llama4_config_errors():
    base = dict(CASES["llama4"])
    with pytest.raises(ConfigError, match="moe_layers \\[0, 3\\] cannot be expressed"):
        config_from_hf(dict(base, moe_layers=[0, 3]))
    with pytest.raises(ConfigError, match="layer_types .* cannot be expressed"):
        config_from_hf(dict(base, no_rope_layers=[0, 1, 1, 1]))
    assert config_from_hf(dict(base, moe_layers=[])).n_experts == 0
    assert config_from_hf(dict(base, use_qk_norm=False)).qk_norm is None


def test_old_style_config_keys():
    """rope_theta / rope_scaling / rope_local_base_freq / sliding_window_pattern (transformers 4.x files)."""
    new = config_from_hf(CASES["gemma3"])
    old = {k: v for k, v in CASES["gemma3"].items() if k != "rope_parameters"}
    old.update(rope_theta=1e6, rope_local_base_freq=10000.0, sliding_window_pattern=6,
               rope_scaling={"type": "linear", "factor": 8.0})
    assert config_from_hf(old).diff(new) == {}
    assert (new.sliding_window, new.sliding_window_pattern, new.rope_local_theta) == (4, 6, 10000.0)
    assert new.rope_scaling == {"type": "linear", "factor": 8.0} and new.rope_local_scaling is None
    llama = config_from_hf({"model_type": "llama", **LLAMA, "rope_theta": 5e5, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}})
    assert llama.rope_theta == 5e5 and llama.rope_scaling["original_max_seq_len"] == 64
    mistral = config_from_hf({"model_type": "mistral", **LLAMA, "sliding_window": None})
    assert mistral.sliding_window is None
    qwen = config_from_hf({"model_type": "qwen2", **LLAMA, "use_sliding_window": False, "sliding_window": 8})
    assert qwen.sliding_window is None


def test_config_errors():
    with pytest.raises(ConfigError, match="model_type 'xlnet' is not supported; supported: gpt2, openai-gpt, llama"):
        config_from_hf({"model_type": "xlnet"})
    with pytest.raises(ConfigError, match="rope type 'dynamic' is not supported"):
        config_from_hf({"model_type": "llama", **LLAMA, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ConfigError, match="layer_types lists 3 layers but num_hidden_layers is 4"):
        config_from_hf({"model_type": "gemma2", **{**LLAMA, "num_hidden_layers": 4}, "layer_types": [
            "sliding_attention", "full_attention", "sliding_attention"]})
    with pytest.raises(ConfigError, match="layer_types"):
        config_from_hf({"model_type": "gemma2", **{**LLAMA, "num_hidden_layers": 4}, "layer_types": [
            "full_attention", "sliding_attention", "sliding_attention", "full_attention"]})
    with pytest.raises(ConfigError, match="mlp_only_layers"):
        config_from_hf({"model_type": "qwen3_moe", **LLAMA, "mlp_only_layers": [1]})


def test_falcon_blockers():
    """What evolm's Falcon does not read, or transformers' FalconDecoderLayer cannot run, is named."""
    with pytest.raises(ConfigError, match="alibi=true"):
        config_from_hf(dict(FALCON, alibi=True))
    with pytest.raises(ConfigError, match="parallel_attn=false: transformers' FalconDecoderLayer cannot run it"):
        config_from_hf(dict(FALCON, new_decoder_architecture=True, parallel_attn=False))
    with pytest.raises(ConfigError, match="num_ln_in_parallel_attn=2 needs new_decoder_architecture=true"):
        config_from_hf(dict(FALCON, num_ln_in_parallel_attn=2))
    with pytest.raises(ConfigError, match="num_kv_heads=2 with multi_query=false"):
        config_from_hf(dict(FALCON, multi_query=False, num_kv_heads=2))
    with pytest.raises(ConfigError, match="hidden_size 64 is not a multiple of num_attention_heads 3"):
        config_from_hf(dict(FALCON, num_attention_heads=3))
    # the multi-query flag wins over num_kv_heads (transformers ignores it then), as does the new decoder's
    assert config_from_hf(dict(FALCON, num_kv_heads=4)).n_kv_heads == 1
    assert config_from_hf(dict(FALCON, new_decoder_architecture=True, num_kv_heads=2)).n_kv_heads == 2


@pytest.mark.parametrize("model_type", [m for m in HF_DEFAULTS])
def test_hf_defaults_match_transformers(model_type):
    """Keys a config.json may omit take transformers' defaults; our table must agree with its classes."""
    cfg = transformers.CONFIG_MAPPING[model_type]()
    rope = getattr(cfg, "rope_parameters", None) or {}
    rope = rope.get("full_attention", rope)
    for key, want in HF_DEFAULTS[model_type].items():
        if key == "rope_theta":
            got = rope.get("rope_theta")
        elif key == "rope_local_base_freq":
            got = cfg.rope_parameters["sliding_attention"]["rope_theta"]
        elif key == "sliding_window_pattern":
            got = cfg._sliding_window_pattern
        elif key == "layer_types" or (key == "head_dim" and want is None) or key in ("time_step_rank", "mamba_dt_rank"):
            continue  # derived in __post_init__
        elif key == "num_key_value_heads" and want is None:
            got = cfg.num_key_value_heads if cfg.num_key_value_heads != cfg.num_attention_heads else None
        elif key == "sliding_window" and model_type in ("qwen2", "qwen3", "qwen3_moe"):
            continue  # nulled by use_sliding_window=False
        else:
            got = getattr(cfg, key)
        assert got == want, f"{model_type}.{key}: transformers {got!r}, evolm {want!r}"
