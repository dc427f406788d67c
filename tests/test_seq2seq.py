"""Encoder-decoders (T5, T5 v1.1, BART, Switch Transformer) against transformers.

For each family a tiny transformers model is built from a config with seeded random weights
(norm weights and biases pushed off 1/0, relative-position tables and routers spread out),
saved with ``save_pretrained`` and read back with ``evolm.load``. Then, in fp32:
- logits over a batch padded in the encoder (left) and the decoder (right) agree to 1e-4,
  with Switch's expert capacity small enough that tokens are dropped;
- the decoder run token by token over its KV cache and the cached cross-attention gives the
  logits of transformers' full forward, and greedy decoding equals transformers' ``generate``
  (a left-padded batch of 2, 12 new tokens);
- Switch's router z-loss, load-balancing loss and total loss equal transformers' in training mode;
- evolm -> HF folder -> transformers gives the same logits; the presets have transformers'
  parameter counts for the published configs.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import evolm  # noqa: E402
from evolm.analysis.cost import cost_card, cross_kv_cache_bytes  # noqa: E402
from evolm.cache import CrossCache, KVCache  # noqa: E402
from evolm.config import ConfigError, ModelConfig  # noqa: E402
from evolm.infer import SamplingParams, generate  # noqa: E402
from evolm.interop.hf import config_from_hf, config_to_hf, hf_family, save_hf_folder  # noqa: E402
from evolm.nn.moe import MoE, pooled_router_losses  # noqa: E402
from evolm.nn.relative_position import relative_position_bucket  # noqa: E402
from evolm.presets import get_preset  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V = 64
_T5 = dict(vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
           relative_attention_num_buckets=8, relative_attention_max_distance=20, dropout_rate=0.0,
           decoder_start_token_id=0)
_BART = dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=3, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=40,
             dropout=0.0, scale_embedding=True, forced_eos_token_id=None)
# (transformers class prefix, config kwargs, std of the random matrices)
CASES = {
    "t5": ("T5", dict(_T5, feed_forward_proj="relu"), 0.3),
    "t5-v1_1": ("T5", dict(_T5, feed_forward_proj="gated-gelu", tie_word_embeddings=False), 0.6),
    "bart": ("Bart", dict(_BART, tie_word_embeddings=False), 0.2),
    "bart-tied": ("Bart", dict(_BART, scale_embedding=False), 0.1),
    # 4 layers, experts in layers 1 and 3 of each stack, 3 tokens per expert and sequence
    "switch": ("SwitchTransformers", dict(_T5, num_layers=4, num_decoder_layers=4, num_sparse_encoder_layers=2,
                                          num_sparse_decoder_layers=2, num_experts=4, expert_capacity=3,
                                          router_jitter_noise=0.0), 0.3),
}


def hf_model(case: str, symmetric: bool = False):
    """A transformers model of ``case`` with spread-out random weights (``symmetric``: as many decoder
    layers as encoder layers; transformers' generate sizes its cache by the encoder's)."""
    prefix, kw, std = CASES[case]
    kw = dict(kw)
    if symmetric:
        key = "num_decoder_layers" if prefix != "Bart" else "decoder_layers"
        kw[key] = kw.get("num_layers", kw.get("encoder_layers"))
    config = getattr(transformers, f"{prefix}Config")(**kw)
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.normal_(1.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.3)
            elif "relative_attention_bias" in name or "router" in name or "embed_positions" in name:
                p.normal_(0.0, 1.0)
            else:
                p.normal_(0.0, std)
        if prefix == "Bart":
            model.final_logits_bias.normal_(0.0, 0.1)
            # transformers 5 unties the stacks' tables too when the head is untied; evolm shares one
            shared = model.model.shared.weight
            model.model.encoder.embed_tokens.weight = model.model.decoder.embed_tokens.weight = shared
        if not kw.get("tie_word_embeddings", True):  # an own head (transformers 5 ties it at init)
            model.lm_head.weight = torch.nn.Parameter(torch.randn(V, kw["d_model"]) * std)
    return model


def load_both(case: str, tmp_path, symmetric: bool = False):
    hf = hf_model(case, symmetric)
    hf.save_pretrained(tmp_path / case)
    ours, _ = evolm.load(tmp_path / case)
    return hf, ours


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the encoder
    dec = torch.randint(3, V, (2, 7), generator=g)
    dec_mask = torch.ones_like(dec)
    dec_mask[0, 5:] = 0  # right padding in the decoder
    return ids, mask, dec, dec_mask


@pytest.mark.parametrize("case", list(CASES))
def test_forward_logits_match_transformers(case, tmp_path):
    hf, ours = load_both(case, tmp_path)
    ids, mask, dec, dec_mask = batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
        got = ours(ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    real = dec_mask.bool()
    torch.testing.assert_close(got[real], ref[real], rtol=1e-4, atol=1e-4)
    assert ref.std() > 0.1
    if case == "switch":  # the capacity dropped tokens, so the comparison saw it
        ours.train()
        ours(ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
        moe = ours.encoder.layers[1].mlp
        assert (torch.bincount(moe.router_logits.argmax(-1)[0], minlength=4) > moe.capacity).any()


@pytest.mark.parametrize("case", list(CASES))
def test_cached_decoding_matches_transformers(case, tmp_path):
    hf, ours = load_both(case, tmp_path, symmetric=True)
    ids, mask, dec, _ = batch()
    with torch.no_grad():  # transformers' own cached steps (Switch's capacity binds in a full forward only)
        enc = hf.get_encoder()(input_ids=ids, attention_mask=mask)
        out = hf(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec[:, :3], use_cache=True)
        ref = [out.logits]
        for t in range(3, 7):
            out = hf(encoder_outputs=enc, attention_mask=mask, decoder_input_ids=dec[:, t:t + 1],
                     past_key_values=out.past_key_values, use_cache=True)
            ref.append(out.logits)
        ref = torch.cat(ref, 1)
        cross, cache = ours.encode(ids, mask), KVCache.for_model(ours, 2, 16)
        steps = [ours(None, decoder_input_ids=dec[:, :3], cache=cache, cross=cross)]
        steps += [ours(None, decoder_input_ids=dec[:, t:t + 1], cache=cache, cross=cross) for t in range(3, 7)]
    torch.testing.assert_close(torch.cat(steps, 1), ref, rtol=1e-4, atol=1e-4)
    assert cross.nbytes() == cross_kv_cache_bytes(ours.config, ids.shape[1], 4, batch=2)
    want = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                       eos_token_id=None)[:, 1:].tolist()
    got = generate(ours, ids, SamplingParams(max_new_tokens=12, temperature=0), attention_mask=mask)
    assert got == want
    assert any(len(set(row)) > 2 for row in got), "degenerate continuation: the test would not see a cache bug"


def test_switch_router_losses_match_transformers(tmp_path):
    hf, ours = load_both("switch", tmp_path)
    ids, mask, dec, dec_mask = batch()
    labels = torch.randint(3, V, dec.shape, generator=torch.Generator().manual_seed(3))
    hf.train()
    ours.train()
    ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask, labels=labels,
             output_router_logits=True)
    loss = ours(ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask, targets=labels)
    for stack, z, balance in ((ours.encoder, ref.encoder_z_loss, ref.encoder_aux_loss),
                              (ours, ref.decoder_z_loss, ref.decoder_aux_loss)):
        got_z, got_balance = pooled_router_losses([layer.mlp.router_logits for layer in stack.layers
                                                   if isinstance(layer.mlp, MoE)])
        torch.testing.assert_close(got_z, z, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_balance, balance, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss, ref.loss, rtol=1e-5, atol=1e-5)
    loss.backward()  # the router learns from both losses
    assert ours.encoder.layers[1].mlp.gate.weight.grad.abs().sum() > 0


def test_t5_loss_with_targets_matches_transformers(tmp_path):
    hf, ours = load_both("t5", tmp_path)
    ids, mask, dec, dec_mask = batch()
    labels = dec.masked_fill(dec_mask == 0, -100)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask,
                 labels=labels).loss
        got = ours(ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask, targets=labels)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-t5-v1_1", "tiny-bart", "tiny-switch"])
def test_export_loads_in_transformers(name, tmp_path):
    torch.manual_seed(0)
    model = evolm.build(name).eval()
    with torch.no_grad():
        for pname, p in model.named_parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norms off 1, biases off 0
    save_hf_folder(model, tmp_path / name)
    hf = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / name, dtype=torch.float32).eval()
    ids, mask, dec, dec_mask = batch()
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask).logits
        got = model(ids, attention_mask=mask, decoder_input_ids=dec, decoder_attention_mask=dec_mask)
    real = dec_mask.bool()
    torch.testing.assert_close(got[real], ref[real], rtol=1e-4, atol=1e-4)
    assert config_from_hf(json.loads((tmp_path / name / "config.json").read_text())).diff(model.config) == {}


PUBLISHED = {  # preset -> (model_type, the published config.json's keys that differ from the defaults)
    "t5-small": ("t5", {}),
    "t5-base": ("t5", dict(d_model=768, d_ff=3072, num_layers=12, num_heads=12)),
    "t5-large": ("t5", dict(d_model=1024, d_ff=4096, num_layers=24, num_heads=16)),
    "t5-v1_1-small": ("t5", dict(d_ff=1024, num_layers=8, num_heads=6, feed_forward_proj="gated-gelu",
                                 tie_word_embeddings=False)),
    "t5-v1_1-base": ("t5", dict(d_model=768, d_ff=2048, num_layers=12, num_heads=12, feed_forward_proj="gated-gelu",
                                tie_word_embeddings=False)),
    "t5-v1_1-large": ("t5", dict(d_model=1024, d_ff=2816, num_layers=24, num_heads=16,
                                 feed_forward_proj="gated-gelu", tie_word_embeddings=False)),
    "switch-base-8": ("switch_transformers", dict(d_ff=3072, num_sparse_encoder_layers=6, num_sparse_decoder_layers=6)),
    "bart-base": ("bart", dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                               decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072)),
    "bart-large": ("bart", {}),
}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_presets_are_the_published_configs(name):
    """Each preset reads back from the published config.json, and has transformers' parameter count."""
    model_type, kw = PUBLISHED[name]
    preset = get_preset(name)
    hf_config = transformers.AutoConfig.for_model(model_type, **kw)
    got = config_from_hf({**hf_config.to_dict(), "tie_word_embeddings": kw.get("tie_word_embeddings", True)})
    diff = {k: v for k, v in got.diff(preset).items()
            if k not in ("init_std", "resid_dropout", "embd_dropout", "max_seq_len")}
    assert diff == {}, diff
    assert hf_family(preset) == model_type
    with torch.device("meta"):
        hf = transformers.AutoModelForSeq2SeqLM.from_config(hf_config)
    ours = evolm.build(name, device="meta")
    # transformers 5 builds T5 with a tied head whatever the config says (and unties it when a
    # checkpoint's head differs, as v1.1's does): add the head it will hold
    untied = 0 if preset.tie_embeddings else preset.vocab_size * preset.d_model
    assert hf.num_parameters() + untied == preset.meta["params"]
    # BART's logits bias: a buffer in transformers, a parameter of evolm's head
    bias = preset.vocab_size if preset.lm_head_bias else 0
    assert sum(p.numel() for p in ours.parameters()) == preset.meta["params"] + bias
    assert cost_card(preset)["params_total"] == preset.meta["params"] + bias


