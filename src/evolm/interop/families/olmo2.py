"""OLMo 2 (OLMo et al. 2024, arXiv:2501.00656): Llama with its norms moved after attention and MLP
(on the branch outputs, before the residual add) and RMSNorm over all query/key channels."""

from __future__ import annotations

from evolm.interop.families.base import Family
from evolm.interop.families.llama import LLAMA_LIKE

OLMO2 = Family(
    model_type="olmo2", architecture="Olmo2ForCausalLM",
    defaults=dict(LLAMA_LIKE, hidden_act="silu", attention_bias=False, vocab_size=50304, hidden_size=4096,
                  intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                  max_position_embeddings=2048, rms_norm_eps=1e-5),
    norm_placement="olmo2", qk_norm="full",
    gguf_archs=("olmo2",),
)
