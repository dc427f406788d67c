"""The one loader's pieces: an empty model filled from a state dict, and the inference preparation
(``evolm.infer.prepare``) that generate, chat, serve and eval share."""

import pytest
import torch

from evolm import build
from evolm.infer.prepare import InferenceOptions, prepare
from evolm.interop.empty import assign_weights, build_empty


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-deepseek", "tiny-gemma3"])
def test_empty_model_filled_equals_the_original(preset):
    """build_empty allocates nothing; assign_weights makes the tensors the parameters (no copy) and
    recomputes the RoPE tables, so the logits are the original model's bit for bit."""
    torch.manual_seed(0)
    ref = build(preset).eval()
    empty = build_empty(ref.config)
    assert all(t.is_meta for t in empty.parameters())
    sd = ref.state_dict()
    model = assign_weights(empty, sd, source="test").eval()
    assert model.embed_tokens.weight.data_ptr() == sd["embed_tokens.weight"].data_ptr()
    ids = torch.randint(0, ref.config.vocab_size, (2, 9))
    assert torch.equal(model(ids), ref(ids))


def test_assign_weights_names_what_does_not_match():
    ref = build("tiny-llama")
    sd = ref.state_dict()
    sd.pop("norm.weight")
    with pytest.raises(ValueError, match=r"src: weights do not match config .*norm\.weight"):
        assign_weights(build_empty(ref.config), sd, source="src")
    sd = ref.state_dict()
    sd["norm.weight"] = torch.ones(3)
    with pytest.raises(ValueError, match="src: weights do not fit the config"):
        assign_weights(build_empty(ref.config), sd, source="src")


def test_options_refuse_what_cannot_go_together():
    with pytest.raises(ValueError, match="drop --quantize int8"):
        InferenceOptions(keep_blocks=True, quantize="int8")
    with pytest.raises(ValueError, match="int3"):
        InferenceOptions(quantize="int3")
    assert InferenceOptions(quantize="int4").cpu_only and not InferenceOptions().cpu_only


def test_prepare_is_fuse_then_quantize():
    """prepare = eval mode, fuse_for_inference, then quantize_int4(group 32) (int8: test_cli's
    --fuse --quantize int8 run, which pays the int8 kernel build)."""
    from evolm.quant import quantize_int4

    ids = torch.randint(0, 512, (1, 7))
    torch.manual_seed(0)
    model = build("tiny-llama").train()
    torch.manual_seed(0)
    want = quantize_int4(build("tiny-llama").eval().fuse_for_inference(), group_size=32)
    got = prepare(model, InferenceOptions(fuse=True, quantize="int4"))
    assert not got.training
    assert torch.equal(got(ids), want(ids))


# --- fast by default: choose_path -------------------------------------------------------------
def _choices(options):
    return (options.keep_blocks, options.fuse, options.compile)


def test_the_default_path_for_a_gguf_file_on_cpu_keeps_blocks_and_fuses(tmp_path):
    from evolm.infer.prepare import choose_path

    f = tmp_path / "m.gguf"
    f.write_bytes(b"GGUF" + bytes(20))  # the choice reads only the magic
    options, why = choose_path(f, InferenceOptions(device="cpu"))
    assert _choices(options) == (True, True, False) and options.chosen and options.device == "cpu"
    assert why[0] == "device: cpu (asked)" and why[1].startswith("keep_blocks: on (GGUF on the CPU")
    # what the caller sets is kept and said so; --quantize rules blocks out; --no-fast turns all off
    options, why = choose_path(f, InferenceOptions(device="cpu", fuse=False, compile=True))
    assert _choices(options) == (True, False, True) and "fuse: off (set by the caller)" in why
    assert choose_path(f, InferenceOptions(quantize="int8"))[0].keep_blocks is False
    options, why = choose_path(f, InferenceOptions(fast=False))
    assert _choices(options) == (False, False, False) and all("--no-fast" in w for w in why[1:])


def test_the_default_path_for_a_dense_folder_fuses_without_blocks(tmp_path):
    from evolm.infer.prepare import choose_path, load_for_inference
    from evolm.loading import save
    from evolm.tokenizer import train_bpe

    torch.manual_seed(0)
    model = build("tiny-llama").eval()
    save(model, tmp_path / "m", tokenizer=train_bpe(["hello world"] * 20, vocab_size=300))
    options, why = choose_path(tmp_path / "m")
    assert _choices(options) == (False, True, False) and "not a GGUF file" in why[1]
    fast, _ = load_for_inference(tmp_path / "m")  # the default, through the one preparation
    plain, _ = load_for_inference(tmp_path / "m", InferenceOptions(fast=False))
    assert getattr(fast.layers[0].self_attn, "qkv_proj", None) is not None
    assert getattr(plain.layers[0].self_attn, "qkv_proj", None) is None
    ids = torch.randint(0, 300, (2, 9))
    torch.testing.assert_close(fast(ids), plain(ids), rtol=1e-5, atol=1e-5)