def test_cost_card_counts_both_stacks():
    c = get_preset("t5-small")
    card, decoder = cost_card(c, context_len=512), cost_card(c.replace(encoder_layers=0), context_len=512)
    assert card["cross_kv_cache_bytes_at_context"] == c.n_layers * 2 * c.n_heads * c.head_dim * 2 * 512
    assert decoder["cross_kv_cache_bytes_at_context"] == 0
    assert card["kv_cache_bytes_at_context"] == decoder["kv_cache_bytes_at_context"]  # the decoder's own
    # the encoder's and cross-attention's weights and attention are counted on top
    enc = cost_card(c.encoder_config(), context_len=512)
    cross = c.n_layers * (4 * c.d_model * c.n_heads * c.head_dim + c.d_model)  # projections and norm
    assert card["flops_params"] == decoder["flops_params"] + enc["flops_params"] - c.vocab_size * c.d_model + cross
    attn = card["forward_flops_per_token"] - 2 * card["flops_params"]
    assert attn == (decoder["forward_flops_per_token"] - 2 * decoder["flops_params"]) \
        + (enc["forward_flops_per_token"] - 2 * enc["flops_params"]) + c.n_layers * 4 * 512 * c.n_heads * c.head_dim


def test_relative_position_buckets_match_transformers():
    T5Attention = transformers.models.t5.modeling_t5.T5Attention
    rel = torch.arange(-300, 300)[None, :] - torch.arange(0, 40)[:, None]
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 20)):
            want = T5Attention._relative_position_bucket(rel, bidirectional, buckets, distance)
            assert torch.equal(relative_position_bucket(rel, bidirectional, buckets, distance), want)


