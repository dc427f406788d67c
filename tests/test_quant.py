"""Int8 weight-only quantization: close to the float model, same greedy text on a real model."""

import pytest
import torch

from evolm import build
from evolm.presets import get_preset
from evolm.quant import Int8Linear, quantize_int8


@pytest.mark.parametrize("rows", [1, 5])
def test_int8_linear_is_close_to_the_float_layer(rows):
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    q = Int8Linear(lin.weight, lin.bias)
    x = torch.randn(rows, 64)
    with torch.no_grad():
        want, got = lin(x), q(x)
    rel = (got - want).norm() / want.norm()
    assert rel < 1e-2, rel
    assert q.weight.dtype == torch.int8 and q.weight.numel() == lin.weight.numel()


def test_quantized_model_keeps_its_predictions():
    torch.manual_seed(0)
    model = build(get_preset("tiny-llama")).eval()
    x = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.no_grad():
        want = model(x)
        quantize_int8(model)
        got = model(x)
    assert isinstance(model.layers[0].self_attn.q_proj, Int8Linear)
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    assert ((got - want).norm() / want.norm()) < 2e-2
