"""`evolm prune` (magnitude, Wanda, SparseGPT) against the papers' formulas written out here: exact
sparsity and n:m patterns, Wanda's per-row argsort of |W|·‖X‖, SparseGPT equal to a direct Optimal
Brain Surgeon reference (inverse Hessian downdated column by column, no Cholesky, no lazy batches)
and below the other two on the layer's output error, magnitude's mask from an identity Hessian;
a pruned model round-trips through its folder; the CLI's errors are one line."""

import json
from pathlib import Path

import pytest
import torch

from evolm import build
from evolm.cli import main
from evolm.loading import load, save
from evolm.presets import get_preset
from evolm.prune import PruneConfig, PruneError, SparseGPTConfig, Sparsity, prune_model, sparsegpt_prune
from evolm.prune.wanda import input_norms, magnitude_mask, wanda_mask
from evolm.quant.gptq import HessianSum

ROOT = Path(__file__).resolve().parents[1]
HALF, TWO_FOUR = Sparsity(0.5), Sparsity.parse(pattern="2:4")


def _layer(n=32, k=72, tokens=400, seed=0, dtype=torch.float32):
    """A random layer and correlated inputs (mixed, uneven scales), so H is far from diagonal."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, k, generator=g, dtype=dtype)
    mix = torch.randn(k, k, generator=g, dtype=dtype) / k ** 0.5 + torch.eye(k, dtype=dtype)
    X = (torch.randn(tokens, k, generator=g, dtype=dtype) * torch.linspace(0.2, 3, k, dtype=dtype)) @ mix
    acc = HessianSum(k)
    acc.add(X)
    return W, X, acc


def _direct_magnitude(W, fraction):
    """Han et al.: the floor(fraction * size) smallest |W| of the layer are zeroed."""
    mask = torch.zeros(W.numel(), dtype=torch.bool)
    mask[torch.argsort(W.abs().flatten())[:int(W.numel() * fraction)]] = True
    return mask.view(W.shape)


def _direct_wanda(W, X, fraction=None, n=None, m=None):
    """Wanda Eq. 1, S_ij = |W_ij| * ||X_j||_2 over the tokens, the lowest zeroed per output row
    (or the m - n lowest of every m consecutive inputs of a row)."""
    S = W.abs() * X.pow(2).sum(0).sqrt()[None, :]
    mask = torch.zeros_like(W, dtype=torch.bool)
    for r in range(W.shape[0]):
        if m is None:
            mask[r, torch.argsort(S[r])[:int(W.shape[1] * fraction)]] = True
        else:
            for c in range(0, W.shape[1], m):
                mask[r, c + torch.argsort(S[r, c:c + m])[:m - n]] = True
    return mask


def _later_diagonal(Hinv, start, stop):
    """[H_c^-1]_cc for c in start..stop-1, each once the columns before c are eliminated: the OBS
    loss denominators of the columns a mask is chosen for (the squared diagonal of the paper's
    Cholesky factor), by Gaussian elimination on a copy."""
    H, out = Hinv.clone(), []
    for c in range(start, stop):
        out.append(H[c, c].clone())
        H -= H[:, c:c + 1] @ H[c:c + 1, :] / H[c, c]
    return torch.stack(out)


def _sparsegpt_reference(W, H, fraction=None, n=None, m=None, block=128, damp=0.01):
    """SparseGPT written out in float64: dampened H, its inverse; for each column c in order the
    mask is chosen when its block (unstructured: the floor(fraction * size) smallest w^2 /
    [H_c^-1]_cc over the block's rows and columns) or its n:m group (per row) comes up, from the
    weights as updated so far; then a zeroed w_c moves the later columns by -w_c / Hinv_cc *
    Hinv_{c,:} (OBS) and Hinv drops column c by Gaussian elimination."""
    W, H = W.double().clone(), H.double().clone()
    N, K = W.shape
    H += damp * H.diagonal().mean() * torch.eye(K, dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    mask = torch.zeros(N, K, dtype=torch.bool)
    for c in range(K):
        if m is None and c % block == 0:
            stop = min(c + block, K)
            loss = W[:, c:stop] ** 2 / _later_diagonal(Hinv, c, stop)[None, :]
            flat = torch.zeros(loss.numel(), dtype=torch.bool)
            flat[torch.argsort(loss.flatten())[:int(loss.numel() * fraction)]] = True
            mask[:, c:stop] = flat.view(loss.shape)
        if m is not None and c % m == 0:
            loss = W[:, c:c + m] ** 2 / _later_diagonal(Hinv, c, c + m)[None, :]
            for r in range(N):
                mask[r, c + torch.argsort(loss[r])[:m - n]] = True
        err = torch.where(mask[:, c], W[:, c], 0) / Hinv[c, c]
        W -= err[:, None] * Hinv[c][None, :]
        Hinv -= Hinv[:, c:c + 1] @ Hinv[c:c + 1, :] / Hinv[c, c]
    W[mask] = 0
    return W, mask


def _check_nm(mask, n, m):
    groups = mask.reshape(mask.shape[0], -1, m).sum(-1)
    assert bool((groups == m - n).all()), groups.unique()


# --- targets and masks -----------------------------------------------------------------------
@pytest.mark.parametrize("fraction", [0.5, 0.3])
def test_magnitude_zeroes_the_smallest_of_the_layer_exactly(fraction):
    W, _, _ = _layer()
    mask = magnitude_mask(W, Sparsity(fraction))
    assert torch.equal(mask, _direct_magnitude(W, fraction))
    assert int(mask.sum()) == int(W.numel() * fraction)


@pytest.mark.parametrize("target", ["0.5", "0.3", "2:4", "1:4", "4:8"])
def test_wanda_mask_is_the_per_row_argsort_of_weight_times_input_norm(target):
    W, X, acc = _layer()
    t = Sparsity.parse(pattern=target) if ":" in target else Sparsity(float(target))
    mask = wanda_mask(W, input_norms(acc.sum), t)
    if t.m:
        assert torch.equal(mask, _direct_wanda(W, X, n=t.n, m=t.m))
        _check_nm(mask, t.n, t.m)
    else:
        assert torch.equal(mask, _direct_wanda(W, X, t.fraction))
        assert bool((mask.sum(1) == int(W.shape[1] * t.fraction)).all())  # every row exactly


@pytest.mark.parametrize("target,block", [("0.5", 16), ("0.3", 16), ("0.5", 128), ("2:4", 16), ("1:4", 128)])
def test_sparsegpt_equals_the_direct_obs_reference(target, block):
    W, X, acc = _layer(dtype=torch.float64)
    t = Sparsity.parse(pattern=target) if ":" in target else Sparsity(float(target))
    got, mask = sparsegpt_prune(W, acc.value().double(), t, SparseGPTConfig(block_size=block))
    ref, ref_mask = _sparsegpt_reference(W, acc.value().double(), None if t.m else t.fraction, t.n or None,
                                         t.m or None, block)
    assert torch.equal(mask, ref_mask)
    assert torch.equal(got == 0, mask)
    assert (got - ref).abs().max() < 1e-9
    if t.m:
        _check_nm(mask, t.n, t.m)
    else:  # exact per block of columns, hence per layer
        for c in range(0, W.shape[1], block):
            b = mask[:, c:c + block]
            assert int(b.sum()) == int(b.numel() * t.fraction)


@pytest.mark.parametrize("target", [HALF, TWO_FOUR])
def test_sparsegpt_layer_error_is_below_magnitude_and_wanda(target):
    W, X, acc = _layer(n=64, k=128, tokens=1024)
    out = W @ X.t()

    def err(Wp):
        return float((out - Wp @ X.t()).norm())

    e_mag = err(W * ~magnitude_mask(W, target))
    e_wanda = err(W * ~wanda_mask(W, X.pow(2).sum(0).sqrt(), target))
    e_sgpt = err(sparsegpt_prune(W, acc.value(), target)[0])
    assert e_sgpt < 0.9 * min(e_mag, e_wanda), (e_sgpt, e_wanda, e_mag)


@pytest.mark.parametrize("target", [HALF, TWO_FOUR])
def test_identity_hessian_makes_sparsegpt_magnitude_pruning(target):
    """With H = I the OBS loss is w^2 and no weight moves: SparseGPT is magnitude pruning (one
    block over the whole layer, for the unstructured mask to be compared layer-wide)."""
    W, _, _ = _layer()
    got, mask = sparsegpt_prune(W, torch.eye(W.shape[1]) * 2, target, SparseGPTConfig(block_size=W.shape[1]))
    assert torch.equal(mask, magnitude_mask(W, target))
    assert torch.equal(got, W * ~mask)


@pytest.mark.parametrize("bad,match", [((1.5, None), r"--sparsity 1.5: expected a fraction strictly between 0 and 1"),
                                       ((0.0, None), r"--sparsity 0.0"), ((None, "4:4"), r"--pattern 4:4: expected N:M"),
                                       ((None, "2/4"), r"--pattern '2/4': expected N:M"),
                                       ((None, "4:0"), r"--pattern 4:0: expected N:M with 0 < N < M"),
                                       ((None, "0:4"), r"--pattern 0:4: expected N:M with 0 < N < M"),
                                       ((0.5, "2:4"), r"not both")])
def test_bad_targets_are_named(bad, match):
    with pytest.raises(PruneError, match=match):
        Sparsity.parse(*bad)


# --- whole models ----------------------------------------------------------------------------
def _tiny(seed=0):
    torch.manual_seed(seed)
    return build(get_preset("tiny-llama")).eval()


def _linears(model):
    return {n: m for n, m in model.named_modules() if type(m) is torch.nn.Linear and n.startswith("layers.")}


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("target", [Sparsity(0.4), TWO_FOUR])
def test_every_block_linear_gets_the_target_and_nothing_else_changes(method, target):
    model, before = _tiny(), _tiny().state_dict()
    calib = torch.randint(0, 512, (4, 64), generator=torch.Generator().manual_seed(1))
    prune_model(model, PruneConfig(method, target), calib)
    for name, lin in _linears(model).items():
        zero = lin.weight == 0
        if target.m:
            _check_nm(zero, target.n, target.m)
        elif method == "wanda":
            assert bool((zero.sum(1) == int(lin.in_features * 0.4)).all()), name
        elif method == "magnitude":
            assert int(zero.sum()) == int(zero.numel() * 0.4), name
        else:  # per block of 128 columns
            assert abs(float(zero.float().mean()) - 0.4) < 0.01, name
    for name, t in model.state_dict().items():
        if not any(name == f"{n}.weight" for n in _linears(model)):
            assert torch.equal(t, before[name]), name  # embedding, norms, head untouched
    assert model.pruning["method"] == method and model.pruning["zero_fraction"] == pytest.approx(
        0.5 if target.m else 0.4, abs=0.01)


def test_wanda_calibrates_each_block_on_the_already_pruned_blocks_before_it():
    """Block i's norms come from running blocks < i *pruned* and block i as it was (both papers'
    sequential scheme): recompute them by hand with hooks and compare masks, block by block."""
    dense, model = _tiny(), _tiny()
    calib = torch.randint(0, 512, (3, 48), generator=torch.Generator().manual_seed(2))
    prune_model(model, PruneConfig("wanda", HALF), calib)
    for i in range(len(model.layers)):
        probe = _tiny()
        for j in range(i):
            probe.layers[j].load_state_dict(model.layers[j].state_dict())
        seen: dict[str, list] = {}
        hooks = [m.register_forward_pre_hook(lambda mod, a, n=n: seen.setdefault(n, []).append(a[0].reshape(-1, a[0].shape[-1])))
                 for n, m in probe.layers[i].named_modules() if type(m) is torch.nn.Linear]
        with torch.no_grad():
            for row in calib:
                probe(row[None])
        for h in hooks:
            h.remove()
        for name, xs in seen.items():
            W = dense.layers[i].get_submodule(name).weight
            expect = _direct_wanda(W, torch.cat(xs), 0.5)
            assert torch.equal(model.layers[i].get_submodule(name).weight == 0, expect), (i, name)


def test_a_pruned_folder_round_trips_and_keeps_its_record(tmp_path):
    model = _tiny()
    prune_model(model, PruneConfig("sparsegpt", TWO_FOUR), torch.randint(0, 512, (4, 64)))
    save(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["pruning"]["method"] == "sparsegpt" and meta["pruning"]["pattern"] == "2:4"
    back, _ = load(tmp_path / "m")
    for (k, a), (_, b) in zip(model.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k
    assert back.pruning == meta["pruning"]
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        assert torch.equal(model(ids), back(ids))


def test_models_it_cannot_prune_are_refused(tmp_path):
    with pytest.raises(PruneError, match="4-expert MoE models are not supported"):
        prune_model(build(get_preset("tiny-mixtral")).eval(), PruneConfig("magnitude"))
    from evolm.quant.quantize import QuantizeConfig, quantize_model

    with pytest.raises(PruneError, match="weight-only quantized"):
        prune_model(quantize_model(_tiny(), QuantizeConfig("int8")), PruneConfig("magnitude"))
    odd = build(get_preset("tiny-llama").replace(d_model=90, n_heads=3, n_kv_heads=3)).eval()
    with pytest.raises(PruneError, match=r"layers.0.self_attn.q_proj has 90 inputs, not a multiple of 4: it cannot take the 2:4 pattern"):
        prune_model(odd, PruneConfig("magnitude", Sparsity.parse(pattern="2:4")))


# --- CLI -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A tiny Llama with a small BPE tokenizer saved as an evolm folder, and a text to calibrate on."""
    from evolm.tokenizer import train_bpe

    tmp = tmp_path_factory.mktemp("prune")
    texts = [(ROOT / f).read_text() for f in ("README.md", "src/evolm/model.py")]
    tok = train_bpe(texts, vocab_size=300, special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    save(build(get_preset("tiny-llama").replace(vocab_size=300)).eval(), tmp / "model", tokenizer=tok)
    (tmp / "calib.txt").write_text("\n".join(texts))
    return tmp


def test_cli_prunes_to_a_folder_other_verbs_load(tiny_folder, tmp_path, capsys):
    out = tmp_path / "p"
    main(["prune", "--model", str(tiny_folder / "model"), "--out", str(out), "--method", "sparsegpt", "--pattern",
          "2:4", "--calib-data", str(tiny_folder / "calib.txt"), "--calib-samples", "4", "--calib-len", "64"])
    assert "50.0% of the block linears'" in capsys.readouterr().out
    model, tok = load(out)
    assert tok is not None and model.pruning["calibration"]["samples"] == 4
    for lin in _linears(model).values():
        _check_nm(lin.weight == 0, 2, 4)
    main(["generate", "--model", str(out), "--prompt", "def", "--max-new-tokens", "4", "--temperature", "0"])
    main(["convert", "--model", str(out), "--to", "hf", "--out", str(tmp_path / "hf")])
    assert (tmp_path / "hf" / "config.json").is_file()


@pytest.mark.parametrize("extra,message", [
    (["--method", "magnitude", "--sparsity", "1.5"], "--sparsity 1.5: expected a fraction strictly between 0 and 1"),
    (["--method", "magnitude", "--sparsity", "0"], "--sparsity 0.0: expected a fraction strictly between 0 and 1"),
    (["--method", "wanda", "--pattern", "5:4"], "--pattern 5:4: expected N:M with 0 < N < M"),
    (["--method", "wanda", "--pattern", "two:four"], "--pattern 'two:four': expected N:M"),
    (["--method", "wanda", "--calib-data", "SHORT", "--calib-samples", "2", "--calib-len", "64"],
     "calibration set too small: 2 samples x 64 tokens = 128 tokens needed"),
    (["--method", "sparsegpt", "--calib-samples", "2", "--calib-len", "64"],
     "calibration set too small for SparseGPT: 128 tokens, but layers.2.mlp.down_proj has 256 inputs"),
    (["--method", "sparsegpt", "--blocksize", "0"], "--blocksize must be positive"),
])
def test_cli_errors_are_one_line(tiny_folder, tmp_path, capsys, extra, message):
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    extra = [str(short) if a == "SHORT" else a for a in extra]
    if "--calib-data" not in extra:
        extra += ["--calib-data", str(tiny_folder / "calib.txt")]
    with pytest.raises(SystemExit):
        main(["prune", "--model", str(tiny_folder / "model"), "--out", str(tmp_path / "p")] + extra)
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p").exists()


def test_cli_refuses_a_moe_model(tmp_path, capsys):
    save(build(get_preset("tiny-mixtral")).eval(), tmp_path / "moe")
    with pytest.raises(SystemExit):
        main(["prune", "--model", str(tmp_path / "moe"), "--out", str(tmp_path / "p"), "--method", "magnitude"])
    assert "MoE models are not supported" in capsys.readouterr().err
