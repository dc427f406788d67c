"""GPT-1 and GPT-2: the starting point of the lineage.

- GPT-1 (Radford et al. 2018, "Improving Language Understanding by Generative Pre-Training"):
  12 post-norm blocks (``x = norm(x + f(x))``, as in the original Transformer), learned absolute
  positions over 512 tokens, GELU MLP (the tanh approximation, as its released code and
  transformers' ``openai-gpt`` compute it), a 40,478-token BPE vocabulary, tied embeddings and no
  final norm.
- GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners"): moves the
  norm to the front of each sub-layer (pre-norm) and adds a final LayerNorm, 1024 positions,
  50,257-token byte-level BPE. Biases everywhere, tanh-approximated GELU.

Reference parameter counts (``meta['params']``) are the figures quoted for the released
checkpoints (Hugging Face model cards, nanoGPT's table): 124M / 355M / 774M / 1558M. The GPT-2
paper's Table 2 gives 117M / 345M / 762M / 1542M, figures known to be miscounted; they are kept
in ``params_note``. The 1.5B in the model's usual name is 3.7% below the true 1.558B.
"""

_GPT1_PAPER = "Radford et al. 2018, Improving Language Understanding by Generative Pre-Training"
_GPT2_PAPER = "Radford et al. 2019, Language Models are Unsupervised Multitask Learners"

# shared by all GPT-2 sizes (HF config.json of openai-community/gpt2*)
_GPT2 = dict(
    vocab_size=50257, max_seq_len=1024, norm="layernorm", norm_eps=1e-5, norm_placement="pre",
    pos_emb="learned", mlp="mlp", activation="gelu_tanh", qkv_bias=True, o_bias=True,
    mlp_bias=True, tie_embeddings=True,
)


def _gpt2(hf_id: str, d: int, layers: int, heads: int, params: float, paper_figure: str) -> dict:
    return dict(_GPT2, d_model=d, n_layers=layers, n_heads=heads, d_ff=4 * d, meta={
        "hf_id": hf_id, "paper": _GPT2_PAPER, "params": params, "model_type": "gpt2",
        "params_note": f"{params / 1e6:.0f}M as quoted for the HF checkpoint (tied head counted "
                       f"once); the paper's Table 2 says {paper_figure}",
    })


PRESETS = {
    "gpt1": dict(
        vocab_size=40478, max_seq_len=512, d_model=768, n_layers=12, n_heads=12, d_ff=3072,
        norm="layernorm", norm_eps=1e-5, norm_placement="post", final_norm=False,
        pos_emb="learned", mlp="mlp", activation="gelu_tanh", qkv_bias=True, o_bias=True,
        mlp_bias=True, tie_embeddings=True,
        meta={"hf_id": "openai-community/openai-gpt", "paper": _GPT1_PAPER, "params": 117e6,
              "model_type": "openai-gpt",
              "params_note": "117M, the figure quoted for GPT-1 (the GPT-2 paper's smallest model "
                             "is 'equivalent to the original GPT'); exact count 116.53M"},
    ),
    "gpt2": _gpt2("openai-community/gpt2", 768, 12, 12, 124e6, "117M"),
    "gpt2-medium": _gpt2("openai-community/gpt2-medium", 1024, 24, 16, 355e6, "345M"),
    "gpt2-large": _gpt2("openai-community/gpt2-large", 1280, 36, 20, 774e6, "762M"),
    "gpt2-xl": _gpt2("openai-community/gpt2-xl", 1600, 48, 25, 1558e6, "1542M"),
}
