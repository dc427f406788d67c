"""GGUF export (``evolm convert --to gguf``): the file is the model, for evolm, transformers and llama.cpp.

- round trip: evolm -> GGUF -> evolm gives bit-equal logits for f32, and for f16 / bf16 the
  logits of the model with its 2-D weights rounded to that type (norms and biases stay f32);
- quantized types: every 2-D tensor's bytes are the ``gguf`` package's own quantizer's, and the
  weights evolm reads back equal that quantizer's quantize -> dequantize, block for block;
- transformers' independent GGUF loader builds the same model (logits) and tokenizer (ids);
- the real SmolLM2 file, re-exported, round-trips exactly with its vocabulary intact;
- llama.cpp (llama-cpp-python, ``make bench-deps``) decodes the same greedy text as evolm;
- what cannot be exported is one clear error naming the architecture, field or type.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from tokenizers import AddedToken, decoders, models, normalizers, trainers  # noqa: E402
from tokenizers import Tokenizer as Backend  # noqa: E402

from evolm.interop.gguf import GGUFFile, find_asset, load_gguf  # noqa: E402
from evolm.interop.gguf_export import ExportError, export_gguf, gguf_plan, tensor_types, write_gguf  # noqa: E402
from evolm.model import Transformer  # noqa: E402
from evolm.presets import get_preset  # noqa: E402
from evolm.tokenizer import Tokenizer, train_bpe  # noqa: E402

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
TEXT = ["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x + 1",
        "But soft, what light through yonder window breaks? It is the east."] * 20
SAMPLE = "The quick brown fox, ünïcode 123!  two  spaces\n\tdef g(): return 'east'"
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
GEMMA_CHAT = ("{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
              "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


def make_bpe() -> Tokenizer:
    """Byte-level BPE (what evolm trains, SmolLM2 and Qwen use): tokenizer.ggml.model = gpt2."""
    return train_bpe(iter(TEXT), vocab_size=320, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                     chat_template=CHATML)


def make_spm() -> Tokenizer:
    """SentencePiece-style BPE with byte fallback (Gemma's kind): tokenizer.ggml.model = llama."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    t = Backend(models.BPE())
    t.normalizer = normalizers.Replace(" ", "▁")
    t.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=10_000, show_progress=False))
    learned = json.loads(t.to_str())["model"]
    merges = [tuple(m) for m in learned["merges"]][:60]
    made = {"".join(m) for m in merges}
    pieces = [p for p, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if len(p) == 1 or p in made]
    vocab = {p: i for i, p in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)] + pieces)}
    back = Backend(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    back.normalizer = normalizers.Replace(" ", "▁")
    back.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    back.add_special_tokens([AddedToken(s, normalized=False, special=True) for s in specials])
    return Tokenizer(back, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>", pad_token="<pad>",
                     add_bos=True, chat_template=GEMMA_CHAT, name="spm")


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    return make_bpe()


@pytest.fixture(scope="module")
def spm() -> Tokenizer:
    return make_spm()


def _config(name: str):
    llama = get_preset("tiny-llama")  # Llama 3 RoPE scaling (-> rope_freqs), untied head
    gemma2 = dataclasses.replace(get_preset("gemma-2-2b"), vocab_size=512, d_model=64, n_layers=2, n_heads=4,
                                 n_kv_heads=2, head_dim=32, query_pre_attn_scalar=32.0, d_ff=192, max_seq_len=256,
                                 sliding_window=16)
    return {
        "llama": llama,
        "llama-plain": dataclasses.replace(llama, rope_scaling=None, tie_embeddings=True),
        "qwen2": dataclasses.replace(llama, rope_scaling=None, qkv_bias=True, tie_embeddings=True),
        "qwen3": get_preset("tiny-qwen3"),  # head_dim 32 != d_model / n_heads
        "qwen3-hd": dataclasses.replace(get_preset("tiny-qwen3"), head_dim=128),
        "gemma3": get_preset("tiny-gemma3"),  # 5:1 sliding window 16, linear RoPE scaling on global layers
        "gemma2": gemma2,  # 1:1 sliding window 16, attention and final soft-caps
        "olmo2": get_preset("tiny-olmo2"),  # norms after attention / MLP, full-width Q/K norms
        "gemma2-hd": dataclasses.replace(gemma2, head_dim=256, query_pre_attn_scalar=256.0),
        # what transformers' GGUF loader can express (it takes head_dim, Gemma's query scale and the
        # RoPE scaling from its config defaults, not from the file): head_dim 128 / 256, no scaling
        "gemma3-hd": dataclasses.replace(get_preset("tiny-gemma3"), head_dim=256, query_pre_attn_scalar=256.0,
                                         rope_scaling=None, n_layers=2),
        "gpt2": get_preset("tiny-gpt2"),  # LayerNorm with biases, learned positions, fused q|k|v in the file
        "mixtral": get_preset("tiny-mixtral"),  # llama architecture with 4 experts
        # Falcon-40B's block (two LayerNorms in parallel, grouped K/V, exact GELU), fused q|k|v in the
        # file; Falcon-7B's (one LayerNorm, multi-query)
        "falcon": get_preset("tiny-falcon"),
        "falcon-7b": dataclasses.replace(get_preset("tiny-falcon"), norm_placement="parallel", n_kv_heads=1),
        "qwen3moe": get_preset("tiny-qwen3-moe"),
        # MLA (q LoRA, YaRN with DeepSeek's mscale), a leading dense layer, shared expert, sigmoid
        # routing with a selection bias, 4 groups of which 2 are kept, routed scaling 2.5
        "deepseek3": get_preset("tiny-deepseek"),
        "deepseek2": dataclasses.replace(get_preset("tiny-deepseek"), router="softmax", router_bias=False,
                                         norm_topk_prob=False, n_expert_groups=1, topk_groups=1,
                                         routed_scaling_factor=1.0, rope_scaling=None),  # V2's routing
        # transformers' GGUF loader takes GPT-2's position count and Qwen3-MoE's expert width from defaults
        "gpt2-hf": dataclasses.replace(get_preset("tiny-gpt2"), max_seq_len=1024),
        "qwen3moe-hf": dataclasses.replace(get_preset("tiny-qwen3-moe"), moe_d_ff=768),
        # Mamba's selective state space (llama.cpp's mamba: ssm_a = -exp(A_log), squeezed conv filters)
        "mamba": dataclasses.replace(get_preset("mamba-130m"), vocab_size=512, d_model=64, n_layers=2, mamba_d_state=8,
                                     mamba_dt_rank=4, max_seq_len=256),
    }[name]


def random_model(name: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(_config(name)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norms and biases away from their 1 / 0 init
                p.add_(0.2 * torch.randn_like(p))
    return model


def tokenizer_for(name: str, bpe, spm) -> Tokenizer:
    return spm if name.startswith("gemma") else bpe


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)


IDS = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(0))  # longer than the window


# ----------------------------------------------------------------------------------------------
# evolm -> GGUF -> evolm
# ----------------------------------------------------------------------------------------------
FAMILIES = ["llama", "qwen2", "qwen3", "gemma3", "gemma2", "olmo2", "gpt2", "mixtral", "qwen3moe", "deepseek3",
            "deepseek2", "falcon", "falcon-7b", "mamba"]


@pytest.mark.parametrize("name", FAMILIES)
def test_f32_round_trip_is_exact(name, bpe, spm, tmp_path, one_thread):
    model, tok = random_model(name), tokenizer_for(name, bpe, spm)
    path = export_gguf(model, tmp_path / "m.gguf", tok, "f32")
    back, tok2 = load_gguf(path)
    assert torch.equal(logits(back, IDS), logits(model, IDS))
    ids = tok.encode(SAMPLE)
    assert tok2.encode(SAMPLE) == ids and tok2.decode(ids) == tok.decode(ids)
    chat = [{"role": "user", "content": "hi"}]
    assert tok2.apply_chat_template(chat) == tok.apply_chat_template(chat)
    assert (tok2.bos_id, tok2.eos_id, tok2.add_bos, tok2.eos_ids) == (tok.bos_id, tok.eos_id, tok.add_bos, tok.eos_ids)


@pytest.mark.parametrize("qtype,dtype", [("f16", torch.float16), ("bf16", torch.bfloat16)])
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_half_types_round_only_the_matrices(name, qtype, dtype, bpe, spm, tmp_path, one_thread):
    """f16 / bf16: the logits of the model whose 2-D weights are rounded to the type, bit for bit."""
    model = random_model(name)
    path = export_gguf(model, tmp_path / "m.gguf", tokenizer_for(name, bpe, spm), qtype)
    assert {t.ggml_type for t in GGUFFile(path).tensors.values()} == {Q.F32, Q[qtype.upper()]}
    back, _ = load_gguf(path)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.copy_(p.to(dtype).float())
    assert torch.equal(logits(back, IDS), logits(model, IDS))


@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"])
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_quantized_weights_are_the_gguf_quantizer_s(name, qtype, bpe, spm, tmp_path, one_thread):
    model, tok = random_model(name), tokenizer_for(name, bpe, spm)
    path = export_gguf(model, tmp_path / "q.gguf", tok, qtype)
    meta, tensors = gguf_plan(model, tok)
    f, head = GGUFFile(path), "output.weight" if "output.weight" in tensors else "token_embd.weight"
    kinds = {n: Q.F32 if t.ndim < 2 or n == "rope_freqs.weight" else Q.Q8_0 if n == head else Q[qtype.upper()]
             for n, t in tensors.items()}  # the head (rows of 64: no Q6_K) stays 8-bit, as llama-quantize keeps it
    assert kinds == tensor_types({n: tuple(t.shape) for n, t in tensors.items()}, qtype, model.config.n_layers)
    for name_, t in tensors.items():  # the file: the reference quantizer's bytes, block for block
        kind = kinds[name_]
        want = t.numpy() if kind == Q.F32 else gguf.quants.quantize(t.numpy(), kind)
        assert f.tensors[name_].ggml_type == kind, name_
        assert np.array_equal(np.asarray(f.raw(name_)).reshape(-1), want.view(np.uint8).reshape(-1)), name_
    # evolm's reading: the reference quantize -> dequantize, in our names and conventions
    rebuilt = {n: t if kinds[n] == Q.F32 else
               torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(t.numpy(), kinds[n]), kinds[n]))
               for n, t in tensors.items()}
    ref, _ = load_gguf(write_gguf(tmp_path / "ref.gguf", meta, rebuilt, "f32"))
    got, _ = load_gguf(path)
    want_sd = ref.state_dict()
    for k, v in got.state_dict().items():
        assert torch.equal(v, want_sd[k]), k
    assert torch.equal(logits(got, IDS), logits(ref, IDS))


