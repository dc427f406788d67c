"""Jamba (Lieber et al. 2024, "Jamba: A Hybrid Transformer-Mamba Language Model", arXiv:2403.19887).

Blocks of 8 layers: one grouped-query attention layer (32 query heads, 8 key/value heads, no
position encoding) among 7 Mamba layers (``mixer_pattern``, attention at index 4 of each group, as
the released config's ``attn_layer_offset``), the Mamba mixers with RMSNorms on dt, B and C
(``mamba_dt_b_c_norm``); a SwiGLU MLP on every layer, 16 experts with top-2 softmax routing on every
other layer (``moe_layer_step=2`` from layer 1). 4 such blocks, d_model 4096, an untied head over a
65,536-token vocabulary, trained to 256K context (the paper's 1:7 attention-to-Mamba ratio and
e=2, n=16, K=2).

The size is the released ``ai21labs/Jamba-v0.1`` config.json. The exact count equals transformers'
JambaForCausalLM built from that config on the meta device (tests/test_jamba.py).
"""

_PAPER = "Lieber et al. 2024, Jamba: A Hybrid Transformer-Mamba Language Model, arXiv:2403.19887"

PRESETS = {
    "jamba-v0.1": dict(
        vocab_size=65536, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, d_ff=14336, max_seq_len=262144,
        norm="rmsnorm", norm_eps=1e-6, norm_placement="pre", pos_emb="none", attention="mha",
        mixer_pattern=("mamba", "mamba", "mamba", "mamba", "mha", "mamba", "mamba", "mamba"),
        mlp="glu", activation="silu", mlp_bias=False,
        mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=256, mamba_conv_bias=True,
        mamba_proj_bias=False, mamba_dt_b_c_norm=True,
        n_experts=16, n_experts_per_tok=2, router="softmax", norm_topk_prob=False, moe_layer_step=2,
        moe_first_layer=1, moe_aux_loss_coef=0.001, tie_embeddings=False, init_std=0.02,
        meta={"hf_id": "ai21labs/Jamba-v0.1", "paper": _PAPER, "params": 51.57e9, "active": 12.1e9,
              "model_type": "jamba",
              "params_note": "51.57B counted from the released config (the paper: 52B total, 12B active)"}),
}
