"""T5, T5 v1.1 and the Switch Transformer: Google's encoder-decoders (transformers ``t5`` and
``switch_transformers``).

- T5 (Raffel et al. 2019, "Exploring the Limits of Transfer Learning with a Unified Text-to-Text
  Transformer", arXiv:1910.10683): pre-norm encoder and decoder, RMSNorm without mean or bias,
  no biases, relative position buckets (32, up to 128 tokens) shared per stack, unscaled
  attention scores, a ReLU MLP and a tied head scaled by ``d_model ** -0.5``. 32,128-token
  SentencePiece vocabulary.
- T5 v1.1 (the T5 repository's released_checkpoints.md): gated-GELU MLP (tanh GELU), an untied,
  unscaled head, no dropout in pre-training, and other widths (``d_ff`` smaller, ``small`` with
  8 layers and 6 heads).
- Switch Transformer (Fedus et al. 2021, "Switch Transformers: Scaling to Trillion Parameter
  Models with Simple and Efficient Sparsity", arXiv:2101.03961): T5 with every other MLP replaced
  by top-1 routed experts with a capacity of 64 tokens per sequence, a router z-loss and a
  load-balancing loss (0.001 each).

Parameter counts (``meta['params']``) are what transformers' ``num_parameters()`` gives for the
released checkpoints (a tied head counted once); ``tests/test_seq2seq.py`` checks every preset
against transformers' model built from the published config.
"""

_T5_PAPER = "Raffel et al. 2019, Exploring the Limits of Transfer Learning with a Unified Text-to-Text Transformer"
_SWITCH_PAPER = ("Fedus et al. 2021, Switch Transformers: Scaling to Trillion Parameter Models with Simple and "
                 "Efficient Sparsity")

# shared by every size (the released config.json files; T5 has no position limit: 512 is the
# length it was trained at)
_T5 = dict(
    vocab_size=32128, head_dim=64, max_seq_len=512, norm="rmsnorm", norm_eps=1e-6, norm_placement="pre",
    pos_emb="relative", relative_attention_num_buckets=32, relative_attention_max_distance=128,
    query_pre_attn_scalar=1.0, qkv_bias=False, o_bias=False, mlp_bias=False, decoder_start_token_id=0,
)


def _t5(hf_id: str, d: int, layers: int, heads: int, d_ff: int, params: float, v1_1: bool = False) -> dict:
    head = dict(mlp="glu", activation="gelu_tanh", tie_embeddings=False, head_input_scale=False) if v1_1 else \
        dict(mlp="mlp", activation="relu", tie_embeddings=True, head_input_scale=True)
    return dict(_T5, **head, d_model=d, n_layers=layers, encoder_layers=layers, n_heads=heads, d_ff=d_ff, meta={
        "hf_id": hf_id, "paper": _T5_PAPER, "params": params, "model_type": "t5",
        "params_note": f"{params / 1e6:.1f}M: transformers' num_parameters() of {hf_id}",
    })


PRESETS = {
    "t5-small": _t5("google-t5/t5-small", 512, 6, 8, 2048, 60_506_624),
    "t5-base": _t5("google-t5/t5-base", 768, 12, 12, 3072, 222_903_552),
    "t5-large": _t5("google-t5/t5-large", 1024, 24, 16, 4096, 737_668_096),
    "t5-v1_1-small": _t5("google/t5-v1_1-small", 512, 8, 6, 1024, 76_961_152, v1_1=True),
    "t5-v1_1-base": _t5("google/t5-v1_1-base", 768, 12, 12, 2048, 247_577_856, v1_1=True),
    "t5-v1_1-large": _t5("google/t5-v1_1-large", 1024, 24, 16, 2816, 783_150_080, v1_1=True),
    "switch-base-8": dict(
        _T5, mlp="mlp", activation="relu", tie_embeddings=True, head_input_scale=True, d_model=768, n_layers=12,
        encoder_layers=12, n_heads=12, d_ff=3072, n_experts=8, n_experts_per_tok=1, norm_topk_prob=False,
        moe_layer_step=2, moe_first_layer=1, expert_capacity=64, moe_loss_groups="sequence",
        moe_aux_loss_coef=0.001, moe_z_loss_coef=0.001,
        meta={"hf_id": "google/switch-base-8", "paper": _SWITCH_PAPER, "params": 619_339_008,
              "model_type": "switch_transformers",
              "params_note": "619M: transformers' num_parameters() of google/switch-base-8 "
                             "(8 experts in 12 of 24 layers)"}),
}
