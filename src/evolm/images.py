"""Images -> the tensors a vision model reads (Llama 3.2 Vision's preprocessing), and the text
tokens' cross-attention mask.

An image is resized (bilinear, keeping its aspect ratio) onto the smallest canvas of tiles among
``vision.supported_aspect_ratios`` that holds it without shrinking (or, if none can, the one that
shrinks it least), padded with black to the canvas, scaled to [0, 1], normalised per channel and
cut into ``image_size`` tiles: what transformers' ``MllamaImageProcessor`` does (tests/test_vision.py
checks it), in numpy and PIL alone so that evolm needs no transformers to read an image.

``cross_attention_mask`` says which images each text token may see: an ``<|image|>`` token opens
its image to the tokens from it on, until the next image token (consecutive image tokens stay
open together), as transformers' ``MllamaProcessor`` does.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from evolm.config import VisionConfig

# CLIP's statistics, which the Llama 3.2 Vision checkpoints' preprocessor_config.json names
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def to_rgb_array(image: Any) -> np.ndarray:
    """A PIL image or an array (H, W), (H, W, 1|3|4): uint8, or floats in [0, 1] -> uint8 (H, W, 3)."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or min(a.shape[:2]) < 1:
        raise ValueError(f"an image must be (H, W) or (H, W, 1|3|4), got shape {a.shape}")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating) or not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
            raise ValueError(f"an image array must be uint8, or floats in [0, 1]; got {a.dtype} "
                             f"in [{a.min()}, {a.max()}]")
        a = np.round(a * 255).astype(np.uint8)
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a[:, :, :3])


def best_tiling(height: int, width: int, vision: VisionConfig) -> tuple[int, int]:
    """(rows, columns) of tiles for an image: the least upscaling that fits, else the least
    downscaling; ties go to the smaller canvas."""
    tile = vision.image_size
    scales = [min(r * tile / height, c * tile / width) for r, c in vision.supported_aspect_ratios]
    up = [s for s in scales if s >= 1]
    best = min(up) if up else max(scales)
    options = [rc for rc, s in zip(vision.supported_aspect_ratios, scales) if s == best]
    return min(options, key=lambda rc: rc[0] * rc[1])


def fit_to_canvas(height: int, width: int, canvas_h: int, canvas_w: int, tile: int) -> tuple[int, int]:
    """The image's new size on its canvas: aspect ratio kept, no side below a tile (unless the
    canvas is smaller), none past the canvas."""
    th, tw = min(max(height, tile), canvas_h), min(max(width, tile), canvas_w)
    sh, sw = th / height, tw / width
    if sw < sh:
        return min(math.floor(height * sw) or 1, th), tw
    return th, min(math.floor(width * sh) or 1, tw)


def image_tiles(image: Any, vision: VisionConfig, mean: Sequence[float] = CLIP_MEAN,
                std: Sequence[float] = CLIP_STD) -> tuple[np.ndarray, tuple[int, int]]:
    """One image -> its tiles (n, 3, image_size, image_size) float32 and its tiling (rows, columns)."""
    from PIL import Image

    a = to_rgb_array(image)
    h, w = a.shape[:2]
    rows, cols = best_tiling(h, w, vision)
    tile = vision.image_size
    nh, nw = fit_to_canvas(h, w, rows * tile, cols * tile, tile)
    resized = np.asarray(Image.fromarray(a).resize((nw, nh), Image.Resampling.BILINEAR))
    canvas = np.zeros((rows * tile, cols * tile, 3), dtype=np.float32)
    canvas[:nh, :nw] = resized.astype(np.float32) / 255.0  # black padding, normalised like the image
    canvas = (canvas - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    tiles = canvas.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 4, 1, 3).reshape(rows * cols, 3, tile, tile)
    return np.ascontiguousarray(tiles), (rows, cols)


def image_inputs(images: Any, vision: VisionConfig, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD) -> dict[str, Any]:
    """Images -> ``pixel_values`` (B, images, max_num_tiles, 3, S, S), ``aspect_ratio_ids`` (B, images),
    ``aspect_ratio_mask`` (B, images, max_num_tiles) as torch tensors, and ``num_tiles`` (lists).

    ``images``: one image, a list with one image per row, or a list of lists (several per row;
    rows with fewer are padded with empty images, aspect ratio id 0)."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    rows = [list(r) if isinstance(r, (list, tuple)) else [r] for r in images]
    if not rows or any(not r for r in rows):
        raise ValueError("image_inputs: every row needs at least one image")
    n_img, T, S = max(len(r) for r in rows), vision.max_num_tiles, vision.image_size
    pixels = np.zeros((len(rows), n_img, T, vision.num_channels, S, S), dtype=np.float32)
    ids = np.zeros((len(rows), n_img), dtype=np.int64)
    mask = np.zeros((len(rows), n_img, T), dtype=np.int64)
    mask[:, :, 0] = 1  # as transformers builds it: the first tile of a padding image counts as real
    num_tiles = []
    for b, row in enumerate(rows):
        num_tiles.append([])
        for i, image in enumerate(row):
            tiles, tiling = image_tiles(image, vision, mean, std)
            pixels[b, i, :len(tiles)] = tiles
            ids[b, i] = vision.supported_aspect_ratios.index(tiling) + 1
            mask[b, i, :len(tiles)] = 1
            num_tiles[-1].append(len(tiles))
    return {"pixel_values": torch.from_numpy(pixels), "aspect_ratio_ids": torch.from_numpy(ids),
            "aspect_ratio_mask": torch.from_numpy(mask), "num_tiles": num_tiles}


def image_spans(ids: Sequence[int], image_token_id: int) -> list[tuple[int, int]]:
    """[start, end) of the tokens that see each image of one row (see the module docstring)."""
    at = [i for i, t in enumerate(ids) if t == image_token_id]
    spans = [[a, b] for a, b in zip(at, at[1:] + [len(ids)])]
    for k in range(len(spans) - 2, -1, -1):  # consecutive image tokens: open until the group's end
        if spans[k][1] == spans[k][0] + 1:
            spans[k][1] = spans[k + 1][1]
    return [(a, b) for a, b in spans]


def cross_attention_mask(input_ids: Any, image_token_id: int, num_tiles: list[list[int]],
                         max_num_tiles: int) -> torch.Tensor:
    """(B, T, images, max_num_tiles) int64: 1 where a text token may see an image's tile."""
    rows = input_ids.tolist() if hasattr(input_ids, "tolist") else [list(r) for r in input_ids]
    T, n_img = max(len(r) for r in rows), max((len(n) for n in num_tiles), default=0)
    out = torch.zeros(len(rows), T, max(n_img, 1), max_num_tiles, dtype=torch.long)
    for b, row in enumerate(rows):
        for i, (start, end) in enumerate(image_spans(row, image_token_id)):
            if i >= len(num_tiles[b]):
                raise ValueError(f"row {b} has more <|image|> tokens than images ({len(num_tiles[b])})")
            out[b, start:end, i, :num_tiles[b][i]] = 1
    return out


__all__ = ["image_inputs", "image_tiles", "cross_attention_mask", "image_spans", "best_tiling", "to_rgb_array",
           "CLIP_MEAN", "CLIP_STD"]
