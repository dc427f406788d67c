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

Images come from untrusted places (a file, a client's ``data:`` URI), so :func:`load_image` reads
every form in one place -- a path, a ``data:image/...;base64,`` URI (what OpenAI's chat API sends),
bytes, a PIL image or a numpy array -- and fails with one :class:`ImageError` line naming what was
wrong (not base64, not an image PIL reads, too many pixels ...); the server answers it with a 400.
Limits guard the decoder: the encoded size (``MAX_IMAGE_BYTES``) and the pixel count read from the
header before any pixel is decoded (``MAX_PIXELS``: a small PNG can claim 100k x 100k pixels).
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import re
from typing import Any, Sequence

import numpy as np
import torch

from evolm.config import VisionConfig

# CLIP's statistics, which the Llama 3.2 Vision checkpoints' preprocessor_config.json names
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# --- reading images -------------------------------------------------------------------------
MAX_IMAGE_BYTES = 20 * 2**20  # OpenAI's own limit for an image input is 20 MB
MAX_PIXELS = 64 * 2**20  # 8k x 8k; PIL's warning threshold is ~89M
DATA_URI = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w.+-]+=[^;,]*)*)(?P<b64>;base64)?,", re.I)
FORMATS = ("PNG", "JPEG", "GIF", "BMP", "WEBP")  # what an image input may be encoded as (PIL's names)


class ImageError(ValueError):
    """An image that cannot be read; the message says why, in one line."""


def _pil():
    try:
        from PIL import Image
    except ImportError:  # pillow comes with matplotlib, a core dependency; this is a broken install
        raise ImageError("reading images needs pillow: pip install pillow (see constraints.txt)") from None
    return Image


def decode_data_uri(uri: str) -> bytes:
    """The bytes of a ``data:[mime];base64,...`` URI (an image's: the MIME type, when given, is image/*)."""
    m = DATA_URI.match(uri)
    if m is None:
        raise ImageError("a data URI must look like data:image/png;base64,<base64 data>")
    mime = (m.group("mime") or "").lower()
    if mime and not mime.startswith("image/"):
        raise ImageError(f"data URI: expected an image/* MIME type, got {mime!r}")
    if not m.group("b64"):
        raise ImageError("data URI: only base64-encoded images are accepted (…;base64,<data>)")
    payload = uri[m.end():]
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise ImageError(f"data URI: image over {MAX_IMAGE_BYTES // 2**20} MiB")
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError("data URI: the data is not valid base64") from None


def _open_bytes(data: bytes, where: str):
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"{where}: {len(data)} bytes; an image may be at most {MAX_IMAGE_BYTES // 2**20} MiB")
    Image = _pil()
    try:
        img = Image.open(io.BytesIO(data), formats=FORMATS)
    except Exception as e:  # UnidentifiedImageError, and whatever a broken header raises
        raise ImageError(f"{where}: not an image PIL can read ({', '.join(FORMATS)}): {type(e).__name__}") from None
    w, h = img.size
    if w < 1 or h < 1 or w * h > MAX_PIXELS:
        raise ImageError(f"{where}: {w}x{h} pixels; at most {MAX_PIXELS:,} are read")
    try:
        img.load()
    except Exception as e:  # truncated or corrupt pixel data
        raise ImageError(f"{where}: the image data is damaged ({type(e).__name__}: {str(e)[:80]})") from None
    return img


def _from_array(a: np.ndarray):
    Image = _pil()
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)) or 0 in a.shape:
        raise ImageError(f"an image array must be (H, W) grey or (H, W, 3|4) colour, got shape {a.shape}")
    if a.dtype != np.uint8:
        if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
            raise ImageError(f"an image array must be uint8 or floats in [0, 1], got dtype {a.dtype}")
        f = a.astype(np.float64)
        if not np.isfinite(f).all() or f.min() < 0 or f.max() > 1:
            raise ImageError("an image array of floats must hold values in [0, 1] (uint8 for 0..255)")
        a = np.rint(f * 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(a))


def load_image(source: Any):
    """An RGB ``PIL.Image`` from a path, a data URI, bytes, a PIL image or a numpy array."""
    Image = _pil()
    if isinstance(source, Image.Image):
        img = source
    elif isinstance(source, np.ndarray):
        img = _from_array(source)
    elif isinstance(source, (bytes, bytearray)):
        img = _open_bytes(bytes(source), "image bytes")
    elif isinstance(source, str) and source[:5].lower() == "data:":
        img = _open_bytes(decode_data_uri(source), "data URI")
    elif isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise ImageError(f"{path}: image file not found")
        if os.path.getsize(path) > MAX_IMAGE_BYTES:
            raise ImageError(f"{path}: {os.path.getsize(path)} bytes; an image may be at most "
                             f"{MAX_IMAGE_BYTES // 2**20} MiB")
        with open(path, "rb") as f:
            img = _open_bytes(f.read(), path)
    else:
        raise ImageError(f"an image is a path, a data: URI, bytes, a PIL image or a numpy array; "
                         f"got {type(source).__name__}")
    if img.mode == "RGBA" or (img.mode == "P" and "transparency" in img.info):  # transparent parts on white
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size, (255, 255, 255))
        img.paste(rgba, mask=rgba.getchannel("A"))
    return img.convert("RGB")


def to_png_data_uri(image: Any) -> str:
    """``data:image/png;base64,...`` of an image (what a client sends in an ``image_url`` part)."""
    buf = io.BytesIO()
    load_image(image).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


# --- Llama 3.2 Vision preprocessing ----------------------------------------------------------


def to_rgb_array(image: Any) -> np.ndarray:
    """A PIL image or an array (H, W), (H, W, 1|3|4): uint8, or floats in [0, 1] -> uint8 (H, W, 3).
    A path, a ``data:`` URI or encoded bytes are read first (:func:`load_image`)."""
    if isinstance(image, (str, bytes, bytearray, os.PathLike)):
        image = load_image(image)
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
           "CLIP_MEAN", "CLIP_STD", "ImageError", "load_image", "decode_data_uri", "to_png_data_uri", "MAX_IMAGE_BYTES",
           "MAX_PIXELS"]
