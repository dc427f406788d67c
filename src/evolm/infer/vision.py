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

from evolm.images import ImageError, load_image


def vision_config(model):
    """The model's ``VisionConfig``, or a ValueError saying the model reads no images."""
    v = getattr(model.config, "vision", None)
    if v is None:
        raise ValueError(f"the model {getattr(model.config, 'name', '')!r} has no vision encoder "
                         f"(config.vision is not set); it takes text only")
    return v


def fusion(model) -> str:
    """``cross_attention`` or ``tokens`` (``vision.fusion``)."""
    return vision_config(model).fusion


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


def load_images(model, images: Any) -> dict[str, Any]:
    """One image per prompt (a path, data: URI, bytes, PIL image or array each, or a list of them)
    -> the encoder's inputs (``evolm.images.image_inputs``: Llama 3.2 Vision's tiles, normalised)."""
    from evolm.images import image_inputs as preprocess

    rows = list(images) if isinstance(images, (list, tuple)) else [images]
    return preprocess([load_image(x) for x in rows], vision_config(model))


def take_images(images: dict[str, Any], rows: list[int]) -> dict[str, Any]:
    """The images of some rows of a batch from :func:`load_images` (training batches)."""
    idx = torch.tensor(rows, dtype=torch.long)
    return {"pixel_values": images["pixel_values"][idx], "aspect_ratio_ids": images["aspect_ratio_ids"][idx],
            "aspect_ratio_mask": images["aspect_ratio_mask"][idx], "num_tiles": [images["num_tiles"][r] for r in rows]}


def check_image_tokens(model, input_ids: torch.Tensor, n_images: int) -> None:
    """Each row holds one image's placeholders exactly once (ImageError otherwise)."""
    v = vision_config(model)
    want = image_token_count(model)
    counts = (input_ids == v.image_token_id).sum(-1)
    if n_images != input_ids.shape[0] or bool((counts != want).any()):
        raise ImageError(f"each prompt needs exactly one image ({want} image token(s), id {v.image_token_id}); "
                         f"got {n_images} image(s) for {input_ids.shape[0]} prompt(s) holding "
                         f"{counts.tolist()} image token(s)")


def image_inputs(model, images: dict[str, Any], input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The forward arguments that give row b of ``input_ids`` its image of ``images`` (from
    :func:`load_images`): the encoder's inputs and, with cross-attention, which text positions
    see which tiles (those from the image token on: ``evolm.images.cross_attention_mask``)."""
    from evolm.images import cross_attention_mask

    check_image_tokens(model, input_ids, images["pixel_values"].shape[0])
    dev = input_ids.device
    kw = {k: images[k].to(dev) for k in ("pixel_values", "aspect_ratio_ids", "aspect_ratio_mask")}
    if fusion(model) == "cross_attention":
        v = vision_config(model)
        kw["cross_attention_mask"] = cross_attention_mask(input_ids, v.image_token_id, images["num_tiles"],
                                                          v.max_num_tiles).to(dev)
    return kw


def decode_inputs(model, images: dict[str, Any], input_ids: torch.Tensor) -> tuple[dict, dict]:
    """(the prefill's image arguments, every decode step's) for prompts ``input_ids`` with one
    image each. Cross-attention: the image is encoded once (``encode_images``; its keys/values are
    then cached per layer) and each new token sees what the prompt's last token saw. Tokens: the
    prefill writes the image states over the placeholders, and the steps need nothing more."""
    kw = image_inputs(model, images, input_ids)
    if fusion(model) == "tokens":
        return kw, {}
    cross = model.encode_images(kw.pop("pixel_values"), kw.pop("aspect_ratio_ids"), kw.pop("aspect_ratio_mask"))
    return {"cross": cross, **kw}, {"cross": cross, "cross_attention_mask": kw["cross_attention_mask"][:, -1:]}


__all__ = ["vision_config", "fusion", "image_token_count", "image_prefix", "expand_image_tokens", "load_images",
           "take_images", "check_image_tokens", "image_inputs", "decode_inputs"]
