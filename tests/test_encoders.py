"""Encoder-only models (BERT, RoBERTa, ModernBERT) built from evolm's parts, exact against transformers.

First the shared embedding pieces (``embed_norm``, ``type_vocab_size``, ``pos_offset``,
``positions_from_mask``) against transformers' own embedding modules holding the same weights.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from evolm.config import ConfigError, ModelConfig  # noqa: E402
from evolm.model import Transformer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

V = 96


def _embeddings_of(model: Transformer, ids, **kw) -> torch.Tensor:
    """What the first block receives."""
    seen = {}
    hook = model.layers[0].register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0]))
    with torch.no_grad():
        model(ids, **kw)
    hook.remove()
    return seen["x"]


def _pushed(model):
    """Norm scales and biases off their 1 / 0 init, so a missed one shows."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def _encoder_config(**kw) -> ModelConfig:
    base = dict(vocab_size=V, d_model=32, n_layers=1, n_heads=4, max_seq_len=24, mask="bidirectional",
                norm_placement="post", final_norm=False, activation="gelu", embed_norm=True, norm_eps=1e-12)
    return ModelConfig(**{**base, **kw})


def test_bert_embeddings_match_transformers():
    """word + token type + position, then LayerNorm: transformers' BertEmbeddings on the same tables."""
    from transformers import BertConfig
    from transformers.models.bert.modeling_bert import BertEmbeddings

    model = _pushed(Transformer(_encoder_config(type_vocab_size=2)))
    ref = BertEmbeddings(BertConfig(vocab_size=V, hidden_size=32, max_position_embeddings=24, type_vocab_size=2,
                                    layer_norm_eps=1e-12)).eval()
    with torch.no_grad():
        ref.word_embeddings.weight.copy_(model.embed_tokens.weight)
        ref.position_embeddings.weight.copy_(model.pos_embed.weight)
        ref.token_type_embeddings.weight.copy_(model.type_embed.weight)
        ref.LayerNorm.weight.copy_(model.embed_norm.weight)
        ref.LayerNorm.bias.copy_(model.embed_norm.bias)
    ids = torch.randint(0, V, (2, 10))
    types = torch.randint(0, 2, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(_embeddings_of(model, ids, token_type_ids=types), ref(ids, token_type_ids=types),
                                   rtol=0, atol=1e-6)
        torch.testing.assert_close(_embeddings_of(model, ids), ref(ids), rtol=0, atol=1e-6)  # types default to 0
    with pytest.raises(ValueError, match="type_vocab_size=0"):
        Transformer(_encoder_config())(ids, token_type_ids=types)


@pytest.mark.parametrize("left", [True, False], ids=["left-pad", "right-pad"])
def test_roberta_positions_count_real_tokens(left, batch_tools):
    """RoBERTa's positions start at padding_idx + 1 and skip padding: pos_offset=2 with
    positions_from_mask equals transformers' RobertaEmbeddings (which reads the padding from the ids)."""
    from transformers import RobertaConfig
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings

    pad = 1
    model = _pushed(Transformer(_encoder_config(type_vocab_size=1, pos_offset=pad + 1, positions_from_mask=True)))
    ref = RobertaEmbeddings(RobertaConfig(vocab_size=V, hidden_size=32, max_position_embeddings=24 + pad + 1,
                                          type_vocab_size=1, layer_norm_eps=1e-12, pad_token_id=pad)).eval()
    assert ref.position_embeddings.weight.shape == model.pos_embed.weight.shape
    with torch.no_grad():
        for mine, theirs in ((model.embed_tokens, ref.word_embeddings), (model.pos_embed, ref.position_embeddings),
                             (model.type_embed, ref.token_type_embeddings), (model.embed_norm, ref.LayerNorm)):
            for name, p in theirs.named_parameters():
                p.copy_(getattr(mine, name))
    ids, mask, _ = batch_tools.padded_batch(V, [12, 7, 3], left=left)
    ids = ids.masked_fill(mask == 0, pad).masked_fill((ids == pad) & (mask == 1), pad + 1)
    with torch.no_grad():
        want = ref(ids)
    got = _embeddings_of(model, ids, attention_mask=mask)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # padding rows too: RoBERTa's padding position
    # counted over real tokens: a left-padded row embeds its tokens as the unpadded row would
    row = mask[2].bool()
    torch.testing.assert_close(got[2][row], _embeddings_of(model, ids[2:3, row])[0], rtol=0, atol=1e-6)


def test_pos_offset_shifts_the_table():
    """BART's learned positions: row p + offset, the table max_seq_len + offset rows long."""
    model = Transformer(_encoder_config(embed_norm=False, pos_offset=2)).eval()
    assert model.pos_embed.weight.shape[0] == 24 + 2
    ids = torch.randint(0, V, (1, 5))
    torch.testing.assert_close(_embeddings_of(model, ids), model.embed_tokens.weight[ids] + model.pos_embed.weight[2:7])
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(0, V, (1, 25)))


