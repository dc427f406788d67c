"""Llama 3.2 Vision (Mllama) in evolm's one Transformer, against transformers' Mllama models built
from tiny configs with random weights (docs/vision.md)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evolm.cache import KVCache
from evolm.config import ConfigError, ModelConfig, VisionConfig
from evolm.interop.families.mllama import name_from_hf, state_dict_from_hf
from evolm.model import Transformer
from evolm.nn.vision import VisionEncoder

transformers = pytest.importorskip("transformers")

VISION = dict(d_model=32, n_layers=4, n_global_layers=2, n_heads=4, d_ff=64, image_size=16, patch_size=4,
              intermediate_layers=(3, 1))


def hf_vision_config():
    return transformers.MllamaVisionConfig(
        hidden_size=32, num_hidden_layers=4, num_global_layers=2, attention_heads=4, intermediate_size=64,
        vision_output_dim=96, image_size=16, patch_size=4, max_num_tiles=4, intermediate_layers_indices=[3, 1])


V = 97  # the text vocabulary; <|image|> is id V, the first of the 8 extra embedding rows


def tiny_config() -> ModelConfig:
    return ModelConfig(vocab_size=V, d_model=32, n_layers=5, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=64,
                       norm="rmsnorm", pos_emb="rope", mlp="glu", activation="silu", mlp_bias=False,
                       tie_embeddings=False, vision=VisionConfig(**VISION, cross_attention_layers=(1, 3), image_token_id=V))


def hf_model():
    text = transformers.MllamaTextConfig(
        vocab_size=V, hidden_size=32, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, cross_attention_layers=[1, 3], max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    config = transformers.MllamaConfig(vision_config=hf_vision_config(), text_config=text, image_token_index=V)
    return randomize(transformers.MllamaForConditionalGeneration(config))


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    ref = hf_model()
    ours = Transformer(tiny_config()).eval()
    ours.load_state_dict(state_dict_from_hf(ref.state_dict()), strict=True)
    return ref, ours


def image_inputs(T: int = 9, image_at: int = 2):
    """Two rows, one image each at ``image_at``: a 2x2 tiling, and a 1x2 one with two padding tiles;
    text tokens see the image from its token on (as the processor's cross_attention_mask says)."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, V, (2, T), generator=g)
    ids[:, image_at] = V
    xm = torch.zeros(2, T, 1, 4, dtype=torch.long)
    xm[0, image_at:, 0, :] = 1
    xm[1, image_at:, 0, :2] = 1
    return ids, dict(pixel_values=torch.randn(2, 1, 4, 3, 16, 16, generator=g), aspect_ratio_ids=torch.tensor([[6], [2]]),
                     aspect_ratio_mask=torch.tensor([[[1, 1, 1, 1]], [[1, 1, 0, 0]]]), cross_attention_mask=xm)


def test_logits_match_mllama_with_and_without_images(pair):
    ref, ours = pair
    ids, images = image_inputs()
    with torch.no_grad():
        want, got = ref(input_ids=ids, **images).logits, ours(ids, **images)
        want_text, got_text = ref(input_ids=ids).logits, ours(ids)
    assert (got - want).abs().max().item() <= 1e-4
    assert (got_text - want_text).abs().max().item() <= 1e-4
    # the image reaches the text from its token on, and only there
    assert (got[:, 2:] - got_text[:, 2:]).abs().max() > 1e-2
    assert (got[:, :2] - got_text[:, :2]).abs().max() > 1e-3  # (the masked rows still attend, as in transformers)


def test_cached_greedy_decoding_matches_mllama_generate(pair):
    ref, ours = pair
    ids, images = image_inputs()
    n_new = 8
    with torch.no_grad():
        want = ref.generate(input_ids=ids, **images, max_new_tokens=n_new, do_sample=False)[:, ids.shape[1]:]
        assert len(set(want.flatten().tolist())) > 1
        cache, xm = KVCache(2, 64), images.pop("cross_attention_mask")
        cross = ours.encode_images(**images)  # the encoder runs once; each layer's image keys/values are cached
        step = ours(ids, cache=cache, cross=cross, cross_attention_mask=xm, last_only=True)[:, -1].argmax(-1)
        got = [step]
        for _ in range(n_new - 1):  # a new token sees what the prompt's last token saw
            step = ours(step[:, None], cache=cache, cross=cross, cross_attention_mask=xm[:, -1:], last_only=True)
            got.append(step[:, -1].argmax(-1))
            step = got[-1]
    assert torch.equal(torch.stack(got, 1), want)
    assert len(cross._kv) == 2  # one projection per cross-attention layer


def randomize(model, scale=0.2):
    """Every weight random, the gates too (transformers initialises them at 0 or pi/4); norm scales
    near 1 and a large head, so that greedy decoding does not repeat one token."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) * (1.0 if "lm_head" in name else scale))
    return model.eval()


def test_vision_encoder_matches_mllama_vision_model():
    torch.manual_seed(0)
    ref = randomize(transformers.MllamaVisionModel(hf_vision_config()))
    ours = VisionEncoder(VisionConfig(**VISION)).eval()
    ours.load_state_dict({name_from_hf("model.vision_model." + k)[len("vision_model."):]: t
                          for k, t in ref.state_dict().items()})
    px = torch.randn(2, 1, 4, 3, 16, 16)
    ar_ids = torch.tensor([[6], [2]])  # a 2x2 tiling, and a 1x2 one with two padding tiles
    ar_mask = torch.tensor([[[1, 1, 1, 1]], [[1, 1, 0, 0]]])
    with torch.no_grad():
        want = ref(pixel_values=px, aspect_ratio_ids=ar_ids, aspect_ratio_mask=ar_mask).last_hidden_state
        got = ours(px, ar_ids, ar_mask)
    assert got.shape == want.shape == (2, 1, 4, 17, 96)
    assert (got - want).abs().max().item() <= 1e-5


def test_vision_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="vision.patch_size"):
        ModelConfig(vision=VisionConfig(**{**VISION, "patch_size": 5}))
    with pytest.raises(ConfigError, match="vision.intermediate_layers"):
        ModelConfig(vision=VisionConfig(**{**VISION, "intermediate_layers": (7,)}))
    with pytest.raises(ConfigError, match="vision.cross_attention_layers"):
        ModelConfig(n_layers=4, vision=VisionConfig(**VISION, cross_attention_layers=(4,)))
    with pytest.raises(ConfigError, match="unknown VisionConfig field 'vision.patch'"):
        ModelConfig.from_dict({"vision": {"patch": 4}})
    with pytest.raises(ConfigError, match="'vision.image_size' must be int"):
        ModelConfig.from_dict({"vision": {"image_size": "16"}})


def test_vision_config_round_trips_through_json():
    c = ModelConfig(n_layers=4, norm="rmsnorm", vision=VisionConfig(**VISION, cross_attention_layers=(1, 3)))
    back = ModelConfig.from_dict(__import__("json").loads(c.to_json()))
    assert back == c and back.vision.supported_aspect_ratios[1] == (1, 2)
    assert c.vision.patches_per_tile == 17 and c.vision.output_dim == 96
    assert [c.layer_is_cross(i) for i in range(4)] == [False, True, False, True]


def test_image_inputs_match_mllama_image_processor():
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

    from evolm.images import CLIP_MEAN, CLIP_STD, image_inputs

    g = np.random.default_rng(0)
    rows = [[g.integers(0, 256, (20, 40, 3), dtype=np.uint8), g.integers(0, 256, (70, 9, 3), dtype=np.uint8)],
            [g.integers(0, 256, (8, 8, 3), dtype=np.uint8)], [g.integers(0, 256, (100, 60, 3), dtype=np.uint8)]]
    proc = MllamaImageProcessorPil(size={"height": 16, "width": 16}, max_image_tiles=4,
                                   image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD))
    want = proc(rows, return_tensors="pt")
    got = image_inputs(rows, VisionConfig(**VISION))
    assert got["num_tiles"] == want["num_tiles"]
    for key in ("aspect_ratio_ids", "aspect_ratio_mask"):
        assert torch.equal(got[key], want[key]), key
    assert (got["pixel_values"] - want["pixel_values"]).abs().max().item() <= 1e-5


def test_cross_attention_mask_matches_mllama_processor():
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense, get_cross_attention_token_mask)

    from evolm.images import cross_attention_mask

    ids = [[5, V, 7, 8, V, V, 9, 3], [V, 4, 4, 4, 4, 4, 4, 4], [1, 2, 3, V, 5, 6, 7, 8]]
    num_tiles = [[2, 1, 4], [3], [1]]
    want = convert_sparse_cross_attention_mask_to_dense(
        [get_cross_attention_token_mask(r, V) for r in ids], num_tiles, 4, 8)
    assert torch.equal(cross_attention_mask(torch.tensor(ids), V, num_tiles, 4), torch.from_numpy(want))


def test_hf_folder_load_and_export_round_trip(pair, tmp_path):
    """transformers' folder -> evolm (config.json + weights) -> a folder transformers loads again."""
    from evolm.interop.hf import config_to_hf, load_hf_folder, save_hf_folder

    ref, ours = pair
    ref.save_pretrained(tmp_path / "hf")
    loaded = load_hf_folder(tmp_path / "hf")
    assert loaded.config.vision == ours.config.vision
    assert config_to_hf(loaded.config)["model_type"] == "mllama"
    save_hf_folder(loaded, tmp_path / "ours")
    back = transformers.MllamaForConditionalGeneration.from_pretrained(tmp_path / "ours").eval()
    ids, images = image_inputs()
    with torch.no_grad():
        want = ref(input_ids=ids, **images).logits
        assert (loaded(ids, **images) - want).abs().max().item() <= 1e-4
        assert (back(input_ids=ids, **images).logits - want).abs().max().item() <= 1e-4


def test_11b_vision_preset_parameter_count_equals_transformers():
    import evolm

    text = transformers.MllamaTextConfig(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    config = transformers.MllamaConfig(vision_config=transformers.MllamaVisionConfig(image_size=560), text_config=text)
    with torch.device("meta"):
        ref = transformers.MllamaForConditionalGeneration(config)
    ours = evolm.build("llama-3.2-11b-vision", device="meta")
    n = sum(p.numel() for p in ours.parameters())
    assert n == sum(p.numel() for p in ref.parameters()) == 10_670_220_835
    assert n == pytest.approx(ours.config.meta["params"], rel=1e-3)
    from evolm.interop.hf import config_from_hf, config_to_hf
    assert config_from_hf(config_to_hf(ours.config)).vision == ours.config.vision


def test_mllama_defaults_match_transformers():
    from evolm.interop.families.mllama import TEXT_DEFAULTS, VISION_DEFAULTS

    text, vision = transformers.MllamaTextConfig(), transformers.MllamaVisionConfig()
    for key, want in TEXT_DEFAULTS.items():
        got = text.rope_parameters["rope_theta"] if key == "rope_theta" else getattr(text, key)
        assert got == want, key
    for key, want in VISION_DEFAULTS.items():
        assert getattr(vision, key) == want, key


class ImageTask:
    """One fixed batch of two captioned images (the loop's Task protocol)."""

    def __init__(self):
        self.ids, self.images = image_inputs()

    def start_phase(self, index, phase):
        pass

    def next_batch(self):
        return self.ids

    def loss(self, model, ids):
        return model(ids[:, :-1], targets=ids[:, 1:], **{**self.images, "cross_attention_mask":
                                                         self.images["cross_attention_mask"][:, :-1]}), {}

    def evaluate(self, model):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, s):
        pass


def test_recipe_freeze_text_keeps_the_text_model_fixed(tmp_path):
    from evolm.train.freeze import frozen_names
    from evolm.train.loop import LoopConfig, Phase, run
    from evolm.train.recipe import recipe_from_dict

    torch.manual_seed(0)
    model = Transformer(tiny_config())
    with torch.no_grad():  # open the gates (0 at initialisation: no gradient would reach the image side)
        for name, p in model.named_parameters():
            if name.endswith("_gate"):
                p.fill_(0.5)
    cfg = LoopConfig.from_recipe(recipe_from_dict({"model": {"preset": "tiny-llama"}, "tokenizer": {"path": "t.json"},
                                                   "data": {"sources": ["x"]},
                                                   "train": {"freeze": ["text"]}}))
    assert cfg.freeze == ["text"]
    cfg.lr, cfg.weight_decay, cfg.log_every, cfg.eval_every, cfg.ckpt_every = 1e-2, 0.0, 1, 0, 0
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    run(model, ImageTask(), [Phase("stage1", steps=1)], cfg, tmp_path, log=lambda s: None)
    frozen = frozen_names(model, ["text"])
    assert "embed_tokens.weight" in frozen and "layers.0.self_attn.q_proj.weight" in frozen
    assert "layers.1.cross_attn.q_proj.weight" not in frozen and "lm_head.weight" in frozen
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert not changed & frozen
    for n in ("layers.1.cross_attn.q_proj.weight", "layers.3.attn_gate", "multi_modal_projector.weight",
              "vision_model.layers.0.self_attn.q_proj.weight", "vision_model.patch_embedding.weight"):
        assert n in changed, n
    with pytest.raises(ValueError, match="pattern 'nothing.*' matches no parameter"):
        frozen_names(model, ["nothing.*"])


def test_cost_card_vision_rows_match_the_model():
    """Parameters by part against the built model; the image FLOPs against torch's FLOP counter (on
    the meta device, where masked attention is counted as matmuls) and the cross-attention KV bytes
    against the CrossCache of a real forward pass."""
    from torch.utils.flop_counter import FlopCounterMode

    import evolm
    from evolm.analysis.cost import cost_card, format_card

    torch.manual_seed(0)
    model = Transformer(tiny_config()).eval()
    T = 9
    card = cost_card(model.config, context_len=T, bytes_per_value=4)
    assert card["params_total"] == sum(p.numel() for p in model.parameters())
    assert card["params_by_part"]["vision"] == sum(p.numel() for n, p in model.named_parameters()
                                                   if n.startswith(("vision_model.", "multi_modal_projector.")))
    assert card["image_tokens_per_image"] == 4 * 17
    ids, images = image_inputs(T)
    xm = images.pop("cross_attention_mask")
    ids, xm, images = ids[:1], xm[:1], {k: v[:1] for k, v in images.items()}  # one image, all 4 tiles
    cache = KVCache(1, T)
    with torch.no_grad():
        cross = model.encode_images(**images)
        model(ids, cross=cross, cross_attention_mask=xm, cache=cache)
    assert cross.nbytes() == card["cross_kv_cache_bytes_per_image"]
    assert cache.nbytes() == card["kv_cache_bytes_at_context"]  # the 3 self-attention layers only

    meta = evolm.build(model.config, device="meta")
    on_meta = {k: v.to("meta") for k, v in images.items()}
    with torch.no_grad(), FlopCounterMode(display=False) as enc:
        cross = meta.encode_images(**on_meta)
    by_part = card["vision_flops_by_part"]
    assert enc.get_total_flops() == by_part["encoder"] + by_part["encoder_attention"] + by_part["projector"]
    with torch.no_grad(), FlopCounterMode(display=False) as fwd:
        meta(ids.to("meta"), cross=cross, cross_attention_mask=xm.to("meta"))
    # torch counts no norm or gate scaling (nor bias: the text model has none)
    small = card["params_by_part"]["norms"] + 2 * len(model.config.vision.cross_attention_layers)
    assert fwd.get_total_flops() == T * (card["forward_flops_per_token"] - 2 * small) + by_part["cross_kv"]
    assert "image tokens / image" in format_card(card)
    big = cost_card("llama-3.2-11b-vision")
    assert big["image_tokens_per_image"] == 4 * 1601
    assert big["params_by_part"]["vision"] == 863_567_379 + 7680 * 4096 + 4096  # transformers' encoder + projector


def test_gguf_export_refuses_a_vision_model():
    """llama.cpp has no Mllama graph: exporting would silently drop the image side."""
    from evolm.interop.gguf_export import ExportError, gguf_architecture

    with pytest.raises(ExportError, match="is a mllama model"):
        gguf_architecture(tiny_config())


def test_two_images_per_row_and_a_padding_image_match_mllama(pair):
    """Row 0 holds two images (its text sees the first, then the second); row 1 one image and a
    padding one (aspect ratio id 0), as the processor batches them."""
    ref, ours = pair
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, V, (2, 10), generator=g)
    ids[0, 1] = ids[0, 5] = ids[1, 3] = V
    xm = torch.zeros(2, 10, 2, 4, dtype=torch.long)
    xm[0, 1:5, 0, :4] = 1
    xm[0, 5:, 1, :2] = 1
    xm[1, 3:, 0, :1] = 1
    images = dict(pixel_values=torch.randn(2, 2, 4, 3, 16, 16, generator=g), aspect_ratio_ids=torch.tensor([[6, 2], [1, 0]]),
                  aspect_ratio_mask=torch.tensor([[[1, 1, 1, 1], [1, 1, 0, 0]], [[1, 0, 0, 0], [1, 0, 0, 0]]]),
                  cross_attention_mask=xm)
    with torch.no_grad():
        want, got = ref(input_ids=ids, **images).logits, ours(ids, **images)
    assert (got - want).abs().max().item() <= 1e-4


def test_bfloat16_logits_stay_within_a_bf16_step_of_mllama(pair):
    import copy

    ref, ours = (copy.deepcopy(m).to(torch.bfloat16) for m in pair)
    ids, images = image_inputs()
    images = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in images.items()}
    with torch.no_grad():
        want, got = ref(input_ids=ids, **images).logits.float(), ours(ids, **images).float()
    assert (got - want).abs().max().item() <= 2 * 2.0 ** -7 * want.abs().max().item()  # two bf16 steps
