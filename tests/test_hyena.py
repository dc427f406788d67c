"""Hyena (nn/hyena.py) against direct computations of the paper's equations and StripedHyena's engine.

No transformers model implements Hyena. The references are: a direct O(T^2) causal convolution of
the same filters (written here, loop by loop), the paper's recurrence written out by hand
(Poli et al. 2023, arXiv:2302.10866, Alg. 1-3), and -- where the ``stripedhyena`` package (Together's
inference code by the paper's first author) is installed -- its ``HyenaInferenceEngine``'s
short-filter and FFT long-convolution paths fed the same weights and filter.
"""

from __future__ import annotations

import math

import pytest
import torch

from evolm.config import ConfigError, ModelConfig
from evolm.model import Transformer
from evolm.nn.hyena import Hyena, fft_causal_conv, positional_features


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=61, d_model=16, n_layers=2, n_heads=2, max_seq_len=48, attention="hyena",
                pos_emb="none", norm="rmsnorm", mlp="glu", activation="silu", hyena_filter_width=16,
                hyena_filter_emb=5)
    base.update(kw)
    return ModelConfig(**base)


def direct_causal_conv(z: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """y[..., c, t] = sum_{s <= t} h[c, t - s] z[..., c, s], one output at a time (float64)."""
    z, h = z.double(), h.double()
    T = z.shape[-1]
    y = torch.zeros_like(z)
    for t in range(T):
        for s in range(t + 1):
            y[..., t] += h[:, t - s] * z[..., s]
    return y


def paper_operator(m: Hyena, x: torch.Tensor) -> torch.Tensor:
    """Alg. 1-3 written out: projection, short causal conv tap by tap, then for n = 1..N
    z <- x^n * (h^n * z + D^n z) with the direct convolution; output projection. float64."""
    B, T, d = x.shape
    N, k = m.order, m.taps
    u = (x.double() @ m.in_proj.weight.double().T + m.in_proj.bias.double()).transpose(1, 2)  # (B, C, T)
    w, b = m.short_conv.weight.double()[:, 0], m.short_conv.bias.double()  # (C, k)
    s = torch.zeros_like(u)
    for t in range(T):
        s[..., t] = b
        for j in range(k):  # tap j reads the input j steps back (the kernel's last tap is "now")
            if t - j >= 0:
                s[..., t] += w[:, k - 1 - j] * u[..., t - j]
    streams = s.split(d, dim=1)
    gates, z = streams[:N], streams[N]
    h = m.filter(T).double()
    D = m.filter.skip.double()
    for n in range(N):
        z = gates[n] * (direct_causal_conv(z, h[n]) + D[n, :, None] * z)
    return z.transpose(1, 2) @ m.o_proj.weight.double().T + m.o_proj.bias.double()


# --- the long convolution and the operator --------------------------------------------------
@pytest.mark.parametrize("T", [1, 2, 7, 16, 33])
def test_fft_conv_equals_direct_convolution(T):
    g = torch.Generator().manual_seed(T)
    z, h = torch.randn(2, 3, T, generator=g), torch.randn(3, T + 5, generator=g)
    want = direct_causal_conv(z, h[:, :T])
    got = fft_causal_conv(z, h)
    assert (got.double() - want).abs().max() < 1e-5
    # the 2T padding is what makes it causal: a circular FFT of length T wraps the future around
    wrapped = torch.fft.irfft(torch.fft.rfft(z, n=T) * torch.fft.rfft(h[:, :T], n=T), n=T)
    assert T < 3 or (wrapped.double() - want).abs().max() > 1e-3


@pytest.mark.parametrize("order,taps", [(1, 1), (2, 3), (3, 4)])
def test_operator_equals_paper_recurrence_with_direct_convolutions(order, taps):
    torch.manual_seed(order)
    c = tiny(hyena_order=order, hyena_short_conv=taps)
    m = Transformer(c).layers[0].self_attn
    x = torch.randn(2, 21, c.d_model)
    got = m(x)
    want = paper_operator(m, x)
    assert got.shape == x.shape
    assert (got.double() - want).abs().max() < 1e-5, (got.double() - want).abs().max()


def test_filters_are_positional_mlp_times_decaying_window():
    """Alg. 2: h = Window(FFN(PositionalEncoding(t))). The features are t and cos/-sin of the
    frequencies; the window exp(-a_c t) puts the fastest channel at hyena_decay_target at
    t = hyena_decay_fast (a fraction of max_seq_len) and the slowest at hyena_decay_slow."""
    c = tiny(max_seq_len=101, hyena_filter_emb=7)
    f = Transformer(c).layers[0].self_attn.filter
    z, t = positional_features(101, 7, 101)
    assert z.shape == (101, 7) and torch.allclose(z[:, 0], t[:, 0]) and float(t[-1]) == 1.0
    p = torch.arange(101.0)
    for j, freq in enumerate(torch.linspace(1e-4, 2, 3)):
        assert torch.allclose(z[:, 1 + j], torch.cos(2 * math.pi * freq * p / 101), atol=1e-5)
        assert torch.allclose(z[:, 4 + j], -torch.sin(2 * math.pi * freq * p / 101), atol=1e-5)
    with torch.no_grad():
        h, raw = f(101), f.mlp(z)
    raw = raw.T.reshape(c.hyena_order, c.d_model, 101)
    window = h / raw
    at = round(0.3 * 100)  # t = 0.3 on the fastest (last) channel
    assert abs(float(window[0, -1, at]) - c.hyena_decay_target) < 2e-3
    assert abs(float(window[0, 0, 100]) - c.hyena_decay_target ** (1 / 1.5)) < 1e-3
    assert (window[..., 1:] <= window[..., :-1] + 1e-7).all()  # decays along t
    # a prefix of positions gives the same filter values: a decode step sees what the full call saw
    with torch.no_grad():
        assert torch.allclose(f(40), h[..., :40], atol=1e-6)


def test_against_stripedhyena_engine():
    """StripedHyena's engine (Together, M. Poli) computes x2 * (h * (x1 v) + D x1 v) after its short
    depthwise filter. That is the paper's order-2 recurrence whose first filter is the identity
    (h^1 = delta, D^1 = 0); its FFT path and its direct-conv path both have to agree with ours."""
    engine = pytest.importorskip("stripedhyena.engine")
    torch.manual_seed(0)
    c = tiny(hyena_order=2, hyena_short_conv=3)
    m = Transformer(c).layers[0].self_attn
    d, T = c.d_model, 19
    x = torch.randn(2, T, d)
    pad = torch.ones(2, T)
    pad[1, :4] = 0  # a left-padded row
    h2 = m.filter(c.max_seq_len)[1].detach()
    identity = torch.zeros(d, c.max_seq_len)
    identity[:, 0] = 1.0
    with torch.no_grad():
        m.filter.skip[0].zero_()
    mask = pad.bool()  # a recurrent layer's plan: the validity of the new tokens
    m.filter.forward = lambda L: torch.stack((identity[:, :L], h2[:, :L]))  # noqa: E731
    with torch.no_grad():
        ours = m(x, mask=mask)
        # their stream order is (x2, x1, v): our (x^1, x^2, v) with the gates swapped
        perm = torch.cat((torch.arange(d, 2 * d), torch.arange(0, d), torch.arange(2 * d, 3 * d)))
        u = (m.in_proj(x) * pad[..., None])[..., perm]
        eng = engine.HyenaInferenceEngine()
        z_pre, _ = eng.parallel_fir(torch.nn.functional.conv1d, u, m.short_conv.weight[perm],
                                    m.short_conv.bias[perm], T, fir_length=3, padding_mask=pad)
        dims = (d, 1, d, 1, d)
        kw = dict(poles=None, residues=None, t=None, dims=dims, layer_idx=0)
        fft = eng.parallel_iir(z_pre, h2[None, :, :T], m.filter.skip[1], T, **kw)
        # the direct path takes the filter in conv1d's (cross-correlation) layout: reversed
        fir = eng.parallel_iir(z_pre, h2[None, :, :T].flip(-1), m.filter.skip[1], T, long_fir_threshold=T, **kw)
    for theirs in (fft, fir):
        want = m.o_proj(theirs)
        assert (ours - want)[pad.bool()].abs().max() < 1e-5, (ours - want)[pad.bool()].abs().max()


# --- as a model part --------------------------------------------------------------------------
def test_causal_a_future_token_changes_no_earlier_output():
    torch.manual_seed(1)
    model = Transformer(tiny(n_layers=3)).eval()
    ids = torch.randint(0, 61, (1, 30))
    for k in (0, 11, 29):
        other = ids.clone()
        other[0, k] = (other[0, k] + 7) % 61
        a, b = model(ids), model(other)
        assert torch.equal(a[:, :k], b[:, :k]) or (a[:, :k] - b[:, :k]).abs().max() < 1e-6
        assert (a[:, k:] - b[:, k:]).abs().max() > 1e-4


@pytest.mark.parametrize("T", [1, 5, 48])
def test_shapes_and_left_padding(T):
    """Any length up to max_seq_len; a left-padded row gives its real tokens the logits of the
    unpadded row (padding is zeroed where it enters the convolutions)."""
    torch.manual_seed(2)
    model = Transformer(tiny()).eval()
    ids = torch.randint(0, 61, (2, T))
    out = model(ids)
    assert out.shape == (2, T, 61) and torch.isfinite(out).all()
    if T > 1:
        n = T // 2 + 1
        padded = torch.cat((torch.zeros(1, T - n, dtype=torch.long), ids[:1, :n]), dim=1)
        mask = torch.cat((torch.zeros(1, T - n), torch.ones(1, n)), dim=1).long()
        got = model(padded, attention_mask=mask)[:, T - n:]
        assert (got - model(ids[:1, :n])).abs().max() < 1e-5
    # past max_seq_len the filters end: a longer call is a window of max_seq_len lags, causal as before
    if T == 48:
        longer = torch.cat((ids, torch.randint(0, 61, (2, 12))), dim=1)
        assert (model(longer)[:, :48] - out).abs().max() < 1e-5


def test_gradients_finite_and_training_lowers_loss():
    torch.manual_seed(3)
    model = Transformer(tiny())
    ids = torch.randint(0, 61, (4, 32))
    # a learnable sequence task: copy the token 5 back
    ids[:, 5:] = ids[:, :-5]
    targets = torch.cat((ids[:, 1:], torch.full((4, 1), -100)), 1)
    model(ids, targets=targets).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.layers[0].self_attn.filter.mlp[0].weight.grad.abs().sum() > 0  # the filter MLP learns
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = model(ids, targets=targets)
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss.detach())
    assert float(loss.detach()) < 0.8 * first