def test_embed_norm_on_rope_model():
    """ModernBERT: the token embedding alone, normed (no position table)."""
    model = _pushed(Transformer(_encoder_config(pos_emb="rope", norm_bias=False)))
    assert model.pos_embed is None and model.embed_norm.bias is None
    ids = torch.randint(0, V, (2, 6))
    want = torch.nn.functional.layer_norm(model.embed_tokens.weight[ids], (32,), model.embed_norm.weight, None, 1e-12)
    torch.testing.assert_close(_embeddings_of(model, ids), want)


def test_embedding_fields_are_validated():
    with pytest.raises(ConfigError, match="'pos_offset'.*pos_emb is 'rope'"):
        _encoder_config(pos_emb="rope", pos_offset=2)
    with pytest.raises(ConfigError, match="'type_vocab_size' must be >= 0"):
        _encoder_config(type_vocab_size=-1)
    with pytest.raises(ConfigError, match="'pos_offset' must be >= 0"):
        _encoder_config(pos_offset=-2)


# ============================================================================================
# whole models: transformers' classes built from a tiny config with random weights, read back
# ============================================================================================
BERT = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=40, initializer_range=0.1, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
# ModernBERT: 4 layers, global at 0 and 3 (every 3rd from 0), the others a window of 4 (2 each way:
# shorter than the test sequences); biases and norm biases on so that every weight is checked
MODERNBERT = dict(vocab_size=V, hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=40,
                  max_position_embeddings=64, initializer_range=0.1, local_attention=4, global_attn_every_n_layers=3,
                  global_rope_theta=1000.0, local_rope_theta=50.0, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  cls_token_id=1, sep_token_id=2)
MB_BIASED = dict(MODERNBERT, norm_bias=True, attention_bias=True, mlp_bias=True, classifier_bias=True)
# case -> (model_type, config.json keys, transformers class, padding sides compared)
CASES = {
    "bert-mlm": ("bert", dict(BERT), "BertForMaskedLM", ("left", "right")),
    "bert-classify": ("bert", dict(BERT, num_labels=3), "BertForSequenceClassification", ("right",)),
    "bert-token": ("bert", dict(BERT, num_labels=5), "BertForTokenClassification", ("left", "right")),
    "bert-embed": ("bert", dict(BERT), "BertModel", ("left", "right")),
    "roberta-mlm": ("roberta", dict(BERT, type_vocab_size=1, pad_token_id=1, max_position_embeddings=42),
                    "RobertaForMaskedLM", ("left", "right")),
    "roberta-classify": ("roberta", dict(BERT, pad_token_id=1, num_labels=3, hidden_act="gelu_new"),
                         "RobertaForSequenceClassification", ("right",)),
    "roberta-token": ("roberta", dict(BERT, pad_token_id=1, num_labels=4), "RobertaForTokenClassification",
                      ("left", "right")),
    "modernbert-mlm": ("modernbert", dict(MB_BIASED), "ModernBertForMaskedLM", ("left", "right")),
    "modernbert-mlm-plain": ("modernbert", dict(MODERNBERT, decoder_bias=False, classifier_activation="silu"),
                             "ModernBertForMaskedLM", ("left", "right")),
    "modernbert-classify": ("modernbert", dict(MB_BIASED, num_labels=3), "ModernBertForSequenceClassification",
                            ("right",)),
    "modernbert-classify-mean": ("modernbert", dict(MODERNBERT, num_labels=2, classifier_pooling="mean"),
                                 "ModernBertForSequenceClassification", ("left", "right")),
    "modernbert-token": ("modernbert", dict(MB_BIASED, num_labels=5), "ModernBertForTokenClassification",
                         ("left", "right")),
}
LENGTHS = [12, 7, 3]
PAD = {"bert": 0, "roberta": 1, "modernbert": 0}


