"""Export: an evolm model saved as a Hugging Face folder loads in transformers with the same logits.

Also: the folder reads back into evolm exactly (weights and config), sharded folders work both
ways, saving is atomic, bad folders fail with messages that name the problem, and
``evolm.loading.load`` dispatches HF / evolm / GGUF paths.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import AutoModelForCausalLM  # noqa: E402

from evolm.config import ConfigError, ModelConfig  # noqa: E402
from evolm.interop.empty import WeightsError  # noqa: E402
from evolm.interop.hf import config_from_hf, config_to_hf, hf_family, load_hf_folder, save_hf_folder  # noqa: E402
from evolm.loading import detect_format, load, save  # noqa: E402
from evolm.model import Transformer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V = 128
BASE = dict(vocab_size=V, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, max_seq_len=128,
            norm="rmsnorm", norm_eps=1e-6, pos_emb="rope", mlp="glu", activation="silu", mlp_bias=False,
            qkv_bias=False, o_bias=False, tie_embeddings=False, init_std=0.1)
FALCON = dict(BASE, norm="layernorm", norm_eps=1e-5, norm_bias=True, mlp="mlp", activation="gelu")
CONFIGS = {
    "llama": dict(BASE, rope_theta=5e5, rope_scaling={"type": "llama3", "factor": 8.0, "original_max_seq_len": 64,
                                                      "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    "qwen2": dict(BASE, qkv_bias=True, tie_embeddings=True),
    "qwen3-sliding": dict(BASE, n_layers=3, head_dim=32, qk_norm="head", sliding_window=4, sliding_window_pattern=3),
    "mistral": dict(BASE, sliding_window=5),
    "mixtral": dict(BASE, d_ff=32, n_experts=4, n_experts_per_tok=2, moe_d_ff=32),
    "gemma2": dict(BASE, n_layers=4, head_dim=16, norm_unit_offset=True, embed_scale=True, norm_placement="sandwich",
                   activation="gelu_tanh", query_pre_attn_scalar=24, sliding_window=4, sliding_window_pattern=2,
                   attn_softcap=1.5, final_softcap=3.0, tie_embeddings=True),
    "gemma3": dict(BASE, n_layers=6, head_dim=16, norm_unit_offset=True, embed_scale=True, norm_placement="sandwich",
                   activation="gelu_tanh", qk_norm="head", query_pre_attn_scalar=16, sliding_window=4,
                   sliding_window_pattern=6, rope_theta=1e6, rope_local_theta=1e4,
                   rope_scaling={"type": "linear", "factor": 8.0}, tie_embeddings=True),
    "olmo2": dict(BASE, norm_placement="olmo2", qk_norm="full"),
    "deepseek_v3": dict(BASE, n_layers=3, attention="mla", n_kv_heads=4, q_lora_rank=24, kv_lora_rank=32,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, rope_interleave=True,
                        rope_scaling={"type": "yarn", "factor": 4.0, "original_max_seq_len": 32, "beta_fast": 32,
                                      "beta_slow": 1, "mscale": 0.9, "mscale_all_dim": 1.1},
                        n_experts=8, n_experts_per_tok=2, moe_d_ff=32, n_shared_experts=1, first_k_dense=1,
                        router="sigmoid", router_bias=True, n_expert_groups=4, topk_groups=2,
                        routed_scaling_factor=2.5),
    "deepseek_v2": dict(BASE, n_layers=3, attention="mla", n_kv_heads=4, q_lora_rank=None, kv_lora_rank=32,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, rope_interleave=True,
                        n_experts=8, n_experts_per_tok=3, moe_d_ff=32, n_shared_experts=2, first_k_dense=1,
                        router="softmax", norm_topk_prob=False, n_expert_groups=4, topk_groups=2),
    "qwen3_moe": dict(BASE, n_layers=3, head_dim=32, qk_norm="head", n_experts=4, n_experts_per_tok=2, moe_d_ff=32,
                      norm_topk_prob=False, first_k_dense=1),
    "gemma": dict(BASE, head_dim=16, norm_unit_offset=True, embed_scale=True, activation="gelu_tanh",
                  tie_embeddings=True),
    "gpt2": dict(vocab_size=V, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, qkv_bias=True, o_bias=True,
                 init_std=0.1),
    "gpt1": dict(vocab_size=V, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, qkv_bias=True, o_bias=True,
                 norm_placement="post", final_norm=False, activation="gelu_tanh", tie_embeddings=True, init_std=0.1),
    # Falcon-7B (one norm, parallel, MQA), Falcon-40B (two norms, grouped K/V, biases, linear RoPE
    # scaling), Falcon2-11B (one norm, grouped K/V), parallel_attn=false (pre-norm, MHA)
    "falcon-7b": dict(FALCON, n_kv_heads=1, norm_placement="parallel", tie_embeddings=True),
    "falcon-40b": dict(FALCON, n_kv_heads=2, norm_placement="parallel2", qkv_bias=True, o_bias=True, mlp_bias=True,
                       rope_theta=500.0, rope_scaling={"type": "linear", "factor": 2.0}),
    "falcon2-11b": dict(FALCON, n_kv_heads=2, norm_placement="parallel", activation="gelu_tanh"),
    "falcon-pre": dict(FALCON, n_kv_heads=4, norm_placement="pre"),
    # Llama 4: chunks of 5 on RoPE layers, NoPE + temperature on the 4th, L2 QK-norm, MoE every 2nd layer
    "llama4": dict(BASE, n_layers=4, head_dim=16, rope_interleave=True, qk_norm="l2", nope_layers=(3,),
                   attention_chunk_size=5, sliding_window_pattern=4, attn_temperature_tuning=True,
                   attn_floor_scale=4.0, attn_scale=0.5, n_experts=4, n_experts_per_tok=1, moe_d_ff=48,
                   moe_layer_step=2, n_shared_experts=1, router="sigmoid", norm_topk_prob=False,
                   router_scales_input=True, rope_theta=5e5,
                   rope_scaling={"type": "llama3", "factor": 8.0, "original_max_seq_len": 64,
                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
    # a dense Llama 4 without QK-norm: every other layer NoPE and global
    "llama4-dense": dict(BASE, n_layers=4, rope_interleave=True, nope_layers=(1, 3), attention_chunk_size=4,
                         sliding_window_pattern=2, attn_temperature_tuning=True, attn_floor_scale=3.0),
}
FAMILY = {"falcon-7b": "falcon", "falcon-40b": "falcon", "falcon2-11b": "falcon", "falcon-pre": "falcon",
          "llama": "llama", "qwen2": "qwen2", "qwen3-sliding": "qwen3", "mistral": "mistral", "mixtral": "mixtral",
          "gemma2": "gemma2", "gemma3": "gemma3_text", "olmo2": "olmo2", "deepseek_v3": "deepseek_v3", "gpt2": "gpt2",
          "deepseek_v2": "deepseek_v2", "qwen3_moe": "qwen3_moe", "gemma": "gemma", "gpt1": "openai-gpt",
          "llama4": "llama4_text", "llama4-dense": "llama4_text"}


def random_model(name: str) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(name=name, **CONFIGS[name])).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:  # norms and biases away from their 1 / 0 init
                p.add_(0.2 * torch.randn_like(p))
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))
    return model


def hf_from_folder(folder):
    hf, info = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32,
                                                    output_loading_info=True)
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not bad, f"transformers did not load every weight: {bad}"
    return hf.eval()


def logit_diff(hf, ours, batch_tools) -> float:
    ids, mask, pos = batch_tools.padded_batch(V, [12, 7, 3])
    with torch.no_grad():
        a = hf(input_ids=ids, attention_mask=mask, position_ids=pos).logits
        b = ours(ids, position_ids=pos, attention_mask=mask)
    return batch_tools.max_real_diff(a, b, mask)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_loads_in_transformers(name, tmp_path, batch_tools):
    model = random_model(name)
    assert hf_family(model.config) == FAMILY[name]
    folder = save_hf_folder(model, tmp_path / name)
    assert {"config.json", "generation_config.json", "model.safetensors"} <= {p.name for p in folder.iterdir()}
    diff = logit_diff(hf_from_folder(folder), model, batch_tools)
    assert diff <= 1e-4, f"{name}: transformers vs evolm max |logit diff| {diff:.2e}"
    # ... and reads back into evolm: same config, same logits
    back = load_hf_folder(folder)
    assert back.config.diff(model.config) == {}
    ids = torch.randint(0, V, (2, 9))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))


def test_config_round_trip_through_json():
    for name in CONFIGS:
        c = ModelConfig(name=name, **CONFIGS[name])
        d = json.loads(json.dumps(config_to_hf(c)))
        assert config_from_hf(d).diff(c) == {}, name


def test_token_ids_and_generation_config_travel(tmp_path):
    model = random_model("llama")
    model.config.meta["hf"] = {"bos_token_id": 1, "eos_token_id": [2, 3]}
    folder = save_hf_folder(model, tmp_path / "ids")
    assert json.loads((folder / "config.json").read_text())["eos_token_id"] == [2, 3]
    gen = json.loads((folder / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"]) == (1, [2, 3])
    assert transformers.GenerationConfig.from_pretrained(folder).eos_token_id == [2, 3]
    back = load_hf_folder(folder)
    assert back.config.meta["hf"]["eos_token_id"] == [2, 3]
    assert back.config.meta["generation_config"]["eos_token_id"] == [2, 3]


def test_sharded_folder(tmp_path, batch_tools):
    model = random_model("mixtral")
    folder = save_hf_folder(model, tmp_path / "sharded", max_shard_size=40_000)
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert logit_diff(hf_from_folder(folder), model, batch_tools) <= 1e-4
    back = load_hf_folder(folder)
    ids = torch.randint(0, V, (1, 8))
    with torch.no_grad():
        assert torch.equal(back(ids), model(ids))
    # a folder sharded by transformers itself
    hf_folder = tmp_path / "hf-sharded"
    hf_from_folder(folder).save_pretrained(hf_folder, max_shard_size="40KB")
    assert (hf_folder / "model.safetensors.index.json").is_file()
    with torch.no_grad():
        assert (load_hf_folder(hf_folder)(ids) - model(ids)).abs().max() <= 1e-6


def test_dtype_on_load(tmp_path):
    model = random_model("gemma3")
    folder = save_hf_folder(model, tmp_path / "g")
    bf = load_hf_folder(folder, dtype=torch.bfloat16)
    assert bf.embed_tokens.weight.dtype == torch.bfloat16
    assert bf.rotary.inv_freq.dtype == torch.float32  # RoPE tables stay float32, as in transformers
    assert json.loads((folder / "config.json").read_text())["dtype"] == "float32"


def test_rope_tables_stay_float32_after_cast(tmp_path):
    """model.to(bfloat16) must not round the RoPE frequencies: compare with transformers' bf16 tables."""
    model = random_model("llama")
    folder = save_hf_folder(model, tmp_path / "l")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ours = model.to(torch.bfloat16)
    pos = torch.arange(12000, 12016)[None]
    cos_hf, sin_hf = hf.model.rotary_emb(torch.zeros(1, 16, 64, dtype=torch.bfloat16), pos)
    cos, sin = ours.rotary(pos, torch.bfloat16)
    half = cos.shape[-1]
    assert torch.equal(cos[:, 0], cos_hf[..., :half]) and torch.equal(sin[:, 0], sin_hf[..., :half])