def test_config_errors_name_the_field():
    for kw, field in [({"hyena_order": 0}, "hyena_order"), ({"hyena_filter_emb": 4}, "hyena_filter_emb"),
                      ({"hyena_short_conv": 0}, "hyena_short_conv"), ({"hyena_decay_fast": 2.0}, "hyena_decay_fast"),
                      ({"hyena_decay_target": 1.5}, "hyena_decay_target"), ({"mask": "bidirectional"}, "mask"),
                      ({"sliding_window": 8}, "sliding_window"), ({"hyena_filter_width": 0}, "hyena_filter_width")]:
        with pytest.raises(ConfigError, match=f"'{field}'"):
            tiny(**kw)
    model = Transformer(tiny())
    with pytest.raises(ValueError, match="doc_ids"):
        model(torch.zeros(1, 4, dtype=torch.long), doc_ids=torch.zeros(1, 4, dtype=torch.long))


# --- the cost card ------------------------------------------------------------------------------
def test_cost_card_counts_the_model_and_the_fft():
    from evolm.analysis.cost import cost_card, format_card

    c = tiny(hyena_order=3, hyena_filter_depth=1, tie_embeddings=False)
    model = Transformer(c)
    card = cost_card(c, context_len=32)
    assert card["params_total"] == sum(p.numel() for p in model.parameters())
    mixer = sum(p.numel() for n, p in model.named_parameters() if ".self_attn." in n)
    assert card["params_by_part"]["attention"] == mixer
    filt = sum(p.numel() for n, p in model.named_parameters() if ".self_attn.filter.mlp." in n)
    # N: every weight a token multiplies (the head included), not the embedding, not the filter MLP
    n = card["params_total"] - c.vocab_size * c.d_model - filt
    assert card["flops_params"] == n
    # 3 real FFTs of length 2T at 2.5 n log2 n, the complex product, the gate, per channel and order
    T = 32
    per = (3 * 2.5 * 64 * 6 + 6 * 33) / T + 1
    assert card["long_conv_flops_per_token"] == 3 * round(c.n_layers * 3 * c.d_model * per)
    # the mixer's context FLOPs (the card's "attention" row, as for Mamba's scan) are the convolutions'
    assert card["attention_flops_per_token"] == card["long_conv_flops_per_token"]
    assert card["flops_per_token"] == 6 * n + card["long_conv_flops_per_token"]
    assert card["kv_cache_bytes_at_context"] == 0  # a state of fixed size instead, at any context
    state = c.n_layers * (4 * c.d_model * 2 + 3 * c.d_model * c.max_seq_len) * 2  # bf16: conv + N d L
    assert card["state_bytes_per_sequence"] == state == cost_card(c, context_len=8)["state_bytes_per_sequence"]
    assert "long convolutions" in format_card(card)
    # O(T log T): doubling the context adds a constant per token, not a doubling
    grow = [cost_card(c.replace(max_seq_len=L), L)["long_conv_flops_per_token"] for L in (1024, 2048, 4096)]
    assert abs((grow[2] - grow[1]) - (grow[1] - grow[0])) / grow[0] < 0.01