def tiny_hf_encoder(case: str, attn: str = "eager"):
    """A seeded transformers encoder whose norms and biases are not at their 1 / 0 init."""
    mt, keys, cls_name, _ = CASES[case]
    cfg = transformers.AutoConfig.for_model(mt, **keys)
    torch.manual_seed(0)
    m = getattr(transformers, cls_name)._from_config(cfg, attn_implementation=attn, dtype=torch.float32)
    return _pushed(m)


def hf_output(hf, ids, mask, types=None) -> torch.Tensor:
    """The task output: logits, or for a bare encoder its mean-pooled last hidden state."""
    kw = {} if types is None else {"token_type_ids": types}
    with torch.no_grad():
        out = hf(input_ids=ids, attention_mask=mask, **kw)
    if hasattr(out, "logits"):
        return out.logits
    m = mask.unsqueeze(-1).float()
    return (out.last_hidden_state * m).sum(1) / m.sum(1)


def batch(case: str, left: bool, batch_tools):
    """A padded batch whose padding is the family's pad token (RoBERTa finds its padding by it)."""
    pad = PAD[CASES[case][0]]
    ids, mask, _ = batch_tools.padded_batch(V, LENGTHS, left=left)
    ids = ids.masked_fill((ids == pad) & (mask == 1), pad + 1).masked_fill(mask == 0, pad)
    return ids, mask


def compare(want: torch.Tensor, got: torch.Tensor, mask: torch.Tensor) -> float:
    """max |diff| over real positions of per-token outputs, over everything of per-sequence ones."""
    assert want.shape == got.shape, (want.shape, got.shape)
    if want.ndim == 3:
        keep = mask.bool()
        want, got = want[keep], got[keep]
    return (want - got).abs().max().item()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """case -> (transformers model, evolm model read back from its save_pretrained folder)."""
    from evolm.interop.hf import load_hf_folder
    made: dict = {}

    def get(case: str):
        if case not in made:
            hf = tiny_hf_encoder(case)
            folder = tmp_path_factory.mktemp(case)
            hf.save_pretrained(folder)
            made[case] = (hf, load_hf_folder(folder))
        return made[case]

    return get


# [CLS] pooling of a left-padded row reads a padding slot: those classifiers are compared right-padded
@pytest.mark.parametrize("case,side", [(c, s) for c in CASES for s in CASES[c][3]])
def test_outputs_match_transformers(case, side, pair, batch_tools):
    hf, ours = pair(case)
    ids, mask = batch(case, side == "left", batch_tools)
    with torch.no_grad():
        got = ours(ids, attention_mask=mask)
    diff = compare(hf_output(hf, ids, mask), got, mask)
    print(f"parity {case} {side}-padded: max |diff| {diff:.2e} (scale {got.abs().max().item():.2f})")
    assert diff <= 1e-4, f"{case} {side}-padded: max |diff| {diff:.2e}"


def test_token_types_reach_the_model(pair, batch_tools):
    """BERT with segment ids (sentence A / B) equals transformers given the same token_type_ids."""
    hf, ours = pair("bert-mlm")
    ids, mask = batch("bert-mlm", False, batch_tools)
    types = (torch.arange(ids.shape[1]) >= 4).long().expand_as(ids) * mask
    with torch.no_grad():
        got = ours(ids, attention_mask=mask, token_type_ids=types)
    assert compare(hf_output(hf, ids, mask, types), got, mask) <= 1e-4
    assert compare(hf_output(hf, ids, mask), got, mask) > 1e-3  # the types matter


def test_sdpa_path_matches(batch_tools):
    """The same against transformers' SDPA attention (the windowed ModernBERT and BERT)."""
    from evolm.interop.hf import build_from_state_dict, config_from_hf, state_dict_from_hf
    for case in ("bert-mlm", "modernbert-mlm"):
        hf = tiny_hf_encoder(case, attn="sdpa")
        c = config_from_hf(hf.config.to_dict())
        ours = build_from_state_dict(c, state_dict_from_hf(hf.state_dict(), c, hf.config.model_type))
        ids, mask = batch(case, True, batch_tools)
        with torch.no_grad():
            got = ours(ids, attention_mask=mask)
        assert compare(hf_output(hf, ids, mask), got, mask) <= 1e-4, case


