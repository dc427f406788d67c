"""Gemma 2 and Gemma 3 (text): sandwich norms, GeGLU, interleaved local/global attention.

- Gemma 2 (Gemma Team 2024, arXiv:2408.00118): RMSNorm with a ``(1 + w)`` scale placed before
  *and* after each sub-layer ("sandwich"), GeGLU MLP (tanh GELU), embeddings scaled by
  sqrt(d_model) and tied to the head, a 256k vocabulary, GQA, alternating sliding-window (4096)
  and global layers, tanh soft-capping of attention logits (50) and final logits (30), and
  query scaling by ``query_pre_attn_scalar ** -0.5`` instead of ``head_dim ** -0.5``.
- Gemma 3 (Gemma Team 2025, arXiv:2503.19786): drops soft-capping for QK-norm (per-head
  RMSNorm on queries and keys), five local layers per global one, a short window (512 for
  270M/1B, 1024 for 4B+), RoPE base 10k on local layers and 1M on global ones, and (4B+) linear
  RoPE scaling by 8 on global layers for a 128k context.

Gemma 3 4B/12B/27B are multimodal checkpoints; these presets are their language models only
(``text_config``; vocabulary 262,208 including image tokens). Their reference totals are the
Gemma 3 report's Table 1 embedding + non-embedding figures (4B: 675M + 3,209M; 12B: 1,012M +
10,759M; 27B: 1,416M + 25,600M), which are rounded to 1M.
"""

_G2_PAPER = "Gemma Team 2024, Gemma 2: Improving Open Language Models at a Practical Size, arXiv:2408.00118"
_G3_PAPER = "Gemma Team 2025, Gemma 3 Technical Report, arXiv:2503.19786"

_GEMMA = dict(
    norm="rmsnorm", norm_eps=1e-6, norm_unit_offset=True, norm_placement="sandwich",
    pos_emb="rope", mlp="glu", activation="gelu_tanh", qkv_bias=False, o_bias=False,
    mlp_bias=False, tie_embeddings=True, embed_scale=True,
)
_GEMMA2 = dict(_GEMMA, vocab_size=256000, max_seq_len=8192, rope_theta=10000.0, sliding_window=4096,
               sliding_window_pattern=2, attn_softcap=50.0, final_softcap=30.0)
_GEMMA3 = dict(_GEMMA, qk_norm="head", head_dim=256, query_pre_attn_scalar=256, rope_theta=1e6,
               rope_local_theta=10000.0, sliding_window_pattern=6)
_GEMMA3_SMALL = dict(_GEMMA3, vocab_size=262144, max_seq_len=32768, sliding_window=512)
_GEMMA3_LARGE = dict(_GEMMA3, vocab_size=262208, max_seq_len=131072, sliding_window=1024,
                     rope_scaling={"type": "linear", "factor": 8.0})


def _meta(hf_id: str, paper: str, params: float, note: str, model_type: str,
          non_embedding: float | None = None) -> dict:
    meta = {"hf_id": hf_id, "paper": paper, "params": params, "params_note": note, "model_type": model_type}
    if non_embedding is not None:  # Gemma 3 report, Table 1
        meta["params_non_embedding"] = non_embedding
    return meta


PRESETS = {
    "gemma-2-2b": dict(_GEMMA2, d_model=2304, n_layers=26, n_heads=8, n_kv_heads=4, head_dim=256,
                       d_ff=9216, query_pre_attn_scalar=256,
                       meta=_meta("google/gemma-2-2b", _G2_PAPER, 2.61e9,
                                  "2.61B: total of the HF checkpoint (the model is called 2B)", "gemma2")),
    "gemma-2-9b": dict(_GEMMA2, d_model=3584, n_layers=42, n_heads=16, n_kv_heads=8, head_dim=256,
                       d_ff=14336, query_pre_attn_scalar=256,
                       meta=_meta("google/gemma-2-9b", _G2_PAPER, 9.24e9,
                                  "9.24B: total of the HF checkpoint", "gemma2")),
    "gemma-2-27b": dict(_GEMMA2, d_model=4608, n_layers=46, n_heads=32, n_kv_heads=16, head_dim=128,
                        d_ff=36864, query_pre_attn_scalar=144,
                        meta=_meta("google/gemma-2-27b", _G2_PAPER, 27.2e9,
                                   "27.2B: total of the HF checkpoint", "gemma2")),
    "gemma-3-270m": dict(_GEMMA3_SMALL, d_model=640, n_layers=18, n_heads=4, n_kv_heads=1, d_ff=2048,
                         meta=_meta("google/gemma-3-270m", _G3_PAPER, 270e6,
                                    "270M: model card and launch post (170M embedding + 100M "
                                    "transformer blocks)", "gemma3_text", 100e6)),
    "gemma-3-1b": dict(_GEMMA3_SMALL, d_model=1152, n_layers=26, n_heads=4, n_kv_heads=1, d_ff=6912,
                       meta=_meta("google/gemma-3-1b-pt", _G3_PAPER, 1000e6,
                                  "report Table 1: 302M embedding + 698M non-embedding", "gemma3_text", 698e6)),
    "gemma-3-4b": dict(_GEMMA3_LARGE, d_model=2560, n_layers=34, n_heads=8, n_kv_heads=4, d_ff=10240,
                       meta=_meta("google/gemma-3-4b-pt", _G3_PAPER, 3884e6,
                                  "text model only; report Table 1: 675M embedding + 3,209M "
                                  "non-embedding (rounded to 1M; vision encoder 417M excluded)", "gemma3_text", 3209e6)),
    "gemma-3-12b": dict(_GEMMA3_LARGE, d_model=3840, n_layers=48, n_heads=16, n_kv_heads=8, d_ff=15360,
                        meta=_meta("google/gemma-3-12b-pt", _G3_PAPER, 11771e6,
                                   "text model only; report Table 1: 1,012M embedding + 10,759M "
                                   "non-embedding (rounded to 1M; vision encoder 417M excluded)", "gemma3_text", 10759e6)),
    "gemma-3-27b": dict(_GEMMA3_LARGE, d_model=5376, n_layers=62, n_heads=32, n_kv_heads=16, head_dim=128,
                        d_ff=21504, query_pre_attn_scalar=168,
                        meta=_meta("google/gemma-3-27b-pt", _G3_PAPER, 27016e6,
                                   "text model only; report Table 1: 1,416M embedding + 25,600M "
                                   "non-embedding (rounded to 1M; vision encoder 417M excluded)", "gemma3_text", 25600e6)),
}
