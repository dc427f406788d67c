"""GPTQ against its paper: beats round-to-nearest on the layer's outputs, equals a direct Optimal
Brain Surgeon reference (inverse Hessian downdated column by column, no Cholesky, no lazy batches),
and is round-to-nearest when the Hessian is the identity."""

import pytest
import torch

from evolm.quant.calibration import CalibrationError
from evolm.quant.gptq import GPTQConfig, HessianSum, check_calibration, gptq_quantize
from evolm.quant.int4 import group_params, quantize_groups, round_to_grid


def _layer(n=48, k=128, tokens=512, seed=0, dtype=torch.float32):
    """A random layer and correlated random inputs (mixed, with uneven scales), so that H is far
    from diagonal and error feedback has something to do."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g, dtype=dtype)
    mix = torch.randn(k, k, generator=g, dtype=dtype) / k ** 0.5 + torch.eye(k, dtype=dtype)
    X = (torch.randn(tokens, k, generator=g, dtype=dtype) * torch.linspace(0.2, 3, k, dtype=dtype)) @ mix
    acc = HessianSum(k)
    acc.add(X)
    return W, X, acc.value().to(dtype)


def _dequant(q, scale, lo, group):
    return q.to(scale.dtype) * scale.repeat_interleave(group, 1) + lo.repeat_interleave(group, 1)


def _obs_reference(W, H, group, damp=0.01, order=None):
    """The paper's quantization step written out: for each column q (in ``order``) with the current
    inverse Hessian Hinv of the columns left, w_q -> quant(w_q), the remaining columns move by
    -(w_q - quant(w_q)) / Hinv_qq * Hinv_{:,q} (eq. 2 of GPTQ / OBS), then Hinv drops q by
    Gaussian elimination (eq. 3). Grids: static per contiguous group from the original weights
    when an order is given (act-order), else taken from the current weights at a group's start."""
    W, H = W.double().clone(), H.double().clone()
    N, K = W.shape
    H += damp * H.diagonal().mean() * torch.eye(K, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    order = list(range(K)) if order is None else order
    static = order != list(range(K))
    scale, lo = group_params(W.reshape(N, K // group, group), torch.float16)
    codes = torch.zeros(N, K, dtype=torch.int32)
    for q_col in order:
        if not static and q_col % group == 0:
            scale[:, q_col // group], lo[:, q_col // group] = group_params(W[:, q_col:q_col + group], torch.float16)
        s, m = scale[:, q_col // group], lo[:, q_col // group]
        codes[:, q_col] = round_to_grid(W[:, q_col], s, m)
        err = (W[:, q_col] - (codes[:, q_col] * s + m)) / Hinv[q_col, q_col]
        W -= err[:, None] * Hinv[q_col][None, :]
        Hinv -= Hinv[:, q_col:q_col + 1] @ Hinv[q_col:q_col + 1, :] / Hinv[q_col, q_col]
    return codes, scale, lo


def test_gptq_layer_output_error_is_below_round_to_nearest():
    W, X, H = _layer()
    rtn = _dequant(*quantize_groups(W, 32, torch.float16), 32)
    gptq = _dequant(*gptq_quantize(W, H, GPTQConfig(group_size=32)), 32)
    err_rtn, err_gptq = ((W - rtn) @ X.t()).norm(), ((W - gptq) @ X.t()).norm()
    assert err_gptq < 0.8 * err_rtn, (float(err_gptq), float(err_rtn))
    ordered = _dequant(*gptq_quantize(W, H, GPTQConfig(group_size=32, act_order=True)), 32)
    assert ((W - ordered) @ X.t()).norm() < 0.8 * err_rtn


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group,block", [(32, 128), (32, 48), (64, 32)])
def test_gptq_equals_the_direct_obs_reference(group, block, act_order):
    """Lazy batches (blocks of ``block`` columns, rounded up to whole groups) and the Cholesky form
    give the same codes and grids as the column-by-column OBS update with inverse downdates."""
    W, _, H = _layer(dtype=torch.float64)
    cfg = GPTQConfig(group_size=group, block_size=block, act_order=act_order)
    q, scale, lo = gptq_quantize(W, H, cfg)
    order = torch.argsort(H.diagonal(), descending=True).tolist() if act_order else None
    q_ref, scale_ref, lo_ref = _obs_reference(W, H, group, order=order)
    assert (q == q_ref).float().mean() > 0.999  # a tie at a rounding boundary may fall either way
    torch.testing.assert_close(scale, scale_ref.float(), rtol=1e-3, atol=1e-6)
    torch.testing.assert_close(lo, lo_ref.float(), rtol=1e-3, atol=1e-6)


def test_gptq_with_an_identity_hessian_is_round_to_nearest():
    W, _, _ = _layer()
    q, scale, lo = gptq_quantize(W, torch.eye(W.shape[1]), GPTQConfig(group_size=32))
    q_rtn, scale_rtn, lo_rtn = quantize_groups(W, 32, torch.float16)
    assert torch.equal(q, q_rtn) and torch.equal(scale, scale_rtn) and torch.equal(lo, lo_rtn)


def test_unseen_inputs_round_to_nearest_and_keep_their_weights():
    """An input that is zero on every calibration token has H_jj = 0: its column is rounded to
    nearest (the reference code zeroes it instead, which would be wrong once the input is not zero)."""
    W, X, _ = _layer()
    X[:, 5] = 0
    acc = HessianSum(W.shape[1])
    acc.add(X)
    q, scale, lo = gptq_quantize(W, acc.value(), GPTQConfig(group_size=32))
    col = _dequant(q, scale, lo, 32)[:, 5]
    assert (col - W[:, 5]).abs().max() <= scale[:, 0].max() / 2 + 1e-6


def test_calibration_too_small_for_the_widest_layer_names_the_numbers():
    from evolm import build

    model = build("tiny-llama")
    with pytest.raises(CalibrationError, match=r"100 tokens.*down_proj has 256 inputs"):
        check_calibration(model, 100)
    check_calibration(model, 256)


def test_layers_sharing_a_hessian_are_quantized_as_if_alone():
    """q/k/v (and gate/up) see the same input and are quantized as one stacked matrix: the codes of
    each equal those of quantizing it on its own."""
    from evolm import build
    from evolm.quant.gptq import _block_hessians, _quantize_block

    torch.manual_seed(0)
    model = build("tiny-llama").eval()
    block = model.layers[0]
    xs = [torch.randn(1, 64, model.config.d_model) for _ in range(8)]
    rope = model.rope_tables(torch.arange(64)[None], torch.float32)[0]
    with torch.no_grad():
        hessians = _block_hessians(block, xs, ((rope, None, True, None), {}))
    assert hessians["self_attn.q_proj"] is hessians["self_attn.v_proj"]
    assert hessians["self_attn.o_proj"] is not hessians["mlp.gate_proj"]
    codes = _quantize_block(block, hessians, GPTQConfig())
    for name in ("self_attn.k_proj", "mlp.up_proj"):
        alone = gptq_quantize(block.get_submodule(name).weight, hessians[name].value(), GPTQConfig())
        assert all(torch.equal(a, b) for a, b in zip(codes[name], alone))
