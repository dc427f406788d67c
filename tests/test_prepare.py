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
