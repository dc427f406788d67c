"""Tiny presets for tests and demos: each family's architecture at a few hundred K parameters.

Same parts as the published models (norm placement, attention kind, MLP, MoE routing, RoPE
variants), shrunk to a 256-512 token vocabulary and widths of 64-96 so that a forward and
backward pass takes milliseconds on a CPU. ``meta['mimics']`` names the preset they shrink.
"""

from evolm.presets.bert import PRESETS as _BERT
from evolm.presets.deepseek import PRESETS as _DS
from evolm.presets.falcon import PRESETS as _FALCON
from evolm.presets.gemma import PRESETS as _GEMMA
from evolm.presets.gpt import PRESETS as _GPT
from evolm.presets.llama import PRESETS as _LLAMA
from evolm.presets.mistral import PRESETS as _MISTRAL
from evolm.presets.modernbert import PRESETS as _MODERNBERT
from evolm.presets.olmo import PRESETS as _OLMO
from evolm.presets.qwen import PRESETS as _QWEN


def _shrink(base: dict, mimics: str, **sizes) -> dict:
    """The published preset's architecture with small sizes (meta replaced)."""
    d = {k: v for k, v in base.items() if k != "meta"}
    d.update(sizes)
    d["meta"] = {"mimics": mimics, "model_type": base["meta"]["model_type"]}
    return d


PRESETS = {
    "tiny-gpt2": _shrink(_GPT["gpt2"], "gpt2", vocab_size=512, d_model=96, n_layers=3, n_heads=4,
                         d_ff=384, max_seq_len=256),
    "tiny-llama": _shrink(_LLAMA["llama-3.1-8b"], "llama-3.1-8b", vocab_size=512, d_model=96, n_layers=3,
                          n_heads=4, n_kv_heads=2, d_ff=256, max_seq_len=256,
                          rope_scaling={"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_seq_len": 64}),
    "tiny-falcon": _shrink(_FALCON["falcon-40b"], "falcon-40b", vocab_size=512, d_model=64, n_layers=2, n_heads=4,
                           n_kv_heads=2, d_ff=256, max_seq_len=256),
    "tiny-mixtral": _shrink(_MISTRAL["mixtral-8x7b"], "mixtral-8x7b", vocab_size=512, d_model=64,
                            n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, moe_d_ff=128,
                            max_seq_len=256, n_experts=4, n_experts_per_tok=2),
    "tiny-gemma3": _shrink(_GEMMA["gemma-3-4b"], "gemma-3-4b", vocab_size=512, d_model=64, n_layers=6,
                           n_heads=4, n_kv_heads=2, head_dim=32, query_pre_attn_scalar=32, d_ff=192,
                           max_seq_len=256, sliding_window=16),
    "tiny-olmo2": _shrink(_OLMO["olmo-2-1b"], "olmo-2-1b", vocab_size=512, d_model=96, n_layers=3,
                          n_heads=4, d_ff=256, max_seq_len=256),
    "tiny-qwen3": _shrink(_QWEN["qwen3-0.6b"], "qwen3-0.6b", vocab_size=512, d_model=64, n_layers=3,
                          n_heads=4, n_kv_heads=2, head_dim=32, d_ff=192, max_seq_len=256),
    "tiny-qwen3-moe": _shrink(_QWEN["qwen3-30b-a3b"], "qwen3-30b-a3b", vocab_size=512, d_model=64,
                              n_layers=3, n_heads=4, n_kv_heads=2, head_dim=32, d_ff=192, moe_d_ff=48,
                              max_seq_len=256, n_experts=8, n_experts_per_tok=2),
    "tiny-deepseek": _shrink(_DS["deepseek-v3"], "deepseek-v3", vocab_size=512, d_model=64, n_layers=3,
                             n_heads=4, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
                             qk_rope_head_dim=8, v_head_dim=16, d_ff=192, moe_d_ff=32, n_experts=8,
                             n_experts_per_tok=2, n_shared_experts=1, first_k_dense=1,
                             n_expert_groups=4, topk_groups=2, max_seq_len=256,
                             rope_scaling={"type": "yarn", "factor": 4.0, "original_max_seq_len": 64,
                                           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                                           "mscale_all_dim": 1.0}),
    # encoders (mask='bidirectional', a masked-LM head): a window of 16 on two of every three ModernBERT layers
    "tiny-bert": _shrink(_BERT["bert-base"], "bert-base", vocab_size=512, d_model=64, n_layers=2, n_heads=4, d_ff=256,
                         max_seq_len=256),
    "tiny-roberta": _shrink(_BERT["roberta-base"], "roberta-base", vocab_size=512, d_model=64, n_layers=2, n_heads=4,
                            d_ff=256, max_seq_len=256),
    "tiny-modernbert": _shrink(_MODERNBERT["modernbert-base"], "modernbert-base", vocab_size=512, d_model=64,
                               n_layers=3, n_heads=4, d_ff=96, max_seq_len=256, sliding_window=16),
}