def test_quantization_falls_back_to_f16_for_rows_not_in_blocks(bpe, tmp_path):
    model = Transformer(dataclasses.replace(_config("llama-plain"), d_ff=200)).eval()  # 200 % 32 != 0
    f = GGUFFile(export_gguf(model, tmp_path / "q.gguf", bpe, "q8_0"))
    assert f.tensors["blk.0.ffn_down.weight"].ggml_type == Q.F16  # rows of 200
    assert f.tensors["blk.0.ffn_up.weight"].ggml_type == Q.Q8_0  # rows of 96
    assert f.metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0


def test_llama_rows_are_permuted_and_gemma_norms_offset(bpe, spm):
    """llama.cpp's conventions: Q/K rows interleaved per head for the Llama architecture only,
    Gemma's norm weights stored as 1 + w."""
    from evolm.interop.gguf import unpermute_rope_rows

    llama = random_model("llama")
    _, t = gguf_plan(llama, bpe)
    q = llama.layers[0].self_attn.q_proj.weight
    assert not torch.equal(t["blk.0.attn_q.weight"], q)
    assert torch.equal(unpermute_rope_rows(t["blk.0.attn_q.weight"], llama.config.n_heads), q)
    assert "rope_freqs.weight" in t and "output.weight" in t
    qwen = random_model("qwen3")
    _, t = gguf_plan(qwen, bpe)
    assert torch.equal(t["blk.0.attn_q.weight"], qwen.layers[0].self_attn.q_proj.weight)
    assert "output.weight" not in t  # tied: llama.cpp reuses token_embd
    gemma = random_model("gemma3")
    _, t = gguf_plan(gemma, spm)
    assert torch.equal(t["blk.0.post_attention_norm.weight"], gemma.layers[0].attn_out_norm.weight + 1)


