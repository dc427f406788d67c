"""DeepSeek-V3 multi-token prediction (evolm/nn/mtp.py) and self-speculative decoding with it.

transformers drops the MTP layers of DeepSeek-V3 checkpoints, so the reference here is the
paper's equations (arXiv:2412.19437 sec. 2.2, Eq. 21-25) written out in plain PyTorch from the
raw tensors, with the concatenation order and h^0 (the final-normed main state) of the released
checkpoint layout. The Transformer block TRM_k is evolm's ``Block`` (parity-tested against
transformers elsewhere) called directly; everything MTP adds is re-derived here.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from evolm import build
from evolm.interop.hf import WeightsError, load_hf_folder, save_hf_folder, state_dict_from_hf, state_dict_to_hf
from evolm.infer import SamplingParams, generate
from evolm.infer import speculative
from evolm.infer.speculative import mtp_speculative_greedy
from evolm.presets import get_preset


def _model(name: str = "tiny-deepseek", depth: int = 2, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return build(get_preset(name).replace(mtp_depth=depth, **kw))


def _rms(x, w, eps):
    return w * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps))


def _reference_mtp_states(model, weights: dict, L: int, h0: torch.Tensor, ids: torch.Tensor) -> list[torch.Tensor]:
    """h^k for k = 1..D (Eq. 21-22) from raw tensors named as in the HF checkpoint (layer L + k - 1)."""
    c, T = model.config, ids.shape[1]
    emb_table, states, h = weights["model.embed_tokens.weight"], [], h0
    for k in range(1, c.mtp_depth + 1):
        P = f"model.layers.{L + k - 1}."
        n = T - k
        e = _rms(emb_table[ids[:, k:]], weights[P + "enorm.weight"], c.norm_eps)  # RMSNorm(Emb(t_{i+k}))
        hn = _rms(h[:, :n], weights[P + "hnorm.weight"], c.norm_eps)  # RMSNorm(h^{k-1}_i)
        x = torch.cat((e, hn), -1) @ weights[P + "eh_proj.weight"].T  # M_k [.; .]
        rope = model.rotary(torch.arange(n).expand(ids.shape[0], n), x.dtype)
        h = model.mtp_layers[k - 1].block(x, rope, None, True)  # TRM_k, causal over positions 1..T-k
        states.append(h)
    return states


def _reference_loss(model, weights, L, ids, targets):
    """Eq. 23-25: P^k = softmax(head(RMSNorm_k(h^k))); L^k = -(1/T) sum log P^k[t]; lambda/D sum_k L^k."""
    c = model.config
    h0 = model(ids, return_hidden=True)
    head = weights["lm_head.weight"]
    n_main = (targets != -100).sum()
    main = F.cross_entropy((h0 @ head.T).flatten(0, 1), targets.flatten(), ignore_index=-100)
    total = 0.0
    for k, h in enumerate(_reference_mtp_states(model, weights, L, h0, ids), start=1):
        logits = _rms(h, weights[f"model.layers.{L + k - 1}.shared_head.norm.weight"], c.norm_eps) \
            @ weights[f"model.layers.{L + k - 1}.shared_head.head.weight"].T
        total = total + F.cross_entropy(logits.flatten(0, 1), targets[:, k:].flatten(), ignore_index=-100,
                                        reduction="sum") / n_main
    return main + c.mtp_loss_weight / c.mtp_depth * total


@pytest.mark.parametrize("name", ["tiny-deepseek", "tiny-llama"])
def test_loss_matches_the_equations(name):
    model = _model(name, depth=2, tie_embeddings=False, mtp_loss_weight=0.3)
    with torch.no_grad():  # non-trivial norm weights, so that a swapped norm or half of M_k shows
        for n, p in model.named_parameters():
            if p.ndim == 1 and "norm" in n:
                p.add_(torch.randn_like(p) * 0.3)
    layout = "deepseek_v3" if name == "tiny-deepseek" else "llama"  # the names only: llama has no MTP config key
    weights = state_dict_to_hf(model.state_dict(), model.config, layout)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    targets = torch.roll(ids, -1, 1)
    targets[0, 5] = targets[1, -1] = -100
    model.train()
    got = model(ids, targets=targets)
    want = _reference_loss(model, weights, model.config.n_layers, ids, targets)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    got.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n.startswith("mtp_layers.") and "experts" not in n and "gate" not in n)


def test_depth_zero_and_eval_keep_the_main_loss():
    plain, mtp = _model("tiny-llama", depth=0), _model("tiny-llama", depth=2)
    assert plain.mtp_layers is None and not any(k.startswith("mtp") for k in plain.state_dict())
    main = {k: v for k, v in mtp.state_dict().items() if not k.startswith("mtp_layers.")}
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in main.items())  # same random draws
    ids = torch.randint(0, 512, (2, 16))
    t = torch.roll(ids, -1, 1)
    plain.train()
    mtp.eval()  # the MTP loss is a training signal: evaluation reports the next-token loss
    torch.testing.assert_close(mtp(ids, targets=t), plain(ids, targets=t), rtol=0, atol=0)
    mtp.train()
    assert mtp(ids, targets=t) > plain(ids, targets=t)


# --- the Hugging Face checkpoint layout (DeepSeek-V3: model.layers.61.*) -----------------------
def test_hf_layout_round_trip_and_load(tmp_path):
    model = _model("tiny-deepseek", depth=1)
    L = model.config.n_layers
    folder = save_hf_folder(model, tmp_path / "ds")
    from safetensors.torch import load_file
    import json

    cfg = json.loads((folder / "config.json").read_text())
    raw = load_file(str(folder / "model.safetensors"))
    assert cfg["num_nextn_predict_layers"] == 1 and cfg["num_hidden_layers"] == L
    for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                 "shared_head.head.weight", "embed_tokens.weight", "input_layernorm.weight",
                 "self_attn.kv_a_proj_with_mqa.weight", "mlp.gate.e_score_correction_bias",
                 "mlp.experts.0.gate_proj.weight", "mlp.shared_experts.down_proj.weight"):
        assert f"model.layers.{L}.{name}" in raw, name
    loaded = load_hf_folder(folder)
    assert loaded.config.mtp_depth == 1
    ids = torch.randint(0, 512, (1, 12))
    h0 = loaded(ids, return_hidden=True)
    (want,) = _reference_mtp_states(loaded, raw, L, h0, ids)
    layer = loaded.mtp_layers[0]
    from evolm.nn.mtp import mtp_inputs, token_embedding

    rope, mask, causal = mtp_inputs(loaded, torch.arange(11)[None], None, layer)
    got = layer(h0[:, :11], token_embedding(loaded, ids[:, 1:]), rope, mask, causal)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_hf_announced_but_absent_mtp_layers_and_differing_copies(tmp_path):
    model = _model("tiny-deepseek", depth=1)
    L = model.config.n_layers
    raw = state_dict_to_hf(model.state_dict(), model.config)
    bad = dict(raw)
    bad[f"model.layers.{L}.embed_tokens.weight"] = raw["model.embed_tokens.weight"] + 1
    with pytest.raises(WeightsError, match="shares"):
        state_dict_from_hf(bad, model.config, "deepseek_v3")
    folder = save_hf_folder(model, tmp_path / "ds")  # now drop layer L from the file
    from safetensors.torch import load_file, save_file

    kept = {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if f"layers.{L}." not in k}
    save_file(kept, str(folder / "model.safetensors"), metadata={"format": "pt"})
    assert load_hf_folder(folder).config.mtp_depth == 0


# --- self-speculative decoding ----------------------------------------------------------------
def _greedy(model, prompt, n):
    return list(generate(model, [prompt], SamplingParams(max_new_tokens=n, temperature=0, ignore_eos=True))[0])


def _reference_drafts(model, seq: list[int], k: int) -> list[int]:
    """Drafts recomputed from scratch (no caches): the chain of Eq. 21-23 over the whole sequence."""
    from evolm.nn.mtp import head_logits, mtp_inputs, token_embedding

    N = len(seq) - 1
    h = model(torch.tensor([seq[:N]]), return_hidden=True)
    toks, drafts = list(seq), []
    for j, layer in enumerate(model.mtp_layers[:k], start=1):
        rope, mask, causal = mtp_inputs(model, torch.arange(N)[None], None, layer)
        h = layer(h, token_embedding(model, torch.tensor([toks[j:N + j]])), rope, mask, causal)
        drafts.append(int(head_logits(model, layer, h[:, -1:]).argmax(-1)))
        toks.append(drafts[-1])
    return drafts


def _check_drafts(monkeypatch, model, prompt, n):
    seen = []
    real = speculative._Drafter.draft

    def draft(self, seq):
        out = real(self, seq)
        seen.append((list(seq), out))
        return out

    monkeypatch.setattr(speculative._Drafter, "draft", draft)
    res = mtp_speculative_greedy(model, prompt, n)
    monkeypatch.undo()
    with torch.no_grad():
        for seq, out in seen:
            assert out == _reference_drafts(model, seq, len(out))
    return res


@pytest.mark.parametrize("name,depth", [("tiny-deepseek", 1), ("tiny-deepseek", 3), ("tiny-llama", 2)])
def test_speculative_equals_greedy_on_a_random_model(monkeypatch, name, depth):
    model = _model(name, depth=depth).eval()
    prompt = torch.randint(0, 512, (9,)).tolist()
    res = _check_drafts(monkeypatch, model, prompt, 30)
    assert res.tokens == _greedy(model, prompt, 30)
    assert res.drafted == depth * (res.main_forwards - 1)


def _trained(steps: int = 300, depth: int = 2):
    """A tiny model trained (main + MTP loss) on a short repeating corpus: drafts get accepted."""
    torch.manual_seed(0)
    model = build(get_preset("tiny-llama").replace(vocab_size=64, d_model=64, n_layers=2, d_ff=128,
                                                   mtp_depth=depth, mtp_loss_weight=1.0))
    g = torch.Generator().manual_seed(1)
    phrases = [torch.randint(3, 64, (n,), generator=g) for n in (5, 7, 11)]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        batch = torch.stack([torch.cat([phrases[i] for i in torch.randint(0, 3, (8,), generator=g)])[:33]
                             for _ in range(8)])
        loss = model(batch[:, :-1], targets=batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), phrases


@pytest.fixture(scope="module")
def trained():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _trained()
    torch.set_num_threads(n)


def test_speculative_equals_greedy_on_a_trained_model(monkeypatch, trained):
    model, phrases = trained
    prompt = torch.cat((phrases[0], phrases[2], phrases[1][:3])).tolist()
    res = _check_drafts(monkeypatch, model, prompt, 60)
    assert res.tokens == _greedy(model, prompt, 60)
    assert 0 < res.acceptance_rate <= 1 and res.tokens_per_forward > 1
    one = mtp_speculative_greedy(model, prompt, 60, draft_tokens=1)
    assert one.tokens == res.tokens and one.drafted == one.main_forwards - 1