# --- the lab --------------------------------------------------------------------------------------
def test_lab_recipe_and_ladder_rung_meet_one_flops_budget():
    """recipes/lab-hyena.yaml with --vary attention=mha,hyena, and the ladder's side rung "hyena"
    (attention -> Hyena on the untied-head rung): both variants build and spend the same FLOPs."""
    from pathlib import Path

    import yaml

    from evolm.lab.ablate import Variant, _budgeted, _config, apply_variant
    from evolm.lab.budget import TOLERANCE, Budget
    from evolm.lab.ladder import LADDER
    from evolm.analysis.cost import cost_card

    class Vocab:
        vocab_size = 4096

    base = yaml.safe_load((Path(__file__).resolve().parents[1] / "recipes" / "lab-hyena.yaml").read_text())
    assert _config(base, Vocab).attention == "hyena"
    budget = Budget("flops", 2e12)
    mha = _config(apply_variant(base, Variant("mha", {"attention": "mha"})), Vocab)
    for name in ("mha", "hyena"):
        d, _ = _budgeted(apply_variant(base, Variant(name, {"attention": name})), mha, Vocab, budget)
        c = _config(d, Vocab)
        assert c.attention == name
        Transformer(c.replace(n_layers=1))  # builds
        spent = sum(s["tokens"] for s in d["stages"]) * cost_card(c, context_len=128)["flops_per_token"]
        assert spent == pytest.approx(2e12, rel=TOLERANCE)
    rung = next(v for v in LADDER if v.name == "hyena")
    assert rung.side and rung.on == "untied-head" and rung.changes == {"attention": "hyena"}


