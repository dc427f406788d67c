"""Structured (Minitron) pruning: importance as the paper defines it, cuts that remove only what
carries nothing leave the logits unchanged, and the written model is a real smaller config."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from evolm import build
from evolm.cli import main
from evolm.loading import load, save
from evolm.presets import get_preset
from evolm.prune.importance import compute_importance
from evolm.prune.structured import PruneError, Target, num_params, parse_cut, prune_model, target_for_ratio

ROOT = Path(__file__).resolve().parents[1]


def llama(**kw):
    """A tiny Llama with 3 KV groups of 2 query heads (GQA), SwiGLU, RMSNorm, tied embeddings."""
    return get_preset("tiny-llama").replace(n_heads=6, n_kv_heads=3, head_dim=16, **kw)


def ids(vocab=512, rows=4, t=24, seed=1):
    return torch.randint(0, vocab, (rows, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gpt2", "tiny-gemma3", "tiny-olmo2", "tiny-qwen3"])
def test_cutting_nothing_gives_the_same_logits(preset):
    torch.manual_seed(0)
    model = build(get_preset(preset)).eval()
    x = ids()
    imp = compute_importance(model, x, batch_size=2)
    same = prune_model(model, imp, Target.of(model.config))
    assert same.config.diff(model.config) == {}
    assert torch.equal(same(x), model(x))


@pytest.mark.parametrize("tied", [False, True])
def test_structures_that_carry_nothing_are_cut_without_changing_the_logits(tied):
    """Zero what a KV group, some MLP channels, some hidden channels and a whole block contribute:
    their importance is exactly 0, they are the ones cut, and the smaller model computes the same
    logits. (RMSNorm's eps is the one thing a narrower norm cannot reproduce: it is set tiny; the
    norm computes its statistics in float32, hence the tolerance.)"""
    torch.manual_seed(0)
    c = llama(norm_eps=1e-12, tie_embeddings=tied)
    model = build(c, dtype=torch.float64).eval()
    dead_group, dead_mlp, dead_emb, dead_layer = 1, [3, 40, 41, 200], [0, 7, 50, 95], 1
    with torch.no_grad():
        model.embed_tokens.weight[:, dead_emb] = 0
        for i, block in enumerate(model.layers):
            block.self_attn.v_proj.weight[dead_group * 16:(dead_group + 1) * 16] = 0
            block.mlp.up_proj.weight[dead_mlp] = 0
            block.self_attn.o_proj.weight[dead_emb] = 0
            block.mlp.down_proj.weight[dead_emb] = 0
        model.layers[dead_layer].self_attn.o_proj.weight.zero_()
        model.layers[dead_layer].mlp.down_proj.weight.zero_()
    x = ids(rows=4)
    imp = compute_importance(model, x, batch_size=2)
    kept = [i for i in range(c.n_layers) if i != dead_layer]
    assert torch.all(imp.heads[kept].view(len(kept), 3, 2)[:, dead_group] == 0)
    assert torch.all(imp.mlp[:, dead_mlp] == 0) and torch.all(imp.embed[dead_emb] == 0)
    assert imp.layers[dead_layer].abs() < 1e-12 and torch.all(imp.layers[kept] > 1e-4)
    target = Target(n_heads=4, n_kv_heads=2, d_ff=c.d_ff - 4, d_model=c.d_model - 4, n_layers=2)
    small = prune_model(model, imp, target)
    assert (small.config.n_heads, small.config.n_kv_heads, small.config.d_ff, small.config.d_model,
            small.config.n_layers, small.config.head_dim) == (4, 2, 252, 92, 2, 16)
    assert small.config.meta["pruned"]["layers_kept"] == kept
    torch.testing.assert_close(small(x), model(x), rtol=1e-5, atol=1e-6)
    # without the norms' rescale the narrower RMSNorm divides by a larger RMS: visibly different
    assert (prune_model(model, imp, target, rescale_norms=False)(x) - model(x)).abs().max() > 1e-3


def test_importance_is_the_papers_formula_on_hooked_activations():
    """Heads: ‖per-head attention output‖₂; MLP: the intermediate activation; embedding: the
    d_model norms' outputs summed over blocks; each |·|, mean over the sequence, L2 over the batch.
    Layers: 1 − mean cos(block input, block output), and the loss increase with the block removed."""
    torch.manual_seed(0)
    c = llama()
    model = build(c).eval()
    x = ids(rows=5)
    seen = {"o": {}, "down": {}, "norm": {}, "io": {}}

    def keep(kind, key, what):  # a forward hook that records and returns None (the output stays)
        return lambda m, a, o: seen[kind].__setitem__(key, what(a, o))

    hooks = []
    for i, b in enumerate(model.layers):
        hooks.append(b.self_attn.o_proj.register_forward_hook(keep("o", i, lambda a, o: a[0])))
        hooks.append(b.mlp.down_proj.register_forward_hook(keep("down", i, lambda a, o: a[0])))
        for n in ("attn_norm", "mlp_norm"):
            hooks.append(getattr(b, n).register_forward_hook(keep("norm", (i, n), lambda a, o: o)))
        hooks.append(b.register_forward_hook(keep("io", i, lambda a, o: (a[0], o))))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()

    def agg(a):  # a: (B, S, N) -> (N,): for each channel sqrt(sum_b (mean_s |a|)^2)
        out = torch.zeros(a.shape[-1], dtype=torch.float64)
        for b in range(a.shape[0]):
            out += a[b].abs().double().mean(0) ** 2
        return out.sqrt()

    imp = compute_importance(model, x, batch_size=2)  # batches of 2: the sums must not depend on batching
    for i in range(c.n_layers):
        o = seen["o"][i]
        per_head = torch.stack([o[..., h * 16:(h + 1) * 16].norm(dim=-1) for h in range(c.n_heads)], -1)
        torch.testing.assert_close(imp.heads[i].double(), agg(per_head), rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(imp.mlp[i].double(), agg(seen["down"][i]), rtol=1e-5, atol=1e-7)
    emb = sum(agg(o) for o in seen["norm"].values())
    torch.testing.assert_close(imp.embed.double(), emb, rtol=1e-5, atol=1e-7)
    bi = [1 - F.cosine_similarity(inp, out, dim=-1).mean() for inp, out in (seen["io"][i] for i in range(c.n_layers))]
    torch.testing.assert_close(imp.layers, torch.stack(bi), rtol=1e-4, atol=1e-6)

    def loss(m):
        with torch.no_grad():
            logits = m(x)
        return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1)).item()

    drop = compute_importance(model, x, batch_size=5, layer_metric="loss").layers
    for i in range(c.n_layers):  # the model without block i, built as a config with one layer less
        fewer = build(c.replace(n_layers=c.n_layers - 1)).eval()
        state = {k: v for k, v in model.state_dict().items() if not k.startswith("layers.")}
        for j, src in enumerate(k for k in range(c.n_layers) if k != i):
            state.update({f"layers.{j}." + k[len(f"layers.{src}."):]: v for k, v in model.state_dict().items()
                          if k.startswith(f"layers.{src}.")})
        fewer.load_state_dict(state)
        assert drop[i].item() == pytest.approx(loss(fewer) - loss(model), abs=1e-4)


def test_a_cut_writes_a_smaller_config_of_the_requested_size_that_reloads(tmp_path):
    torch.manual_seed(0)
    c = llama()
    model = build(c).eval()
    x = ids()
    imp = compute_importance(model, x)
    target = parse_cut("heads=2,kv=1,mlp=128,embed=64,layers=2", c)
    small = prune_model(model, imp, target)
    V, d, L, H, K, hd, f = c.vocab_size, 64, 2, 2, 1, 16, 128
    heads = 1 if c.tie_embeddings else 2  # tiny-llama's head is untied
    expected = heads * V * d + L * (d * hd * (H + 2 * K) + H * hd * d + 3 * d * f + 2 * d) + d
    assert small.num_params() == expected == num_params(small.config)
    save(small, tmp_path / "small")
    again, _ = load(tmp_path / "small")
    assert again.config.diff(small.config) == {} and torch.equal(again(x), small(x))

    for ratio in (0.2, 0.5):
        t = target_for_ratio(c, ratio, ("heads", "mlp", "embed", "layers"))
        removed = 1 - num_params(t.config(c)) / num_params(c)
        assert ratio <= removed < ratio + 0.15, (ratio, removed, t)
    assert target_for_ratio(c, 0.3, ("mlp",)).d_model == c.d_model  # only the axes asked for move


def test_the_command_writes_a_folder_every_verb_loads_and_names_bad_requests(tmp_path, capsys):
    from evolm.tokenizer import train_bpe

    texts = [(ROOT / f).read_text() for f in ("README.md", "src/evolm/model.py")]
    tok = train_bpe(texts, vocab_size=300, special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    save(build(llama(vocab_size=300)).eval(), tmp_path / "model", tokenizer=tok)
    (tmp_path / "calib.txt").write_text("\n".join(texts))
    main(["prune", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "pruned"), "--method", "minitron",
          "--ratio", "0.3", "--calib-data", str(tmp_path / "calib.txt"), "--calib-samples", "4", "--calib-len", "32"])
    pruned, tok2 = load(tmp_path / "pruned", need_tokenizer=True)
    before = num_params(llama(vocab_size=300))
    assert 1 - pruned.num_params() / before >= 0.3 and pruned.config.d_model < 96 and pruned.config.d_ff < 256
    assert tok2.encode("def forward") == tok.encode("def forward")
    main(["generate", "--model", str(tmp_path / "pruned"), "--prompt", "def", "--max-new-tokens", "4"])
    for bad, message in ((["--ratio", "1.5"], "expected a fraction of the parameters in (0, 1)"),
                         (["--cut", "mlp=4096"], "mlp=4096 (d_ff) must be between 1 and the model's 256"),
                         (["--sparsity", "0.5"], "give --ratio or --cut, not --sparsity")):
        with pytest.raises(SystemExit):
            main(["prune", "--model", str(tmp_path / "model"), "--out", str(tmp_path / "x"), "--method", "minitron",
                  *bad])
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


@pytest.mark.parametrize("spec, message", [
    ("mlp=999", "mlp=999 (d_ff) must be between 1 and the model's 256"),
    ("embed=0", "embed=0 (d_model) must be between 1 and"),
    ("heads=5,kv=3", "heads=5 is not divisible by kv=3"),
    ("heads=6,kv=2", "needs 3 query heads per KV group; the model has 2"),
    ("width=3", "expected KEY=SIZE with KEY one of heads, kv, mlp, embed, layers"),
    ("mlp=lots", "'lots' is not a whole number"),
])
def test_bad_cuts_are_named(spec, message):
    with pytest.raises(PruneError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_cut(spec, llama())


def test_bad_ratios_and_unsupported_models_are_named():
    for ratio in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(PruneError, match=r"--ratio .*: expected a fraction of the parameters in \(0, 1\)"):
            target_for_ratio(llama(), ratio)
    with pytest.raises(PruneError, match="--axes"):
        target_for_ratio(llama(), 0.3, ("width",))
    with pytest.raises(PruneError, match="mixture of experts"):
        parse_cut("mlp=64", get_preset("tiny-mixtral"))
    with pytest.raises(PruneError, match="sliding_window_pattern=6.*prune width only"):
        parse_cut("layers=3", get_preset("tiny-gemma3"))
    with pytest.raises(PruneError, match="attention='mla'"):
        parse_cut("heads=2", get_preset("tiny-deepseek"))
