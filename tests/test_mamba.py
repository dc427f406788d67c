"""Mamba (nn/mamba.py) against transformers' MambaForCausalLM (its slow PyTorch path) built from the
same tiny config with the same random weights; the recurrent state in the cache (cache/state.py)."""

import pytest
import torch

from evolm.cache import KVCache
import evolm
from evolm.config import ConfigError, ModelConfig
from evolm.infer.decode import generate
from evolm.infer.sampling import SamplingParams
from evolm.interop.hf import (build_from_state_dict, config_from_hf, config_to_hf, load_hf_folder, save_hf_folder,
                              state_dict_from_hf)
from evolm.nn.mamba import selective_scan, selective_step

transformers = pytest.importorskip("transformers")

V = 97


def _pair(n_layers=2, d_model=32, d_state=8, d_conv=4, expand=2, dt_rank=5, conv_bias=True, proj_bias=False, seed=0):
    """A tiny HF Mamba with random weights (its SSM parameters perturbed off their init) and the evolm
    model holding the same weights."""
    torch.manual_seed(seed)
    hc = transformers.MambaConfig(vocab_size=V, hidden_size=d_model, state_size=d_state, num_hidden_layers=n_layers,
                                  expand=expand, conv_kernel=d_conv, time_step_rank=dt_rank, use_conv_bias=conv_bias,
                                  use_bias=proj_bias, use_mambapy=False, use_associative_scan=False,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    hf = transformers.MambaForCausalLM(hc).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("A_log", "D", "norm.weight", "norm_f.weight", "bias")):
                p.add_(0.1 * torch.randn_like(p))
    c = config_from_hf(hf.config.to_dict())  # through the family (interop/families/mamba.py)
    model = build_from_state_dict(c, state_dict_from_hf(hf.state_dict(), c, "mamba")).eval()
    return hf, model


def test_logits_match_transformers_slow_path():
    hf, model = _pair()
    ids = torch.randint(3, V, (2, 50))
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    print(f"mamba logits max |diff| vs transformers: {diff:.2e}")
    assert diff <= 1e-4


def test_logits_match_with_biases_and_odd_sizes():
    hf, model = _pair(n_layers=3, d_model=24, d_state=4, d_conv=3, expand=3, dt_rank=2, proj_bias=True, seed=1)
    ids = torch.randint(3, V, (1, 70))  # longer than one scan chunk
    with torch.no_grad():
        diff = (hf(ids).logits - model(ids)).abs().max().item()
    assert diff <= 1e-4, diff


def test_cached_greedy_generation_equals_transformers():
    hf, model = _pair()
    ids = torch.randint(3, V, (1, 12))
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=20, do_sample=False, min_new_tokens=20)[0, 12:].tolist()
    ours = generate(model, ids, SamplingParams(max_new_tokens=20, temperature=0.0))[0]
    assert ours == ref


def test_recurrent_steps_equal_the_full_scan():
    """Token by token from the cache (conv window + SSM state) gives the full-sequence logits."""
    _, model = _pair()
    ids = torch.randint(3, V, (2, 30))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache.for_model(model, 2, 64)
        first = model(ids[:, :7], cache=cache)  # a prefill, then single tokens
        steps = [model(ids[:, t:t + 1], cache=cache) for t in range(7, 30)]
    torch.testing.assert_close(torch.cat([first, *steps], 1), full, atol=1e-5, rtol=1e-5)


