"""Prompts with an image: the token ids that stand for it and the forward arguments that carry it.

Two ways to let a language model read an image, one config field apart (``vision.fusion``):

- ``cross_attention`` (Llama 3.2 Vision, Flamingo): one ``<|image|>`` token marks where the image is;
  the text tokens after it attend to the image states through gated cross-attention layers.
  The image enters every forward call that has text after it (the cross keys/values are cached).
- ``tokens`` (LLaVA, Liu et al. 2023, arXiv:2304.08485; nanoVLM, SmolVLM): the image's projected
  patch states *are* tokens of the sequence; the prompt holds one placeholder per state and the
  model writes the states over their embeddings. The image enters the prefill alone.

Training (``evolm.train.vlm``), ``evolm generate --image`` and the server build their prompts and
forward arguments here, so all three put the image in the same place.
"""

from __future__ import annotations

from typing import Any

import torch

from evolm.images import ImageError, pixel_values


def vision_config(model):
    """The model's ``VisionConfig``, or a ValueError saying the model reads no images."""
    v = getattr(model.config, "vision", None)
    if v is None:
        raise ValueError(f"the model {getattr(model.config, 'name', '')!r} has no vision encoder "
                         f"(config.vision is not set); it takes text only")
    return v


def fusion(model) -> str:
    return getattr(vision_config(model), "fusion", "cross_attention")


def image_token_count(model) -> int:
    """How many prompt positions one image takes: 1 with cross-attention; its states with ``tokens``."""
    v = vision_config(model)
    if fusion(model) == "tokens":
        return v.image_tokens
    return 1


def image_prefix(model, tokenizer) -> list[int]:
    """The ids a prompt about one image starts with: the image's placeholder(s), then BOS (as
    Mllama's processor writes ``<|image|><|begin_of_text|>``)."""
    v = vision_config(model)
    bos = getattr(tokenizer, "bos_id", None)
    return [v.image_token_id] * image_token_count(model) + ([bos] if bos is not None else [])


def expand_image_tokens(model, ids: list[int]) -> list[int]:
    """A rendered prompt (a chat template writes one ``<|image|>`` per image) with each image
    token repeated to the image's count of positions (LLaVA's processor does the same)."""
    v, n = vision_config(model), image_token_count(model)
    out: list[int] = []
    for t in ids:
        out.extend([t] * n if t == v.image_token_id else [t])
    return out


def load_pixels(model, images: Any) -> torch.Tensor:
    """(B, C, H, W) normalised pixels of one image or a list of them, at the encoder's size."""
    v = vision_config(model)
    return pixel_values(images, v.image_size)


def check_image_tokens(model, input_ids: torch.Tensor, n_images: int) -> None:
    """Each row holds one image's placeholders exactly once (ImageError otherwise)."""
    v = vision_config(model)
    want = image_token_count(model)
    counts = (input_ids == v.image_token_id).sum(-1)
    if n_images != input_ids.shape[0] or bool((counts != want).any()):
        raise ImageError(f"each prompt needs exactly one image ({want} image token(s), id {v.image_token_id}); "
                         f"got {n_images} image(s) for {input_ids.shape[0]} prompt(s) holding "
                         f"{counts.tolist()} image token(s)")


def image_inputs(model, pixels: torch.Tensor, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The forward arguments that give row b of ``input_ids`` the image ``pixels[b]`` (one image,
    one tile each): the ``pixel_values`` (B, 1, 1, C, H, W) and tiling ids the encoder reads and,
    with cross-attention, which text positions may see the image (those from the image token on)."""
    check_image_tokens(model, input_ids, pixels.shape[0])
    B = pixels.shape[0]
    dev = input_ids.device
    kw = {"pixel_values": pixels[:, None, None].to(dev),
          "aspect_ratio_ids": torch.ones(B, 1, dtype=torch.long, device=dev),
          "aspect_ratio_mask": torch.ones(B, 1, 1, dtype=torch.long, device=dev)}
    if fusion(model) == "cross_attention":
        seen = (input_ids == vision_config(model).image_token_id).long().cumsum(-1) > 0
        kw["cross_attention_mask"] = seen.long()[:, :, None, None]
    return kw


def decode_inputs(model, pixels: torch.Tensor, input_ids: torch.Tensor) -> tuple[dict, dict]:
    """(the prefill's image arguments, every decode step's) for prompts ``input_ids`` with one
    image each. Cross-attention: the image is encoded once (``encode_images``; its keys/values are
    then cached per layer) and every step's token sees it. Tokens: the prefill writes the image
    states over the placeholders, and the steps need nothing more."""
    kw = image_inputs(model, pixels, input_ids)
    if fusion(model) == "tokens":
        return kw, {}
    cross = model.encode_images(kw.pop("pixel_values"), kw.pop("aspect_ratio_ids"), kw.pop("aspect_ratio_mask"))
    B = input_ids.shape[0]
    step_mask = torch.ones(B, 1, 1, 1, dtype=torch.long, device=input_ids.device)  # one image, seen from now on
    return {"cross": cross, **kw}, {"cross": cross, "cross_attention_mask": step_mask}


__all__ = ["vision_config", "fusion", "image_token_count", "image_prefix", "expand_image_tokens", "load_pixels",
           "check_image_tokens",
           "image_inputs", "decode_inputs"]