def test_bad_seq2seq_use_is_clear():
    model = evolm.build("tiny-t5")
    ids = torch.randint(0, 512, (1, 5))
    with pytest.raises(ValueError, match="decoder_input_ids"):
        model(ids)
    with pytest.raises(ValueError, match="encoder-decoder"):
        evolm.build("tiny-llama")(ids, decoder_input_ids=ids)
    with pytest.raises(ConfigError, match="encoder_layers"):
        ModelConfig(encoder_layers=-1)
    with pytest.raises(ConfigError, match="expert_capacity"):
        ModelConfig(n_experts=4, n_experts_per_tok=2, expert_capacity=8)
    with pytest.raises(ConfigError, match="cannot be written as llama"):
        config_to_hf(get_preset("tiny-t5"), model_type="llama")
    with pytest.raises(ValueError, match="cross=CrossCache"):
        model.layers[0](torch.zeros(1, 2, 64), None, None, True)
    assert isinstance(model.encode(ids), CrossCache)
    from evolm.lab.flatten import FlattenError, flatten
    with pytest.raises(FlattenError, match="is not covered by a flatten template"):
        flatten(get_preset("tiny-t5"))


def test_evolm_generate_runs_a_seq2seq_folder(tmp_path):
    """`evolm generate` (a subprocess, the default fast paths) on a T5 v1.1 folder with a tokenizer gives
    the eager model's greedy continuation of the prompt read by the encoder."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from evolm.infer import generate_text
    from evolm.loading import save
    from evolm.tokenizer import train_bpe

    root = Path(__file__).resolve().parents[1]
    text = ("def forward(self, x):\n    return self.proj(x) + x\n\nThe encoder reads the whole source; the decoder "
            "writes the target one token at a time, attending to its own past and to every encoder state.\n") * 20
    tok = train_bpe([text], vocab_size=300, special_tokens=["<|endoftext|>"])  # a fixed text: the same vocabulary
    torch.manual_seed(0)
    model = evolm.build(get_preset("tiny-t5-v1_1").replace(vocab_size=300)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.mul_(8.0)  # spread the random weights, so that greedy continuations vary
    save(model, str(tmp_path / "t5"), tokenizer=tok, fmt="hf")
    want = generate_text(model, tok, "def forward", SamplingParams(max_new_tokens=12, temperature=0))
    assert len(set(tok.encode(want))) > 2  # a continuation that varies
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "evolm.cli", "generate", "--model", str(tmp_path / "t5"), "--prompt",
                        "def forward", "--max-new-tokens", "12", "--temperature", "0"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout == want + "\n"


@pytest.mark.parametrize("name", ["tiny-t5", "tiny-bart", "tiny-switch"])
def test_evolm_checkpoint_round_trip(name, tmp_path):
    """evolm's own format keeps both stacks, the shared embedding once and BART's logits bias."""
    from evolm.loading import save

    torch.manual_seed(0)
    model = evolm.build(name).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # BART's head bias off 0
    save(model, str(tmp_path / name), fmt="evolm")
    back, _ = evolm.load(tmp_path / name)
    ids = torch.randint(0, model.config.vocab_size, (2, 7))
    with torch.no_grad():
        assert torch.equal(back(ids, decoder_input_ids=ids[:, :5]), model(ids, decoder_input_ids=ids[:, :5]))
    assert back.config == model.config