def test_scan_and_step_functions_agree():
    torch.manual_seed(0)
    b, T, d, n = 2, 150, 6, 4
    u, dt = torch.randn(b, T, d), torch.rand(b, T, d)
    A, Bm, Cm = -torch.rand(d, n) * 3, torch.randn(b, T, n), torch.randn(b, T, n)
    h0 = torch.randn(b, d, n)
    y, h = selective_scan(u, dt, A, Bm, Cm, h0, chunk=64)
    hs, ys = h0, []
    for t in range(T):
        yt, hs = selective_step(u[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], hs)
        ys.append(yt)
    torch.testing.assert_close(y, torch.stack(ys, 1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, hs)


def test_left_padded_batch_equals_rows_alone():
    _, model = _pair(proj_bias=True)
    a, b = torch.randint(3, V, (1, 20)), torch.randint(3, V, (1, 13))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 7, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        torch.testing.assert_close(out[0], model(a)[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1, 7:], model(b)[0], atol=1e-5, rtol=1e-5)
    # and cached generation of the padded batch equals each row alone
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    both = generate(model, [a[0].tolist(), b[0].tolist()], params)
    assert both == [generate(model, a, params)[0], generate(model, b, params)[0]]


def test_cache_memory_per_sequence_is_flat_in_length():
    _, model = _pair()
    sizes = []
    for n in (16, 400):
        cache = KVCache.for_model(model, 1, 512)
        with torch.no_grad():
            model(torch.randint(3, V, (1, n)), cache=cache)
            model(torch.randint(3, V, (1, 1)), cache=cache)
        sizes.append(cache.nbytes())
    c = model.config
    per_layer = (c.mamba_expand * c.d_model) * ((c.mamba_d_conv - 1) + c.mamba_d_state) * 4
    print(f"mamba cache bytes per sequence at 17 and 401 tokens: {sizes}")
    assert sizes == [c.n_layers * per_layer] * 2


def test_select_rows_reorders_states():
    _, model = _pair()
    ids = torch.randint(3, V, (2, 9))
    with torch.no_grad():
        cache = KVCache.for_model(model, 2, 32)
        model(ids, cache=cache)
        cache.select_rows(torch.tensor([1, 1, 0]))
        nxt = torch.randint(3, V, (3, 1))
        out = model(nxt, cache=cache)
        ref = model(torch.cat([ids[[1, 1, 0]], nxt], 1))[:, -1:]
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_trains_gradients_flow():
    """Every SSM parameter gets a gradient through the scan, and a few AdamW steps learn a sequence."""
    _, model = _pair()
    model.train()
    ids = torch.randint(3, V, (2, 20))
    loss = model(ids[:, :-1], targets=ids[:, 1:])
    loss.backward()
    for name in ("layers.0.self_attn.A_log", "layers.0.self_attn.D", "layers.1.self_attn.conv1d.weight",
                 "layers.1.self_attn.dt_proj.bias"):
        assert dict(model.named_parameters())[name].grad.abs().sum() > 0, name
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = loss.item()
    for _ in range(12):
        opt.zero_grad()
        loss = model(ids[:, :-1], targets=ids[:, 1:])
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first, (first, loss.item())


def test_config_errors_name_the_field():
    base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=1, attention="mamba", mlp="none", pos_emb="none")
    with pytest.raises(ConfigError, match="mamba_d_state"):
        ModelConfig(**base, mamba_d_state=0)
    with pytest.raises(ConfigError, match="'mask'"):
        ModelConfig(**base, mask="bidirectional")
    with pytest.raises(ConfigError, match="'mlp'"):
        ModelConfig(vocab_size=V, d_model=32, n_layers=2, n_heads=1, mlp="none")
    assert ModelConfig(**base).mamba_dt_rank == 2  # ceil(32 / 16)
    assert ModelConfig(**base).replace(d_model=64).mamba_dt_rank == 4  # derived again