def test_save_is_atomic(tmp_path):
    model = random_model("llama")
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("old")

    class Broken:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_hf_folder(model, dest, tokenizer=Broken())
    assert sorted(p.name for p in dest.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left behind
    save_hf_folder(model, dest)
    assert not (dest / "keep.txt").exists() and (dest / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_export_blockers_are_named():
    c = ModelConfig(**dict(BASE, norm_placement="parallel"))
    with pytest.raises(ConfigError, match="field 'norm_placement' is 'parallel'"):
        config_to_hf(c)
    mixed = ModelConfig(**dict(BASE, attention="mla", n_kv_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
                               qk_rope_head_dim=8, v_head_dim=8, sliding_window=8))
    with pytest.raises(ConfigError, match="cannot be written as a Hugging Face model.*sliding_window"):
        save_hf_folder(Transformer(mixed), "/nonexistent/never-written")
    with pytest.raises(ConfigError, match="cannot be written as falcon.*'n_kv_heads' is 2 but falcon needs 1 or n_heads"):
        config_to_hf(ModelConfig(**dict(CONFIGS["falcon-pre"], n_kv_heads=2)), model_type="falcon")
    with pytest.raises(ConfigError, match="cannot be written as llama.*qk_norm"):
        config_to_hf(ModelConfig(**dict(BASE, qk_norm="head")), model_type="llama")


def test_bad_folders_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_hf_folder(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_folder(empty)
    folder = save_hf_folder(random_model("llama"), tmp_path / "ok")
    cfg = json.loads((folder / "config.json").read_text())

    (folder / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        load_hf_folder(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "model_type": "xlnet"}))
    with pytest.raises(ConfigError, match="config.json: model_type 'xlnet' is not supported"):
        load_hf_folder(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(WeightsError, match="asks for 3 layers but the weights hold 2"):  # before building
        load_hf_folder(folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "hidden_size": 32, "head_dim": 8}))
    with pytest.raises(ValueError, match="size mismatch"):
        load_hf_folder(folder)
    (folder / "config.json").write_text(json.dumps(cfg))

    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="model.safetensors: cannot read safetensors file"):
        load_hf_folder(folder)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
        load_hf_folder(folder)
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        load_hf_folder(folder)

    sharded = save_hf_folder(random_model("llama"), tmp_path / "sh", max_shard_size=40_000)
    next(sharded.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(FileNotFoundError, match="lists shards that are missing: \\['model-00002-of"):
        load_hf_folder(sharded)


# --------------------------------------------------------------------------------------------
def test_load_dispatches_hf_and_evolm_folders(tmp_path):
    model = random_model("gemma3")
    hf_dir = save_hf_folder(model, tmp_path / "hf")
    assert detect_format(hf_dir) == "hf"
    loaded, tok = load(hf_dir)
    assert tok is None  # no tokenizer.json in the folder
    ids = torch.randint(0, V, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(ids), model(ids))

    # a config no Hugging Face family expresses still round-trips through evolm's own folder
    mixed = Transformer(ModelConfig(**dict(BASE, attention="mla", n_kv_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
                                           qk_rope_head_dim=8, v_head_dim=8, sliding_window=4,
                                           sliding_window_pattern=2, norm_placement="olmo2", n_experts=4,
                                           n_experts_per_tok=2, moe_d_ff=32))).eval()
    ev_dir = save(mixed, tmp_path / "evolm")
    assert detect_format(ev_dir) == "evolm"
    back, _ = load(ev_dir, dtype=torch.float32)
    assert back.config.diff(mixed.config) == {}
    with torch.no_grad():
        assert torch.equal(back(ids), mixed(ids))


def test_load_saves_and_reads_tokenizer(tmp_path):
    tokenizer_mod = pytest.importorskip("evolm.tokenizer")
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    raw = RawTokenizer(WordLevel({"<unk>": 0, "hello": 1, "world": 2}, unk_token="<unk>"))
    raw.pre_tokenizer = Whitespace()
    folder = tmp_path / "raw"
    folder.mkdir()
    raw.save(str(folder / "tokenizer.json"))
    tok = tokenizer_mod.Tokenizer.from_hf_dir(folder)
    out = save_hf_folder(random_model("llama"), tmp_path / "with-tok", tokenizer=tok)
    model, tok2 = load(out)
    assert tok2 is not None and tok2.encode("hello world", add_special_tokens=False) == [1, 2]
    ev = save(model, tmp_path / "ev-tok", tokenizer=tok2)
    assert load(ev)[1].encode("world hello", add_special_tokens=False) == [2, 1]
    hf_dir = save(load(ev)[0], tmp_path / "hf-tok", tokenizer=tok2, fmt="hf")  # what `evolm convert --to hf` does
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    assert hf_tok("hello world", add_special_tokens=False)["input_ids"] == [1, 2]
    assert detect_format(hf_dir) == "hf"


def test_detect_format_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        detect_format(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ValueError, match="not a model file"):
        detect_format(tmp_path / "notes.txt")
    (tmp_path / "fake.gguf").write_bytes(b"nope")
    with pytest.raises(ValueError, match="not a GGUF file"):
        detect_format(tmp_path / "fake.gguf")
    (tmp_path / "real.bin").write_bytes(b"GGUF" + b"\0" * 20)
    assert detect_format(tmp_path / "real.bin") == "gguf"
    d = tmp_path / "dir"
    d.mkdir()
    (d / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="no config.json"):
        detect_format(d)


def test_presets_round_trip_through_hf_configs():
    """Every published preset a transformers family can express maps to that family and back unchanged."""
    presets = pytest.importorskip("evolm.presets")
    want = {"gpt2": "gpt2", "llama-4": "llama4_text", "llama-3.2-11b-vision": "mllama", "llama": "llama", "smollm2": "llama", "mistral": "mistral",
            "mixtral": "mixtral", "gemma-2": "gemma2", "gemma-3": "gemma3_text", "olmo-2": "olmo2", "qwen3-30b": "qwen3_moe",
            "qwen3": "qwen3", "deepseek-v2": "deepseek_v2", "deepseek-v3": "deepseek_v3", "bert": "bert",
            "roberta": "roberta", "modernbert": "modernbert"}
    checked = 0
    for name in presets.list_presets():
        family = next((f for prefix, f in want.items() if name.startswith(prefix)), None)
        if family is None:
            continue
        c = presets.get_preset(name)
        assert hf_family(c) == family, name
        assert config_from_hf(json.loads(json.dumps(config_to_hf(c)))).diff(c) == {}, name
        checked += 1
    assert checked >= 30


@pytest.mark.slow
def test_real_gguf_converts_to_a_transformers_folder(tmp_path):
    """`evolm convert --to hf` on a real checkpoint: SmolLM2-135M-Instruct from its GGUF file."""
    gguf = pytest.importorskip("evolm.interop.gguf")
    try:
        path = gguf.find_asset("smollm2")
    except FileNotFoundError as e:
        pytest.skip(f"real GGUF not installed ({e})")
    model, tok = load(path)
    out = save(model, tmp_path / "smollm2-hf", tokenizer=tok, fmt="hf")
    hf = hf_from_folder(out)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "The capital of France is Paris.\nfor i in range(10):\n    print(i)  # 🤖"
    ids = tok.encode(text)
    assert hf_tok(text)["input_ids"] == ids
    assert hf_tok.chat_template == tok.chat_template
    x = torch.tensor([ids])
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max().item() <= 1e-4
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id in (tok.eos_id, tok.eos_ids)


def test_gpt1_preset_writes_the_published_config():
    """The gpt1 preset is exactly openai-community/openai-gpt's config.json (the size and shape keys)."""
    from evolm.presets import get_preset

    h = config_to_hf(get_preset("gpt1"))
    published = dict(model_type="openai-gpt", vocab_size=40478, n_positions=512, n_embd=768, n_layer=12, n_head=12,
                     afn="gelu", layer_norm_epsilon=1e-5, tie_word_embeddings=True)
    assert {k: h[k] for k in published} == published
    assert config_from_hf(h).diff(get_preset("gpt1")).keys() <= {"name", "meta", "init_std", "attn_dropout",
                                                                  "resid_dropout", "embd_dropout"}


@pytest.mark.parametrize("name", ["falcon-7b", "falcon-40b"])
def test_falcon_presets_write_the_published_config(name):
    """The falcon presets are tiiuae/falcon-7b's and tiiuae/falcon-40b's config.json (their size and wiring keys)."""
    from evolm.presets import get_preset

    published = {"falcon-7b": dict(hidden_size=4544, num_hidden_layers=32, num_attention_heads=71, multi_query=True,
                                   new_decoder_architecture=False),
                 "falcon-40b": dict(hidden_size=8192, num_hidden_layers=60, num_attention_heads=128, num_kv_heads=8,
                                    new_decoder_architecture=True)}[name]
    published.update(model_type="falcon", vocab_size=65024, parallel_attn=True, bias=False, alibi=False,
                     layer_norm_epsilon=1e-5, tie_word_embeddings=True)
    h = config_to_hf(get_preset(name))
    assert {k: h[k] for k in published} == published
    assert config_from_hf(h).diff(get_preset(name)).keys() <= {"name", "meta", "init_std"}
