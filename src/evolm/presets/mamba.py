"""Mamba (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective State Spaces", arXiv:2312.00752).

Every block is a selective state space alone (``attention="mamba"``, ``mlp="none"``: two Mamba
blocks take the parameters of one attention + MLP block), pre-RMSNorm, no positions, a tied head
over the GPT-NeoX tokenizer's vocabulary padded to 50,280. State size 16, convolution width 4,
expansion 2, step-size rank ceil(d_model / 16), a bias on the convolution only.

Sizes are the released ``state-spaces/mamba-*-hf`` config.json files (hidden_size / num_hidden_layers:
768/24, 1024/48, 1536/48, 2048/48, 2560/64), trained on the Pile with 2048-token sequences. The
names round the counts; the exact count of each config equals transformers' MambaForCausalLM built
from the same config.json (tests/test_mamba.py).
"""

_PAPER = "Gu & Dao 2023, Mamba: Linear-Time Sequence Modeling with Selective State Spaces, arXiv:2312.00752"

_MAMBA = dict(
    vocab_size=50280, max_seq_len=2048, n_heads=1, norm="rmsnorm", norm_eps=1e-5, norm_placement="pre",
    pos_emb="none", attention="mamba", mlp="none", mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
    mamba_conv_bias=True, mamba_proj_bias=False, tie_embeddings=True, init_std=0.1,
)


def _size(name: str, d_model: int, n_layers: int, params: float, exact: str) -> dict:
    meta = {"hf_id": f"state-spaces/{name}-hf", "paper": _PAPER, "params": params, "model_type": "mamba",
            "params_note": f"{exact} counted from the released config (tied head once); the name rounds it"}
    return dict(_MAMBA, d_model=d_model, n_layers=n_layers, meta=meta)


PRESETS = {
    "mamba-130m": _size("mamba-130m", 768, 24, 129_135_360, "129.1M"),
    "mamba-370m": _size("mamba-370m", 1024, 48, 371_516_416, "371.5M"),
    "mamba-790m": _size("mamba-790m", 1536, 48, 793_204_224, "793.2M"),
    "mamba-1.4b": _size("mamba-1.4b", 2048, 48, 1_372_178_432, "1.37B"),
    "mamba-2.8b": _size("mamba-2.8b", 2560, 64, 2_768_345_600, "2.77B"),
}
