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
_GPT3_PAPER = "Brown et al. 2020, Language Models are Few-Shot Learners"

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


# GPT-3: "the same model and architecture as GPT-2 ... with the exception that we use alternating
# dense and locally banded sparse attention patterns in the layers of the transformer, similar to
# the Sparse Transformer" (Brown et al. 2020, section 2.1), n_ctx = 2048, d_ff = 4 d_model. The
# paper gives neither the band's width nor which kind comes first: we take the band of EleutherAI's
# GPT-Neo, the open reproduction (256 tokens, the query included), and evolm's pattern order (even
# layers banded, odd layers dense). The weights were never released: no hf_id in meta.
_GPT3 = dict(_GPT2, max_seq_len=2048, sliding_window=256, sliding_window_pattern=2)


def _gpt3(label: str, params: float, layers: int, d: int, heads: int, d_head: int, batch: str, lr: float,
          note: str = "", tolerance: float = 0.015) -> dict:
    return dict(_GPT3, d_model=d, n_layers=layers, n_heads=heads, head_dim=d_head, d_ff=4 * d, meta={
        "paper": _GPT3_PAPER, "params": params, "params_tolerance": tolerance,
        "train": {"batch_tokens": batch, "lr": lr, "tokens": "300B"},
        "params_note": f"GPT-3 {label}: {params / 1e9:g}B as Table 2.1 of the paper gives it" + note,
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
    # Table 2.1: n_params, n_layers, d_model, n_heads, d_head, batch size (tokens), learning rate
    "gpt3-small": _gpt3("Small", 125e6, 12, 768, 12, 64, "0.5M", 6.0e-4),
    "gpt3-medium": _gpt3("Medium", 350e6, 24, 1024, 16, 64, "0.5M", 3.0e-4,
                         "; the shape counts 355.9M (+1.7%), OpenAI's count for this shape was low in the GPT-2 "
                         "paper too (345M for GPT-2 medium's 354.8M)", tolerance=0.02),
    "gpt3-large": _gpt3("Large", 760e6, 24, 1536, 16, 96, "0.5M", 2.5e-4),
    "gpt3-xl": _gpt3("XL", 1.3e9, 24, 2048, 16, 128, "1M", 2.0e-4,
                     "; the table lists 24 heads of 128 (3072 wide, which counts 1.52B, not 1.3B): 16 x 128 = "
                     "d_model counts 1.315B, as GPT-Neo 1.3B, the open reproduction, has it"),
    "gpt3-2.7b": _gpt3("2.7B", 2.7e9, 32, 2560, 32, 80, "1M", 1.6e-4,
                       "; the shape counts 2.652B (-1.8%), which rounds to the table's 2.7B", tolerance=0.02),
    "gpt3-6.7b": _gpt3("6.7B", 6.7e9, 32, 4096, 32, 128, "2M", 1.2e-4),
    "gpt3-13b": _gpt3("13B", 13.0e9, 40, 5140, 40, 128, "2M", 1.0e-4,
                      "; d_model 5140 is the table's (40 heads x 128 = 5120 inside attention)"),
    "gpt3-175b": _gpt3("175B", 175.0e9, 96, 12288, 96, 128, "3.2M", 0.6e-4),
}
