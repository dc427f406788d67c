"""Every registered family reads back what it writes: config.json -> ModelConfig -> config.json.

No transformers needed: this checks the family tables against each other. (That transformers
reads the same files is tests/test_parity_hf.py and tests/test_hf_export.py.) A new family must
add its tiny config.json here; the first test fails until it does.
"""

from __future__ import annotations

import json

import pytest

from evolm.config import ConfigError
from evolm.interop.families import EXPORT_ORDER, FAMILIES, GGUF_FAMILIES, SUPPORTED_MODEL_TYPES, family
from evolm.interop.hf import config_from_hf, config_to_hf, hf_family

V = 128
LLAMA = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1)
MLA = dict(LLAMA, num_hidden_layers=3, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
           qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
           n_shared_experts=1, first_k_dense_replace=1)
ENCODER = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
               max_position_embeddings=64, initializer_range=0.1)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.9, "mscale_all_dim": 1.1}

# one tiny config.json per family, with the features that family has switched on
TINY: dict[str, dict] = {
    "gpt2": dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1),
    "openai-gpt": dict(vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1),
    # Falcon-40B's two-norm block with grouped K/V heads, biases and linear RoPE scaling
    "falcon": dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_kv_heads=2,
                   ffn_hidden_size=96, new_decoder_architecture=True, num_ln_in_parallel_attn=2, bias=True,
                   max_position_embeddings=128, initializer_range=0.1,
                   rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}),
    "llama": dict(LLAMA, attention_bias=True, mlp_bias=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "mistral": dict(LLAMA, num_hidden_layers=3, head_dim=32, sliding_window=5),
    "mixtral": dict(LLAMA, num_local_experts=4, num_experts_per_tok=2, output_router_logits=True,
                    router_aux_loss_coef=0.02),
    "qwen2": dict(LLAMA, tie_word_embeddings=True, use_sliding_window=True, sliding_window=8, max_window_layers=0),
    "qwen3": dict(LLAMA, head_dim=32),
    "qwen3_moe": dict(LLAMA, num_hidden_layers=3, head_dim=32, num_experts=4, num_experts_per_tok=2,
                      moe_intermediate_size=32, norm_topk_prob=False, mlp_only_layers=[0]),
    "gemma": dict(LLAMA, head_dim=16),
    "gemma2": dict(LLAMA, num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                   attn_logit_softcapping=1.5, final_logit_softcapping=3.0),
    "gemma3_text": dict(LLAMA, num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                        rope_parameters={"full_attention": {"rope_type": "linear", "rope_theta": 1e6, "factor": 8.0},
                                         "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}),
    "olmo2": dict(LLAMA, rms_norm_eps=1e-6),
    # chunked attention, NoPE every 2nd layer with the query temperature, L2 QK-norm, MoE every 2nd layer
    "llama4_text": dict(LLAMA, num_hidden_layers=4, head_dim=16, intermediate_size_mlp=96, intermediate_size=32,
                        attention_chunk_size=8, no_rope_layer_interval=2, interleave_moe_layer_step=2,
                        num_local_experts=4, num_experts_per_tok=1, use_qk_norm=True, attn_temperature_tuning=True,
                        floor_scale=4, attn_scale=0.1),
    "deepseek_v2": dict(MLA, q_lora_rank=None, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                        rope_parameters=YARN),
    "deepseek_v3": dict(MLA, q_lora_rank=24, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                        rope_parameters=YARN),
    # the encoders, each with a task head other than masked LM
    "bert": dict(ENCODER, architectures=["BertForSequenceClassification"], id2label={"0": "neg", "1": "pos"}),
    "roberta": dict(ENCODER, pad_token_id=1, max_position_embeddings=66, type_vocab_size=1),
    "modernbert": dict(ENCODER, architectures=["ModernBertForTokenClassification"], num_labels=3, local_attention=8,
                       layer_types=["full_attention", "sliding_attention"], norm_bias=True,
                       rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e5},
                                        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
    # the encoder-decoders: asymmetric stacks, v1.1's gated GELU, Switch's sparse layers, BART's scaled embedding
    "t5": dict(vocab_size=V, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_decoder_layers=3, num_heads=4,
               relative_attention_num_buckets=16, relative_attention_max_distance=64, feed_forward_proj="gated-gelu",
               tie_word_embeddings=False, decoder_start_token_id=0),
    "switch_transformers": dict(vocab_size=V, d_model=64, d_kv=16, d_ff=96, num_layers=4, num_decoder_layers=4,
                                num_heads=4, num_experts=4, num_sparse_encoder_layers=2, num_sparse_decoder_layers=2,
                                expert_capacity=8, decoder_start_token_id=0),
    "bart": dict(vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96, max_position_embeddings=64,
                 scale_embedding=True),
    # Llama 3.2 Vision: a Llama text model with cross-attention layers, and a tiled ViT
    "mllama": dict(text_config=dict(LLAMA, num_hidden_layers=4, cross_attention_layers=[1, 3], rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        vision_config=dict(hidden_size=32, num_hidden_layers=3, num_global_layers=1, attention_heads=4,
                           intermediate_size=48, vision_output_dim=96, image_size=16, patch_size=4, max_num_tiles=2,
                           intermediate_layers_indices=[0, 2], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
        image_token_index=V),
    # odd sizes, both kinds of bias, an untied head
    "mamba": dict(vocab_size=V, hidden_size=48, num_hidden_layers=2, state_size=8, conv_kernel=3, expand=3,
                  time_step_rank=5, use_bias=True, use_conv_bias=False, tie_word_embeddings=False,
                  initializer_range=0.1),
    # a hybrid: attention every 3rd layer from layer 2, experts every 3rd from 0, biases on the projections
    "jamba": dict(vocab_size=V, hidden_size=48, intermediate_size=80, num_hidden_layers=6, num_attention_heads=4,
                  num_key_value_heads=2, attn_layer_period=3, attn_layer_offset=2, expert_layer_period=3,
                  expert_layer_offset=0, num_experts=4, num_experts_per_tok=1, mamba_d_state=8, mamba_d_conv=3,
                  mamba_expand=3, mamba_dt_rank=5, mamba_proj_bias=True, mamba_conv_bias=False,
                  tie_word_embeddings=True, output_router_logits=True, router_aux_loss_coef=0.01),
    # a state-space model: mixer-only blocks, grouped B/C, biases, a time-step limit
    "mamba2": dict(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_heads=8, head_dim=16, state_size=16,
                   n_groups=2, chunk_size=32, use_bias=True, time_step_limit=[0.01, 5.0], tie_word_embeddings=True,
                   initializer_range=0.1),
}


def test_every_family_has_a_tiny_config():
    assert set(TINY) == set(FAMILIES)
    assert set(EXPORT_ORDER) == set(FAMILIES)


@pytest.mark.parametrize("model_type", list(FAMILIES))
def test_family_round_trips_its_config(model_type):
    fam = FAMILIES[model_type]
    h = {"model_type": model_type, **TINY[model_type]}
    c = config_from_hf(h)
    assert hf_family(c) == model_type, "export would pick another family for what this family read"
    back = json.loads(json.dumps(config_to_hf(c)))
    assert back["model_type"] == model_type
    assert back["architectures"] == TINY[model_type].get("architectures", [fam.architecture])
    assert config_from_hf(back).diff(c) == {}
    # what the file said, the written file says too (keys the family writes under the same name)
    said = {**fam.defaults, **h}
    changed = {k: (said[k], back[k]) for k in TINY[model_type] if k in back and not _same(said[k], back[k])}
    assert not changed, changed


def _same(said, back) -> bool:
    """A written value says what the file said; a nested config (mllama's text_config) may add keys."""
    if isinstance(said, dict) and isinstance(back, dict):
        return all(k in back and _same(v, back[k]) for k, v in said.items())
    return said == back


def test_lookup_names_the_supported_types():
    assert family("gemma3") is FAMILIES["gemma3_text"]  # the multimodal wrapper reads as its text model
    with pytest.raises(ConfigError, match="model_type 'xlnet' is not supported; supported: gpt2, openai-gpt, llama"):
        family("xlnet")
    assert set(SUPPORTED_MODEL_TYPES) == set(FAMILIES) | {"gemma3", "llama4"}


def test_gguf_architectures_belong_to_one_family_each():
    archs = [a for f in FAMILIES.values() for a in f.gguf_archs]
    assert len(archs) == len(set(archs)) == len(GGUF_FAMILIES)
    assert set(GGUF_FAMILIES) == {"llama", "mistral", "qwen2", "qwen3", "qwen3moe", "gemma2", "gemma3", "olmo2",
                                  "deepseek2", "gpt2", "falcon", "mamba"}