def test_modernbert_case_exercises_each_part(pair, batch_tools):
    """The tiny ModernBERT is sensitive to its window, its layer phase and its local RoPE base:
    switching one off (same weights) moves the logits past the tolerance."""
    from evolm.interop.hf import build_from_state_dict
    hf, ours = pair("modernbert-mlm")
    c = ours.config
    assert [c.layer_is_local(i) for i in range(4)] == [False, True, True, False]
    assert (c.sliding_window, c.rope_theta, c.rope_local_theta) == (4, 1000.0, 50.0)
    ids, mask = batch("modernbert-mlm", False, batch_tools)
    want = hf_output(hf, ids, mask)
    for change in (dict(sliding_window=None, sliding_window_pattern=1, global_layer_first=False,
                        rope_local_theta=None),
                   dict(global_layer_first=False), dict(rope_local_theta=None)):
        other = build_from_state_dict(c.replace(**change), ours.state_dict())
        with torch.no_grad():
            diff = compare(want, other(ids, attention_mask=mask), mask)
        assert diff > 1e-3, f"modernbert without {change}: still within {diff:.1e}"


def test_modernbert_config_spellings():
    """transformers 5's layer_types + rope_parameters read as the published global_*/local_* keys."""
    from evolm.interop.hf import config_from_hf
    old = config_from_hf({"model_type": "modernbert", **MODERNBERT})
    new = {k: v for k, v in MODERNBERT.items() if k not in ("global_rope_theta", "local_rope_theta",
                                                            "global_attn_every_n_layers")}
    new.update(layer_types=["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
               rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1000.0},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}})
    assert config_from_hf({"model_type": "modernbert", **new}).diff(old) == {}
    with pytest.raises(ConfigError, match="cannot be expressed"):
        config_from_hf({"model_type": "modernbert", **new, "layer_types": [
            "sliding_attention", "full_attention", "sliding_attention", "full_attention"]})


def test_encoder_config_errors():
    from evolm.interop.hf import config_from_hf
    with pytest.raises(ConfigError, match="architectures 'BertForNextSentencePrediction' is not supported"):
        config_from_hf({"model_type": "bert", **BERT, "architectures": ["BertForNextSentencePrediction"]})
    with pytest.raises(ConfigError, match="position_embedding_type 'relative_key'"):
        config_from_hf({"model_type": "bert", **BERT, "position_embedding_type": "relative_key"})
    with pytest.raises(ConfigError, match="is_decoder"):
        config_from_hf({"model_type": "roberta", **BERT, "is_decoder": True})
    with pytest.raises(ConfigError, match="'head' 'classify' reads a whole sequence"):
        ModelConfig(head="classify")


def test_load_reads_a_saved_folder(tmp_path, batch_tools):
    """evolm.load (the one door) opens a transformers encoder folder."""
    from evolm.loading import load
    hf = tiny_hf_encoder("roberta-mlm")
    hf.save_pretrained(tmp_path / "r")
    model, _ = load(tmp_path / "r")
    ids, mask = batch("roberta-mlm", True, batch_tools)
    with torch.no_grad():
        assert compare(hf_output(hf, ids, mask), model(ids, attention_mask=mask), mask) <= 1e-4
    assert model.config.head == "lm" and model.config.pos_offset == 2


def test_pretrained_bert_layout_with_pooler_and_nsp(batch_tools):
    """Hub BERT checkpoints (bert-base-uncased) are BertForMaskedLM folders that still hold the
    pooler, the next-sentence head and a tied copy of the decoder: read, the unused ones dropped."""
    from evolm.interop.hf import build_from_state_dict, config_from_hf, state_dict_from_hf
    from transformers import BertConfig, BertForPreTraining
    hf = _pushed(BertForPreTraining(BertConfig(**BERT)))
    sd = dict(hf.state_dict())
    sd["cls.predictions.decoder.weight"] = sd["bert.embeddings.word_embeddings.weight"]
    c = config_from_hf({"model_type": "bert", **BERT, "architectures": ["BertForMaskedLM"]})
    ours = build_from_state_dict(c, state_dict_from_hf(sd, c, "bert"))
    ids, mask = batch("bert-mlm", False, batch_tools)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).prediction_logits
        assert compare(want, ours(ids, attention_mask=mask), mask) <= 1e-4
    from evolm.interop.empty import WeightsError
    with pytest.raises(WeightsError, match="no place"):
        state_dict_from_hf({**sd, "cls.mystery.weight": torch.zeros(2)}, c, "bert")


# ============================================================================================
# export: evolm -> Hugging Face folder -> transformers
# ============================================================================================
EBASE = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=40, mask="bidirectional",
             norm="layernorm", norm_eps=1e-12, norm_placement="post", final_norm=False, activation="gelu",
             qkv_bias=True, o_bias=True, mlp_bias=True, embed_norm=True, type_vocab_size=2, init_std=0.1)
