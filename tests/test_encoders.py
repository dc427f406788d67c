"""Encoder-only models (BERT, RoBERTa, ModernBERT) built from evolm's parts, exact against transformers.

First the shared embedding pieces (``embed_norm``, ``type_vocab_size``, ``pos_offset``,
``positions_from_mask``) against transformers' own embedding modules holding the same weights.
"""

from __future__ import annotations

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
