"""Llama 3.2 Vision (Mllama) in evolm's one Transformer, against transformers' Mllama models built
from tiny configs with random weights (docs/vision.md)."""

from __future__ import annotations

import pytest
import torch

from evolm.config import ConfigError, ModelConfig, VisionConfig
from evolm.interop.families.mllama import name_from_hf
from evolm.nn.vision import VisionEncoder

transformers = pytest.importorskip("transformers")

VISION = dict(d_model=32, n_layers=4, n_global_layers=2, n_heads=4, d_ff=64, image_size=16, patch_size=4,
              intermediate_layers=(3, 1))


def hf_vision_config():
    return transformers.MllamaVisionConfig(
        hidden_size=32, num_hidden_layers=4, num_global_layers=2, attention_heads=4, intermediate_size=64,
        vision_output_dim=96, image_size=16, patch_size=4, max_num_tiles=4, intermediate_layers_indices=[3, 1])


def randomize(model, scale=0.2):
    """Every weight random, the gates too (transformers initialises them at 0 or pi/4)."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * scale)
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