EMB = dict(EBASE, n_layers=4, d_ff=40, norm_eps=1e-5, norm_bias=False, norm_placement="pre", final_norm=True,
           first_attn_norm=False, pos_emb="rope", rope_theta=1000.0, rope_local_theta=50.0, sliding_window=4,
           sliding_window_pattern=3, global_layer_first=True, mlp="glu", qkv_bias=False, o_bias=False,
           mlp_bias=False, type_vocab_size=0, head_transform=True, head_dense_bias=False)
EXPORTS = {  # name -> (ModelConfig fields, family, transformers class)
    "bert-mlm": (dict(EBASE, head_transform=True, lm_head_bias=True), "bert", "BertForMaskedLM"),
    "bert-classify": (dict(EBASE, head="classify", pooler=True, num_labels=3), "bert", "BertForSequenceClassification"),
    "bert-token": (dict(EBASE, head="token_classify", num_labels=4), "bert", "BertForTokenClassification"),
    "bert-embed": (dict(EBASE, head="embed", pooling="mean"), "bert", "BertModel"),
    "roberta-mlm": (dict(EBASE, pos_offset=2, positions_from_mask=True, type_vocab_size=1, head_transform=True,
                         lm_head_bias=True), "roberta", "RobertaForMaskedLM"),
    "roberta-classify": (dict(EBASE, pos_offset=2, positions_from_mask=True, head="classify", pooler=True,
                              num_labels=2, activation="gelu_tanh"), "roberta", "RobertaForSequenceClassification"),
    "modernbert-mlm": (dict(EMB, lm_head_bias=True), "modernbert", "ModernBertForMaskedLM"),
    "modernbert-classify": (dict(EMB, norm_bias=True, qkv_bias=True, o_bias=True, mlp_bias=True, head_dense_bias=True,
                                 head="classify", pooling="mean", num_labels=3, head_activation="silu"),
                            "modernbert", "ModernBertForSequenceClassification"),
}


@pytest.mark.parametrize("name", list(EXPORTS))
def test_export_loads_in_transformers(name, tmp_path, batch_tools):
    from evolm.interop.hf import hf_family, load_hf_folder, save_hf_folder
    fields, family, cls_name = EXPORTS[name]
    torch.manual_seed(0)
    model = _pushed(Transformer(ModelConfig(name=name, **fields)))
    assert hf_family(model.config) == family
    folder = save_hf_folder(model, tmp_path / name)
    assert json.loads((folder / "config.json").read_text())["architectures"] == [cls_name]
    hf, info = getattr(transformers, cls_name).from_pretrained(folder, attn_implementation="eager",
                                                              dtype=torch.float32, output_loading_info=True)
    # a bare BertModel has a pooler that evolm's sentence embeddings do not read
    bad = {k: [n for n in v if not n.startswith("pooler.")] for k, v in info.items()
           if k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    assert not any(bad.values()), f"transformers did not load every weight: {bad}"
    case = {"bert": "bert-mlm", "roberta": "roberta-mlm", "modernbert": "modernbert-mlm"}[family]
    ids, mask = batch(case, name.endswith(("mlm", "embed", "token")), batch_tools)
    with torch.no_grad():
        got = model(ids, attention_mask=mask)
    diff = compare(hf_output(hf.eval(), ids, mask), got, mask)
    assert diff <= 1e-4, f"{name}: transformers vs evolm max |diff| {diff:.2e}"
    back = load_hf_folder(folder)  # ... and reads back into evolm: same config, same outputs
    assert back.config.diff(model.config) == {}
    with torch.no_grad():
        assert torch.equal(back(ids, attention_mask=mask), got)


def test_decoder_families_refuse_encoder_parts():
    """A decoder config with an encoder part is not silently written as a decoder."""
    from evolm.interop.hf import config_to_hf
    llama = dict(vocab_size=V, d_model=32, n_layers=1, n_heads=4, norm="rmsnorm", pos_emb="rope", mlp="glu",
                 activation="silu", mlp_bias=False)
    for extra, field in ((dict(embed_norm=True), "embed_norm"), (dict(mask="bidirectional"), "mask"),
                         (dict(lm_head_bias=True, tie_embeddings=False), "lm_head_bias")):
        with pytest.raises(ConfigError, match=f"field '{field}'"):
            config_to_hf(ModelConfig(**llama, **extra), model_type="llama")


@pytest.mark.parametrize("name", ["bert-base", "bert-large", "roberta-base", "roberta-large", "modernbert-base",
                                  "modernbert-large", "tiny-bert", "tiny-roberta", "tiny-modernbert"])
def test_preset_equals_transformers_masked_lm(name):
    """Each encoder preset, written as config.json, is transformers' masked-LM model of exactly as many
    parameters (and the cost card counts the same)."""
    from evolm.analysis import cost_card
    from evolm.interop.hf import config_to_hf
    from evolm.model import build
    from evolm.presets import get_preset
    c = get_preset(name)
    h = config_to_hf(c)
    cfg = transformers.AutoConfig.for_model(**{k: v for k, v in h.items() if k != "architectures"})
    with torch.device("meta"):
        hf = getattr(transformers, h["architectures"][0])(cfg)
    ours = sum(p.numel() for p in build(c, device="meta").parameters())
    assert ours == sum(p.numel() for p in hf.parameters()) == cost_card(c)["params_total"], name


def test_head_losses_are_cross_entropies_of_their_outputs():
    """With targets, each head's loss is the plain cross-entropy of the output it returns (the masked
    LM through the fused head loss: transform and decoder bias included, positions unshifted)."""
    torch.manual_seed(0)
    ids = torch.randint(0, V, (2, 9))
    mask = torch.ones_like(ids)
    for fields, targets in ((dict(EBASE, head_transform=True, lm_head_bias=True),
                             torch.full((2, 9), -100).index_put_((torch.tensor([0, 1]), torch.tensor([3, 5])),
                                                                 torch.tensor([7, 11]))),
                            (dict(EBASE, head="classify", pooler=True, num_labels=3), torch.tensor([2, 0])),
                            (dict(EBASE, head="token_classify", num_labels=4), torch.randint(0, 4, (2, 9)))):
        model = _pushed(Transformer(ModelConfig(**fields)))
        with torch.no_grad():
            out = model(ids, attention_mask=mask)
            loss = model(ids, attention_mask=mask, targets=targets)
        want = torch.nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1), ignore_index=-100)
        torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    embed = Transformer(ModelConfig(**dict(EBASE, head="embed", pooling="mean")))
    with pytest.raises(ValueError, match="head='embed' has no loss"):
        embed(ids, targets=targets)
    with pytest.raises(ValueError, match="head='embed' has none"):
        embed(ids, last_only=True)