def test_flatten_refuses_hyena_rather_than_writing_attention():
    from evolm.lab.flatten import FlattenError, check_supported

    with pytest.raises(FlattenError, match="'attention'"):
        check_supported(tiny())
    check_supported(tiny(attention="mha"))  # the Hyena fields matter only to Hyena


# --- decoding through the cache's recurrent state (cache/state.py) -----------------------------------
def test_cached_decoding_equals_the_full_recompute():
    """Prefill, a chunk, then one token at a time through KVCache's per-layer state: the logits of the
    whole sequence at once (FFT path) within 1e-5, with a left-padded row too."""
    from evolm.cache import KVCache

    torch.manual_seed(4)
    model = Transformer(tiny(n_layers=2, hyena_order=3)).eval()
    ids = torch.randint(0, 61, (2, 60))  # past max_seq_len (48): the state is a window of 48 inputs
    mask = torch.ones(2, 60, dtype=torch.long)
    mask[1, :6] = 0
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        cache = KVCache.for_model(model, 2, 64)
        parts = [model(ids[:, :10], attention_mask=mask[:, :10], cache=cache),
                 model(ids[:, 10:17], attention_mask=mask[:, 10:17], cache=cache)]
        parts += [model(ids[:, t:t + 1], attention_mask=mask[:, t:t + 1], cache=cache) for t in range(17, 52)]
        parts.append(model(ids[:, 52:], attention_mask=mask[:, 52:], cache=cache))
        got = torch.cat(parts, 1)
        alone = model(ids[1:, 6:])
    assert (got - full)[mask.bool()].abs().max() < 1e-5
    assert (got[1:, 6:] - alone).abs().max() < 1e-5


