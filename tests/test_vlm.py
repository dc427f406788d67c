"""The VLM pipeline around a vision-language model: real captioned images, image inputs, staged training.

The digits are the UCI scans scikit-learn ships (checked against ``sklearn.datasets.load_digits``,
the reference reader of that file); images are checked against PIL's own decoding and resize.
"""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
import torch

from evolm.data.sources import DataError
from evolm.images import ImageError, load_image, to_png_data_uri

PIL = pytest.importorskip("PIL.Image", reason="images need pillow")
pytest.importorskip("sklearn", reason="the digits come with scikit-learn: pip install -e '.[vision]'")

from evolm.data.digits import WORDS, caption, load_digits_array, named_digit, split_digits  # noqa: E402


# --- the digits -----------------------------------------------------------------------------------
def test_digits_match_sklearn_and_split_is_deterministic():
    from sklearn.datasets import load_digits

    ref = load_digits()
    images, labels = load_digits_array()
    assert images.shape == (1797, 8, 8) and images.dtype == np.uint8
    np.testing.assert_array_equal(labels, ref.target)
    np.testing.assert_array_equal(images, np.rint(ref.images * 255 / 16).astype(np.uint8))
    train, val = split_digits(0.2, seed=3)
    assert len(val) == 359 and len(train) == 1797 - 359
    assert not {d.index for d in train} & {d.index for d in val}
    again, _ = split_digits(0.2, seed=3)
    assert [d.index for d in again] == [d.index for d in train]
    assert [d.index for d in split_digits(0.2, seed=4)[0]] != [d.index for d in train]
    assert set(d.label for d in val) == set(range(10))  # every digit is held out
    assert train[0].caption == f"a handwritten digit {WORDS[train[0].label]}"


def test_named_digit_and_bad_inputs(tmp_path):
    assert named_digit(caption(7)) == 7 and named_digit("a handwritten digit") is None
    assert named_digit("A handwritten digit Three.") == 3
    with pytest.raises(DataError, match="val_fraction"):
        split_digits(1.5)
    bad = tmp_path / "d.csv.gz"
    import gzip

    with gzip.open(bad, "wt") as f:
        f.write("1,2,3\n")
    with pytest.raises(DataError, match="64 ink counts"):
        load_digits_array(bad)


# --- images -------------------------------------------------------------------------------------
def _png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_every_image_source_reads_the_same_pixels(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    img = PIL.fromarray(rgb)
    path = tmp_path / "x.png"
    img.save(path)
    uri = "data:image/png;base64," + base64.b64encode(_png_bytes(img)).decode()
    for source in (img, rgb, path, str(path), uri, _png_bytes(img), rgb.astype(np.float32) / 255):
        np.testing.assert_array_equal(np.asarray(load_image(source)), rgb)
    grey = np.asarray(load_image(rgb[..., 0]))  # (H, W): the grey value in all three channels
    assert (grey == rgb[..., :1]).all()
    rgba = np.concatenate([rgb, np.zeros((20, 30, 1), np.uint8)], -1)  # fully transparent: white
    assert (np.asarray(load_image(rgba)) == 255).all()
    np.testing.assert_array_equal(np.asarray(load_image(to_png_data_uri(rgb))), rgb)


@pytest.mark.parametrize("source,message", [
    ("data:text/plain;base64,aGk=", "image/\\* MIME"),
    ("data:image/png;base64,@@@", "not valid base64"),
    ("data:image/png,rawbytes", "base64-encoded"),
    ("data:image/png;base64," + base64.b64encode(b"hello").decode(), "not an image PIL can read"),
    ("missing.png", "not found"),
    (np.zeros((4, 4, 2), np.uint8), "shape"),
    (np.full((4, 4), 2.0), r"\[0, 1\]"),
    (12, "got int"),
])
def test_bad_images_fail_with_one_clear_line(source, message):
    with pytest.raises(ImageError, match=message):
        load_image(source)


def test_truncated_and_oversized_images(monkeypatch):
    data = _png_bytes(PIL.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)))
    with pytest.raises(ImageError, match="damaged|not an image"):
        load_image(data[: len(data) // 2])
    import evolm.images as images

    monkeypatch.setattr(images, "MAX_PIXELS", 100)  # the header's size is checked before decoding
    with pytest.raises(ImageError, match="64x64 pixels"):
        load_image(data)