def test_mean_pooling_ignores_padding():
    """head='embed' with mean pooling: a padded row embeds as the same row unpadded."""
    model = _pushed(Transformer(ModelConfig(**dict(EBASE, head="embed", pooling="mean"))))
    ids = torch.randint(1, V, (1, 6))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], 1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], 1).long()
    with torch.no_grad():
        torch.testing.assert_close(model(padded, attention_mask=mask), model(ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_prediction_equals_the_dense_head(dtype):
    """The masked-LM loss through the head at the masked positions only (ModernBERT's sparse
    prediction, model.sparse_prediction) equals the dense head's loss over every position, in value
    and in every gradient (final norm, BERT's transform and bias, the tied embedding, the blocks)."""
    torch.manual_seed(0)
    c = _encoder_config(n_layers=2, final_norm=True, head_transform=True, lm_head_bias=True,
                        tie_embeddings=True, norm_placement="pre")
    model = _pushed(Transformer(c)).train()
    ids = torch.randint(0, V, (3, 24))
    targets = torch.where(torch.rand(3, 24) < 0.15, torch.randint(0, V, (3, 24)), -100)
    targets[0, :2] = torch.tensor([5, 7])  # at least a few selected positions

    def grads(loss):
        model.zero_grad()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    rows = []
    hook = model.head.dense.register_forward_hook(lambda m, a, out: rows.append(a[0].shape[:-1].numel()))
    with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
        sparse = grads(model(ids, targets=targets))
        assert rows == [(targets != -100).sum().item()]  # the head ran at the masked positions alone
        hook.remove()
        h = model(ids, return_hidden=True)  # every position through norm + transform
        logits = torch.nn.functional.linear(h, *model.head_weight_bias()).float()
        dense = grads(torch.nn.functional.cross_entropy(logits.reshape(-1, V), targets.reshape(-1)))
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert abs(sparse[0] - dense[0]) <= tol * max(1.0, dense[0].abs().item())
    for n, g in dense[1].items():
        assert torch.allclose(sparse[1][n], g, atol=tol, rtol=tol), n