def test_generate_cached_greedy_equals_uncached_greedy():
    """evolm's generate (prefill + one-token steps through the cache) against argmax over a full
    forward of the whole sequence at every step, for prompts of different lengths (left-padded)."""
    from evolm.infer import SamplingParams, generate

    torch.manual_seed(5)
    model = Transformer(tiny(n_layers=2)).eval()
    prompts = [torch.randint(0, 61, (n,)).tolist() for n in (3, 9)]
    got = generate(model, prompts, SamplingParams(max_new_tokens=15, temperature=0.0))
    for prompt, new in zip(prompts, got):
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(15):
                seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
        assert new == seq[len(prompt):]


def test_state_holds_the_convolution_inputs_and_follows_row_selection():
    """The state is the long convolutions' last max_seq_len inputs (N x d x max_seq_len a layer) and
    the short convolution's last taps - 1 inputs, whatever the length; rows reorder with the cache
    (beams, shared prompts)."""
    from evolm.cache import KVCache

    torch.manual_seed(6)
    c = tiny(n_layers=2, hyena_order=2, hyena_short_conv=3)
    model = Transformer(c).eval()
    ids = torch.randint(0, 61, (2, 20))
    with torch.no_grad():
        cache = KVCache.for_model(model, 2, 48)
        model(ids[:, :5], cache=cache)
        per_layer = 2 * (3 * c.d_model * 2 + 2 * c.d_model * 48) * 4  # B x (conv + N d L) float32
        assert cache.state_nbytes() == c.n_layers * per_layer
        model(ids[:, 5:], cache=cache)
        assert cache.state_nbytes() == c.n_layers * per_layer
        cache.select_rows(torch.tensor([1, 1]))
        nxt = torch.randint(0, 61, (2, 1))
        got = model(nxt, cache=cache)[:, -1]
        want = model(torch.cat((ids[1:].expand(2, -1), nxt), 1))[:, -1]
    assert (got - want).abs().max() < 1e-5


def test_serving_engine_decodes_hyena_as_generate(serving_tools):
    """The server's scheduler: requests of different lengths share decode steps (each row's state
    is its own window, no position in it) and a late one joins; each equals generate() alone."""
    from evolm.infer import SamplingParams, generate

    torch.manual_seed(7)
    model = Transformer(tiny(n_layers=2)).eval()
    with torch.no_grad():  # sharpen the random model's logits so argmax is far from ties
        model.embed_tokens.weight.mul_(8)
    prompts = [torch.randint(0, 61, (n,)).tolist() for n in (3, 11, 20, 7)]
    max_new = [20, 9, 15, 18]
    ref = [generate(model, p, SamplingParams(max_new_tokens=m, temperature=0))[0] for p, m in zip(prompts, max_new)]
    assert serving_tools.served_greedy(model, prompts, max_new, max_batch=3, max_len=48) == ref  # 3 run, 1 joins later