def test_hf_folder_round_trip(tmp_path):
    """evolm -> a Hugging Face folder that transformers loads with the same logits -> evolm again."""
    hf, model = _pair(proj_bias=True)
    assert config_to_hf(model.config)["model_type"] == "mamba"
    folder = save_hf_folder(model, tmp_path / "m")
    back_hf = transformers.MambaForCausalLM.from_pretrained(folder).eval()
    back = load_hf_folder(folder).eval()
    ids = torch.randint(3, V, (1, 16))
    with torch.no_grad():
        ref = model(ids)
        torch.testing.assert_close(back_hf(ids).logits, ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(back(ids), ref)


def test_old_checkpoint_embedding_name_loads():
    """The first converted checkpoints spell the embedding ``backbone.embedding.weight``."""
    hf, model = _pair()
    sd = {k.replace("embeddings.", "embedding."): v for k, v in hf.state_dict().items()}
    ours = state_dict_from_hf(sd, model.config, "mamba")
    torch.testing.assert_close(ours["embed_tokens.weight"], model.embed_tokens.weight)


SIZES = {"mamba-130m": (768, 24), "mamba-370m": (1024, 48), "mamba-790m": (1536, 48), "mamba-1.4b": (2048, 48),
         "mamba-2.8b": (2560, 64)}


@pytest.mark.parametrize("name", list(SIZES))
def test_preset_parameter_count_equals_transformers(name):
    """The presets (state-spaces/mamba-*-hf configs) count exactly transformers' model of that config."""
    d, L = SIZES[name]
    hc = transformers.MambaConfig(vocab_size=50280, hidden_size=d, num_hidden_layers=L)
    with torch.device("meta"):
        hf = transformers.MambaForCausalLM(hc)
    ours = evolm.build(name, device="meta")
    n_ours, n_hf = (sum(p.numel() for p in m.parameters()) for m in (ours, hf))
    assert n_ours == n_hf == ours.config.meta["params"], (n_ours, n_hf)
    assert not config_from_hf(hc.to_dict()).diff(ours.config)


def test_cost_card_counts_params_state_bytes_and_flops():
    """The card's Mamba figures against the model: numel, the cache's bytes, and torch's FLOP counter
    (which sees the matmuls and the convolution: the weights' 2N and the scan's read-out C . h)."""
    from torch.utils.flop_counter import FlopCounterMode

    from evolm.analysis.cost import cost_card, ssm_forward_flops

    _, model = _pair(proj_bias=True)
    c = model.config
    card = cost_card(c, context_len=64, bytes_per_value=4)
    assert card["params_total"] == sum(p.numel() for p in model.parameters())
    assert card["params_by_part"]["attention"] == sum(p.numel() for n, p in model.named_parameters()
                                                      if ".self_attn." in n)
    assert card["kv_cache_bytes_at_context"] == 0
    cache = KVCache.for_model(model, 1, 512)
    with torch.no_grad():
        model(torch.randint(3, V, (1, 300)), cache=cache)
    assert card["state_bytes_per_sequence"] == cache.nbytes()
    # FLOPs: flat in the context length, and the counted matmuls match
    assert cost_card(c, context_len=8192)["forward_flops_per_token"] == card["forward_flops_per_token"]
    T = 32
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.randint(3, V, (1, T)))
    di, N = c.mamba_expand * c.d_model, c.mamba_d_state
    readout = c.n_layers * 2 * di * N  # the einsum C . h, the only part of the scan that is a matmul
    weights = card["forward_flops_per_token"] - ssm_forward_flops(c)
    # the counter leaves out what is not a product of matrices: biases and norm scales
    elementwise = c.n_layers * (2 * di + c.d_model + di + di) + card["params_by_part"]["norms"]
    assert counter.get_total_flops() / T == weights - 2 * elementwise + readout
    print(f"mamba tiny forward FLOPs/token: {card['forward_flops_per_token']:,}; state bytes/sequence: "
          f"{card['state_bytes_per_sequence']:,}")


def test_server_engine_decodes_as_generate(serving_tools):
    """The server's slot cache holds each request's recurrent states (cache/state.py): requests of
    different lengths sharing decode steps, one joining later, give generate()'s tokens."""
    _, model = _pair()
    with torch.no_grad():  # sharpen the random model's logits so argmax is far from ties
        model.embed_tokens.weight.mul_(4)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, V, (n,), generator=g).tolist() for n in (3, 11, 20, 7)]
    max_new = [12, 5, 9, 10]
    ref = [generate(model, p, SamplingParams(max_new_tokens=m, temperature=0))[0] for p, m in zip(prompts, max_new)]
    assert serving_tools.served_greedy(model, prompts, max_new) == ref  # 3 at once, the 4th joins later


def test_compiled_decoding_caches_hold_the_states(serving_tools):
    """What generate(compile=True) does, run eagerly: a compiled prefill's collector (PrefillKV) hands
    the states to a StaticKVCache, whose static mode then updates them in place (no Python-side store
    in the compiled step); the logits are the full forward's."""
    _, model = _pair()
    serving_tools.static_steps_equal_full(model, torch.randint(3, V, (2, 12)), 6)


def test_bad_hf_config_values_name_the_key():
    hc = transformers.MambaConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2).to_dict()
    with pytest.raises(ConfigError, match="state_size is 0"):
        config_from_hf({**hc, "state_size": 0})
    with pytest.raises(ConfigError, match="time_step_rank"):
        config_from_hf({**hc, "time_step_rank": "big"})
    with pytest.raises(ConfigError, match="hidden_act='gelu'"):
        config_from_hf({**hc, "hidden_act": "gelu"})
