"""Mamba-2 (Dao & Gu 2024, "Transformers are SSMs", arXiv:2405.21060): state-spaces/mamba2-*.

Pure state-space models: ``n_layers`` mixer-only blocks (``x = x + mamba2(rmsnorm(x))``, no MLP,
no positions), RMSNorm, a head tied to the embedding. The released checkpoints (trained on 300B
tokens of the Pile, GPT-NeoX tokenizer) ship a mamba_ssm ``config.json`` that names only
``d_model``, ``n_layer``, ``vocab_size`` (50277, padded to a multiple of 16: 50288 rows) and
``ssm_cfg: {"layer": "Mamba2"}``; the mixer takes mamba_ssm's ``Mamba2`` defaults, which are
also transformers' Mamba2Config's: state size 128, head dim 64 (so ``2 * d_model / 64`` heads),
one B/C group, expand 2, convolution width 4, chunks of 256, dt in [0.001, 0.1] at init.
(The 780m checkpoint's tensors confirm it: ``in_proj`` is 6448 x 1536 = 2*3072 + 2*128 + 48 rows.)

The sizes are GPT-3's widths and depths with two Mamba blocks per Transformer layer (24 layers
at 768, 48 at 1024/1536/2048, 64 at 2560). ``meta['params']`` is the rounded size in each name;
the exact count equals transformers' Mamba2ForCausalLM built from the same config
(tests/test_presets.py).
"""

_PAPER = "Dao & Gu 2024, Transformers are SSMs: Generalized Models and Efficient Algorithms Through " \
         "Structured State Space Duality, arXiv:2405.21060"

_MAMBA2 = dict(
    vocab_size=50288, n_heads=1, max_seq_len=1 << 20, norm="rmsnorm", norm_eps=1e-5, norm_placement="pre",
    pos_emb="none", attention="mamba2", mlp="none", mlp_bias=False, tie_embeddings=True,
    mamba_d_state=128, mamba_d_head=64, mamba_n_groups=1, mamba_expand=2, mamba_d_conv=4, mamba_chunk_size=256,
    mamba_proj_bias=False, mamba_conv_bias=True,
)


def _preset(size: str, d_model: int, n_layers: int, params: float) -> dict:
    return dict(_MAMBA2, d_model=d_model, n_layers=n_layers,
                meta={"hf_id": f"state-spaces/mamba2-{size}", "paper": _PAPER, "params": params,
                      "model_type": "mamba2",
                      "params_note": f"{size} as the checkpoint's name rounds it; exact count from the config"})


PRESETS = {
    "mamba2-130m": _preset("130m", 768, 24, 130e6),
    "mamba2-370m": _preset("370m", 1024, 48, 370e6),
    "mamba2-780m": _preset("780m", 1536, 48, 780e6),
    "mamba2-1.3b": _preset("1.3b", 2048, 48, 1.3e9),
    "mamba2-2.7b": _preset("2.7b", 2560, 64, 2.7e9),
}