# ----------------------------------------------------------------------------------------------
# transformers reads the file (its own GGUF loader: an independent reader of our conventions)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,qtype", [("llama-plain", "f32"), ("llama-plain", "q8_0"), ("qwen2", "f32"),
                                        ("qwen3-hd", "f32"), ("gemma3-hd", "f32"), ("gemma2-hd", "f32"),
                                        ("gpt2-hf", "f32"), ("qwen3moe-hf", "f32")])
def test_transformers_loads_the_export(name, qtype, bpe, spm, tmp_path, one_thread):
    transformers = pytest.importorskip("transformers")
    model, tok = random_model(name), tokenizer_for(name, bpe, spm)
    path = export_gguf(model, tmp_path / "m.gguf", tok, qtype)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    ours, _ = load_gguf(path)  # for q8_0: the same dequantized weights
    with torch.no_grad():
        diff = (hf.eval()(IDS).logits - logits(ours, IDS)).abs().max().item()
    assert diff < 1e-4, diff
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert hf_tok(SAMPLE)["input_ids"] == tok.encode(SAMPLE)


# ----------------------------------------------------------------------------------------------
# a real model: SmolLM2-135M-Instruct's GGUF, re-exported
# ----------------------------------------------------------------------------------------------
def _real(name: str):
    try:
        return find_asset(name)
    except FileNotFoundError as e:
        pytest.skip(f"missing asset (optional): {e}")


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(source file, model, tokenizer, its f32 re-export): loaded and written once for the tests below."""
    src = _real("smollm2")
    model, tok = load_gguf(src)
    return src, model, tok, export_gguf(model, tmp_path_factory.mktemp("smol") / "smol.gguf", tok, "f32")


def test_real_smollm2_re_export_round_trips(smollm2, one_thread):
    src, model, tok, path = smollm2
    back, tok2 = load_gguf(path)
    ids = torch.tensor([tok.encode("The capital of France is")])
    assert torch.equal(logits(back, ids), logits(model, ids))
    old, new = GGUFFile(src).metadata, GGUFFile(path).metadata
    for key in ("tokens", "token_type", "merges", "bos_token_id", "eos_token_id", "unknown_token_id",
                "padding_token_id", "add_bos_token", "model"):
        assert new[f"tokenizer.ggml.{key}"] == old[f"tokenizer.ggml.{key}"], key
    assert new["tokenizer.chat_template"] == old["tokenizer.chat_template"]
    for key in ("block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "rope.freq_base", "rope.dimension_count", "vocab_size"):
        assert new[f"llama.{key}"] == old[f"llama.{key}"], key
    # evolm reads SmolLM2's vocabulary with GPT-2's split pattern; the export names what it runs
    assert new["tokenizer.ggml.pre"] == "gpt-2" and tok2.encode(SAMPLE) == tok.encode(SAMPLE)


# ----------------------------------------------------------------------------------------------
# what cannot be exported
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("base,change,msg", [
    ("mixtral", dict(sliding_window=8), "a mixtral model that llama.cpp's llama cannot run: sliding_window is 8 "
                                        "but the llama architecture has no window"),
    ("mixtral", dict(n_experts=0, sliding_window=8), "a mistral model that llama.cpp's llama cannot run"),
    ("deepseek3", dict(q_lora_rank=None), "a deepseek_v3 model that llama.cpp's deepseek2 cannot run: q_lora_rank "
                                          "is None with n_layers 3"),
    ("deepseek3", dict(topk_groups=4), "topk_groups 4 must be below n_expert_groups 4"),
    ("falcon", dict(norm_placement="pre", n_kv_heads=1), "llama.cpp's falcon always runs attention and MLP in parallel"),
    ("falcon", dict(qkv_bias=True, o_bias=True, mlp_bias=True), "llama.cpp's falcon loads no bias"),
    # llama.cpp's falcon runs the tanh GELU, but a falcon GGUF stands for the model it was converted
    # from (the exact GELU): a tanh-GELU model would read back as another model
    ("falcon", dict(activation="gelu_tanh"), "field 'activation' is 'gelu_tanh' but a falcon GGUF gives 'gelu'")])
def test_what_llama_cpp_cannot_run_is_named(base, change, msg, bpe, tmp_path):
    with pytest.raises(ExportError, match=msg):
        export_gguf(Transformer(dataclasses.replace(_config(base), **change)), tmp_path / "m.gguf", bpe, "f16")
    assert not list(tmp_path.iterdir())


def test_bad_inputs_are_one_line_errors(bpe, spm, tmp_path):
    model = random_model("llama")
    for bad in ("q3_k_m", "iq4_xs", "f64", "Q8_0"):
        with pytest.raises(ExportError, match=f"--type {bad}: expected one of f32, f16"):
            export_gguf(model, tmp_path / "m.gguf", bpe, bad)
    with pytest.raises(ExportError, match="no tokenizer"):
        export_gguf(model, tmp_path / "m.gguf", None, "f16")
    big = train_bpe(iter(TEXT * 10), vocab_size=600, min_frequency=1)
    if len(big) > 512:
        with pytest.raises(ExportError, match=r"tokens but the model only 512 embedding rows"):
            export_gguf(model, tmp_path / "m.gguf", big, "f16")
    # llama.cpp hard-codes Gemma 3's query scale (1/sqrt(head_dim)) and local RoPE base
    odd = Transformer(dataclasses.replace(_config("gemma3"), query_pre_attn_scalar=20.0))
    with pytest.raises(ExportError, match=r"field 'query_pre_attn_scalar' is 20.0 but a gemma3 GGUF gives 32.0"):
        export_gguf(odd, tmp_path / "m.gguf", spm, "f16")
    odd = Transformer(dataclasses.replace(_config("gemma3"), rope_local_theta=5000.0))
    with pytest.raises(ExportError, match=r"field 'rope_local_theta' is 5000.0"):
        export_gguf(odd, tmp_path / "m.gguf", spm, "f16")
    assert not list(tmp_path.iterdir())


def test_cli_convert_to_gguf(bpe, tmp_path, capsys):
    from evolm.cli import main
    from evolm.loading import load, save

    model = random_model("llama-plain")
    save(model, tmp_path / "run", tokenizer=bpe)
    out = tmp_path / "m-q8_0.gguf"
    assert main(["convert", "--model", str(tmp_path / "run"), "--to", "gguf", "--type", "q8_0", "--out", str(out)]) == 0
    back, tok = load(out)
    assert GGUFFile(out).tensors["blk.0.attn_q.weight"].ggml_type == Q.Q8_0
    assert (logits(back, IDS) - logits(model, IDS)).abs().max() < 0.05 and tok.encode(SAMPLE) == bpe.encode(SAMPLE)
    for argv, msg in ((["--to", "gguf", "--type", "q3_k"], "--type q3_k: expected one of"),
                      (["--to", "hf", "--type", "q8_0"], "--type q8_0: only for --to gguf"),
                      (["--to", "gguf", "--out", str(tmp_path / "dir")], "a GGUF export is one file")):
        argv = ["convert", "--model", str(tmp_path / "run"), *argv]
        if "--out" not in argv:
            argv += ["--out", str(tmp_path / "x.gguf")]
        with pytest.raises(SystemExit):
            main(argv)
        assert msg in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# llama.cpp runs the file (llama-cpp-python: `make bench-deps`)
# ----------------------------------------------------------------------------------------------
def _llama_cpp():
    try:
        import llama_cpp
    except ImportError as e:
        pytest.skip(f"llama.cpp not installed (`make bench-deps` builds llama-cpp-python): {e}")
    return llama_cpp


def greedy_llama_cpp(path, prompt_ids: list[int], n: int) -> list[int]:
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, n_batch=64, verbose=False, seed=0)
    out = []
    for tok in llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out


def greedy_evolm(model, prompt_ids: list[int], n: int) -> list[int]:
    from evolm.infer.decode import generate
    from evolm.infer.sampling import SamplingParams

    return generate(model, [prompt_ids], SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True))[0]


def test_llama_cpp_greedy_text_equals_evolm_smollm2(smollm2, one_thread):
    _llama_cpp()
    _, model, tok, path = smollm2
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    ids = tok.encode(prompt, add_special_tokens=False)
    want = greedy_evolm(model, ids, 16)
    assert tok.decode(greedy_llama_cpp(path, ids, 16)) == tok.decode(want)


def test_llama_cpp_greedy_text_equals_evolm_trained_tiny(bpe, tmp_path, one_thread):
    """A tiny Llama trained to recite a line (confident logits, so greedy ties cannot flip), exported f32 and q8_0."""
    _llama_cpp()
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(_config("llama-plain"), vocab_size=320))
    ids = torch.tensor([bpe.encode(" ".join(TEXT[:3]) * 2)])[:, :96]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss = torch.nn.functional.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[0, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    prompt = ids[0, :8].tolist()
    want = greedy_evolm(model, prompt, 24)
    for qtype in ("f32", "q8_0"):
        path = export_gguf(model, tmp_path / f"tiny-{qtype}.gguf", bpe, qtype)
        assert bpe.decode(greedy_llama_cpp(path, prompt, 24)) == bpe.decode(want), qtype


def logits_llama_cpp(path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of ``ids`` (one thread, one batch)."""
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=1, n_batch=64, verbose=False, logits_all=True)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)])


@pytest.mark.parametrize("name", FAMILIES)
def test_llama_cpp_logits_and_greedy_text_equal_evolm(name, bpe, spm, tmp_path, one_thread):
    """Every family's f32 file in llama.cpp: its own implementation of the architecture (MoE routing,
    MLA with absorbed kv_b, GPT-2's fused q|k|v, windows, soft-caps) gives evolm's logits to float
    rounding, and the same greedy tokens."""
    _llama_cpp()
    model, tok = random_model(name), tokenizer_for(name, bpe, spm)
    path = export_gguf(model, tmp_path / "m.gguf", tok, "f32")
    ids = IDS[0].tolist()
    want = logits(model, torch.tensor([ids]))[0].numpy()
    got = logits_llama_cpp(path, ids)
    assert np.abs(got - want).max() < 2e-3 * max(1.0, np.abs(want).max()), np.abs(got - want).max()
    assert greedy_llama_cpp(path, ids[:12], 16) == greedy_evolm(model, ids[:12], 16)
