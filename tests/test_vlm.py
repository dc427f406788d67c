"""The VLM pipeline around a vision-language model: real captioned images, image inputs, staged training.

The digits are the UCI scans scikit-learn ships (checked against ``sklearn.datasets.load_digits``,
the reference reader of that file); images are checked against PIL's own decoding and resize.
"""

from __future__ import annotations

import base64
import io
import json

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


# --- staged training -------------------------------------------------------------------------------
TINY_VISION = {"d_model": 32, "n_layers": 2, "n_global_layers": 1, "n_heads": 2, "d_ff": 64, "image_size": 16,
               "patch_size": 4, "max_num_tiles": 1, "intermediate_layers": [0], "supported_aspect_ratios": [[1, 1]],
               "cross_attention_layers": [1]}


def stage_recipe(name: str, out, steps: int, *, init=None, freeze=(), images=True, vision=None, lr=1e-2):
    from evolm.train.vlm import vlm_recipe_from_dict

    model = {"init": str(init)} if init else {"preset": "tiny-llama", "overrides": {
        "vocab_size": "tokenizer", "d_model": 64, "n_layers": 3, "n_heads": 4, "n_kv_heads": 4, "head_dim": 16,
        "d_ff": 128, "max_seq_len": 64, "rope_scaling": None, "tie_embeddings": True,
        "vision": vision or TINY_VISION}}
    return vlm_recipe_from_dict({
        "name": name, "out": str(out), "model": model, "tokenizer": {"train": {"vocab_size": 300}},
        "data": {"limit": 96, "val_limit": 30}, "optim": {"lr": lr, "weight_decay": 0.0},
        "train": {"steps": steps, "micro_batch": 16, "freeze": list(freeze), "images": images, "eval_every": 0,
                  "log_every": 100, "ckpt_every": 0, "samples": 2, "warmup_steps": 2}}, source=f"<{name}>")


def weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """The demo's three stages at micro size: text alone, projector + cross-attention, everything."""
    from evolm.train.vlm import run_vlm

    root = tmp_path_factory.mktemp("vlm")
    quiet = lambda s: None  # noqa: E731
    runs, summaries = {}, {}
    plan = [("text", dict(images=False, freeze=["vision", "projector", "cross"]), None, 8),
            ("align", dict(freeze=["text", "vision"]), "text", 8), ("full", dict(), "align", 4)]
    for name, kw, init, steps in plan:
        runs[name] = root / name
        summaries[name] = run_vlm(stage_recipe(name, runs[name], steps, init=runs.get(init), **kw), log=quiet)
    return runs, summaries


def test_stages_train_only_their_parts(stages):
    runs, summaries = stages
    text, align, full = (weights(runs[k]) for k in ("text", "align", "full"))
    for name in text:
        part = "vision" if name.startswith("vision_model.") else "projector" if name.startswith(
            "multi_modal_projector.") else "cross" if name.startswith("layers.1.") else "text"
        moved_align = not torch.equal(text[name], align[name])
        assert moved_align == (part in ("projector", "cross")), name  # stage 1: the adapter alone
        if part in ("text", "vision") and "gate" not in name and "tile" not in name:
            assert not torch.equal(align[name], full[name]), name  # stage 2: everything
    for k, s in summaries.items():
        assert {"val_loss", "val_digit_loss", "val_accuracy"} <= set(s["initial_eval"]), k
        assert s["val_loss"] < s["initial_eval"]["val_loss"], k
        assert len(s["samples"]) == 2 and s["samples"][0][1].startswith("a handwritten digit")
        assert json.loads((runs[k] / "vlm_summary.json").read_text())["steps"] > 0
    assert summaries["text"]["images"] is False and summaries["align"]["frozen"] == ["text", "vision"]
    shown = {d.label for d in split_digits()[1][:30]}  # one example image per digit of the held-out rows
    assert sorted(p.name.split("_")[2][:-4] for p in (runs["full"] / "images").glob("val_*.png")) == \
        sorted(WORDS[k] for k in shown)


def test_recipe_errors_name_the_field(tmp_path):
    from evolm.train.recipe import RecipeError
    from evolm.train.vlm import vlm_recipe_from_dict

    base = {"model": {"preset": "tiny-llama"}, "tokenizer": {"train": {}}}
    with pytest.raises(RecipeError, match="unknown key 'stepz'; did you mean 'steps'"):
        vlm_recipe_from_dict({**base, "train": {"stepz": 3}})
    with pytest.raises(RecipeError, match="name must be 'digits'"):
        vlm_recipe_from_dict({**base, "data": {"name": "coco"}})
    with pytest.raises(RecipeError, match="exactly one of"):
        vlm_recipe_from_dict({"tokenizer": {"train": {}}})
    from evolm.train.vlm import run_vlm

    r = stage_recipe("bad", tmp_path / "bad", 1, freeze=["text", "vision", "projector", "cross"])
    with pytest.raises(ValueError, match="nothing would train"):
        run_vlm(r, log=lambda s: None)
    with pytest.raises(ValueError, match="'encoder' matches no parameter"):
        run_vlm(stage_recipe("bad", tmp_path / "bad", 1, freeze=["encoder"]), log=lambda s: None)


# --- generation with an image ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def captioner(stages):
    from evolm.loading import load

    runs, _ = stages
    model, tok = load(runs["full"], need_tokenizer=True)
    return runs["full"], model.float().eval(), tok


def test_generate_with_images_equals_full_forward(captioner):
    """The decode loop (image encoded once, its keys/values and the text's cached) gives the tokens
    that a full forward pass over the whole sequence at every step gives; batched = one by one."""
    from evolm.data.digits import PROMPT, split_digits
    from evolm.infer import SamplingParams, generate
    from evolm.infer.vision import image_prefix, load_images, take_images
    from evolm.train.vlm import greedy_captions

    _, model, tok = captioner
    _, val = split_digits()
    images = load_images(model, [d.image for d in val[:4]])
    prompt = image_prefix(model, tok) + tok.encode(PROMPT, add_special_tokens=False)
    params = SamplingParams(max_new_tokens=4, temperature=0.0, ignore_eos=True)
    batched = generate(model, [prompt] * 4, params, images=images)
    full = greedy_captions(model, torch.tensor([prompt] * 4), images, 4, stop=-1)
    assert batched == full
    for i in range(4):
        assert generate(model, [prompt], params, images=take_images(images, [i])) == [batched[i]]
    with pytest.raises(ImageError, match="exactly one image"):
        generate(model, [tok.encode(PROMPT, add_special_tokens=False)], params, images=take_images(images, [0]))


def test_cli_generate_image(captioner, capsys):
    from evolm.cli import main
    from evolm.data.digits import PROMPT
    from evolm.infer import SamplingParams, generate
    from evolm.infer.vision import image_prefix, load_images

    run, model, tok = captioner
    png = sorted((run / "images").glob("val_*.png"))[0]
    assert main(["generate", "--model", str(run), "--image", str(png), "--prompt", PROMPT, "--max-new-tokens", "3",
                 "--no-fast", "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    want = generate(model, [image_prefix(model, tok) + tok.encode(PROMPT, add_special_tokens=False)],
                    SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True),
                    images=load_images(model, str(png)))[0]
    assert out == tok.decode(want) + "\n"
    # --chat: the captioner's template puts the image and the text where training put them
    assert main(["generate", "--model", str(run), "--image", str(png), "--prompt", PROMPT, "--max-new-tokens", "3",
                 "--no-fast", "--ignore-eos", "--chat"]) == 0
    assert capsys.readouterr().out == out
    with pytest.raises(SystemExit):
        main(["generate", "--model", str(run), "--image", str(run / "missing.png"), "--prompt", "x", "--no-fast"])
    assert "missing.png: image file not found" in capsys.readouterr().err


# --- the server's image content part -------------------------------------------------------------------
def _image_message(uri: str, text: str = "a handwritten digit") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": uri}},
                                         {"type": "text", "text": text}]}]


def test_server_reads_openai_image_parts(captioner):
    """The real ``openai`` client sends an image as a data URI; the answer is what local generation
    gives for the same image (alone, and beside text-only and other image requests)."""
    pytest.importorskip("fastapi", reason="serving needs fastapi")
    openai = pytest.importorskip("openai", reason="the official openai client")
    from concurrent.futures import ThreadPoolExecutor

    from fastapi.testclient import TestClient

    from evolm.data.digits import PROMPT
    from evolm.infer import SamplingParams, generate
    from evolm.infer.vision import image_prefix, load_images
    from evolm.serve.app import create_app
    from evolm.serve.scheduler import Engine

    run, model, tok = captioner
    pngs = sorted((run / "images").glob("val_*.png"))[:3]
    prompt = image_prefix(model, tok) + tok.encode(PROMPT, add_special_tokens=False)
    params = SamplingParams(max_new_tokens=3, temperature=0.0, ignore_eos=True)
    want = [tok.decode(generate(model, [prompt], params, images=load_images(model, str(p)))[0]) for p in pngs]
    with TestClient(create_app(Engine(model, tok, max_batch=4), "captioner")) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="x", http_client=http, max_retries=0)

        def ask(png):
            r = client.chat.completions.create(model="captioner", messages=_image_message(to_png_data_uri(png)),
                                               max_tokens=3, temperature=0, extra_body={"ignore_eos": True})
            return r.choices[0].message.content

        assert ask(pngs[0]) == want[0]
        with ThreadPoolExecutor(4) as pool:  # together, and beside a text-only request
            text_only = pool.submit(client.chat.completions.create, model="captioner", max_tokens=3,
                                    messages=[{"role": "user", "content": PROMPT}])
            assert list(pool.map(ask, pngs)) == want
            assert text_only.result().choices[0].finish_reason in ("stop", "length")
        stream = client.chat.completions.create(model="captioner", messages=_image_message(to_png_data_uri(pngs[1])),
                                                max_tokens=3, temperature=0, stream=True,
                                                extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want[1]

        def refused(messages, match: str, code: str = "invalid_image"):
            with pytest.raises(openai.BadRequestError) as e:
                client.chat.completions.create(model="captioner", messages=messages, max_tokens=2)
            assert e.value.code == code and match in e.value.message, e.value.message

        refused(_image_message("data:image/png;base64,@@@"), "not valid base64")
        refused(_image_message("data:image/png;base64,aGVsbG8="), "not an image PIL can read")
        refused(_image_message("https://example.com/cat.png"), "must be a data: URI")
        two = _image_message(to_png_data_uri(pngs[0]))
        two[0]["content"].insert(0, {"type": "image_url", "image_url": {"url": to_png_data_uri(pngs[1])}})
        refused(two, "one image per request")
        refused([{"role": "user", "content": [{"type": "input_audio"}]}], "'text' or 'image_url'", code=None)
        assert http.get("/health").json()["status"] == "ok"


def test_server_refuses_images_for_a_text_model():
    pytest.importorskip("fastapi", reason="serving needs fastapi")
    from fastapi.testclient import TestClient

    from evolm.model import build
    from evolm.presets import get_preset
    from evolm.serve.app import create_app
    from evolm.serve.scheduler import Engine
    from evolm.tokenizer import train_bpe

    tok = train_bpe(iter(["hello world"] * 20), vocab_size=270, chat_template="{{ messages[0]['content'] }}")
    model = build(get_preset("tiny-llama").replace(vocab_size=tok.vocab_size, max_seq_len=32)).eval()
    with TestClient(create_app(Engine(model, tok, max_batch=2), "text")) as http:
        r = http.post("/v1/chat/completions", json={"model": "text", "messages": _image_message(
            to_png_data_uri(np.zeros((8, 8), np.uint8)))})
        assert r.status_code == 400 and r.json()["error"]["code"] == "images_not_supported", r.text
        assert "reads no images" in r.json()["error"]["message"]


# --- LLaVA-style fusion: image states as tokens ------------------------------------------------------
TOKENS_VISION = {**TINY_VISION, "n_global_layers": 0, "cross_attention_layers": [], "fusion": "tokens",
                 "extra_token_rows": 0, "image_token_id": 255}


def tokens_model(seed: int = 0):
    from evolm.config import ModelConfig
    from evolm.model import build
    from evolm.presets import get_preset

    c = get_preset("tiny-llama").to_dict()
    c.update(vocab_size=256, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, d_ff=128,
             max_seq_len=96, vision=TOKENS_VISION)
    torch.manual_seed(seed)
    return build(ModelConfig.from_dict(c)).eval()


def test_tokens_fusion_matches_llava():
    """``vision.fusion: tokens`` against transformers' ``LlavaForConditionalGeneration`` given the
    same image states (its ``mm_encoder_outputs``): the placeholders, the splice and the text model
    are transformers'; logits of a batch with an image per row, and greedy decoding (ours cached,
    the image written once at prefill; theirs a full forward per token)."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    from evolm.infer import SamplingParams, generate
    from evolm.infer.vision import image_inputs, image_token_count, load_images
    from evolm.interop.hf import config_to_hf, state_dict_to_hf

    model = tokens_model()
    v = model.config.vision
    assert image_token_count(model) == v.image_tokens == 17
    text_cfg = model.config.replace(vision=None)
    text_hf = config_to_hf(text_cfg)
    hf = transformers.LlavaForConditionalGeneration(transformers.LlavaConfig(
        text_config=text_hf, vision_config={"model_type": "clip_vision_model", "hidden_size": 16, "num_hidden_layers": 1,
                                            "num_attention_heads": 2, "intermediate_size": 32, "image_size": 16,
                                            "patch_size": 8},
        image_token_id=v.image_token_id)).eval()
    text_sd = {k: t for k, t in model.state_dict().items() if not k.startswith(("vision_model.", "multi_modal_"))}
    hf_sd = state_dict_to_hf(text_sd, text_cfg)
    lm = {k[len("model."):]: t for k, t in hf_sd.items() if k.startswith("model.")}
    assert not hf.model.language_model.load_state_dict(lm, strict=True).missing_keys
    hf.lm_head.weight.data.copy_(hf_sd["lm_head.weight"])

    rng = np.random.default_rng(0)
    images = load_images(model, [rng.integers(0, 256, (12, 12), dtype=np.uint8) for _ in range(2)])
    text = torch.tensor([[5, 9, 30], [7, 7, 81]])
    ids = torch.cat([torch.full((2, 17), v.image_token_id), torch.full((2, 1), 1), text], 1)
    kw = image_inputs(model, images, ids)
    with torch.no_grad():
        states = model.image_states(kw["pixel_values"], kw["aspect_ratio_ids"], kw["aspect_ratio_mask"])
        ours = model(ids, **kw)

        def theirs(x):
            enc = {"image": BaseModelOutputWithPooling(pooler_output=list(states[:x.shape[0]]))}
            return hf(input_ids=x, mm_encoder_outputs=enc).logits

        ref = theirs(ids)
        print(f"tokens fusion vs LlavaForConditionalGeneration: max |diff| {float((ours - ref).abs().max()):.3g}")
        assert (ours - ref).abs().max() <= 1e-4, (ours - ref).abs().max()
        want = ids
        for _ in range(6):  # transformers' greedy continuation, one full forward per token
            want = torch.cat([want, theirs(want)[:, -1].argmax(-1, keepdim=True)], 1)
    got = generate(model, ids.tolist(), SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True),
                   images=images)
    assert got == want[:, ids.shape[1]:].tolist()
    # no image: the placeholders are plain embeddings; a wrong count of placeholders is an error
    with pytest.raises(ValueError, match="17 <\\|image\\|> tokens"):
        model(ids[:, 1:], pixel_values=kw["pixel_values"], aspect_ratio_ids=kw["aspect_ratio_ids"])
    with pytest.raises(ValueError, match="fusion='cross_attention'"):
        model(ids, cross_attention_mask=torch.ones(2, ids.shape[1], 1, 1), **kw)


def test_tokens_fusion_in_the_server_engine():
    """The engine writes the image states at prefill and decodes the rest as text: its greedy tokens
    are generate's, for an image request beside a text-only one."""
    import threading

    from evolm.infer import SamplingParams, generate
    from evolm.infer.vision import load_images
    from evolm.serve.scheduler import DoneEvent, Engine, GenRequest
    from evolm.tokenizer import train_bpe

    tok = train_bpe(iter(["a handwritten digit seven"] * 10), vocab_size=258)
    model = tokens_model()
    images = load_images(model, np.random.default_rng(1).integers(0, 256, (8, 8), dtype=np.uint8))
    prompt = [model.config.vision.image_token_id] * 17 + [1, 40, 41]
    params = SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)
    want = generate(model, [prompt], params, images=images)[0]
    engine = Engine(model, tok, max_batch=2, max_len=64).start()
    try:
        got, done = {}, {0: threading.Event(), 1: threading.Event()}

        def deliver(ev):
            got.setdefault(ev.index, []).append(getattr(ev, "token_id", None))
            if isinstance(ev, DoneEvent):
                done[ev.index].set()
        engine.submit(GenRequest(prompt, params, deliver, index=0, image=images))
        engine.submit(GenRequest([1, 40, 41], params, deliver, index=1))
        assert done[0].wait(60) and done[1].wait(60)
    finally:
        engine.stop()
    assert [t for t in got[0] if t is not None] == want


def test_tokens_fusion_config_errors():
    from evolm.config import ConfigError, ModelConfig
    from evolm.presets import get_preset

    base = get_preset("tiny-llama").to_dict()
    with pytest.raises(ConfigError, match="vision.cross_attention_layers"):
        ModelConfig.from_dict({**base, "vision": {**TOKENS_VISION, "cross_attention_layers": [1]}})
    with pytest.raises(ConfigError, match="vision.max_num_tiles"):
        ModelConfig.from_dict({**base, "vision": {**TOKENS_VISION, "max_num_tiles": 2,
                                                  "supported_aspect_ratios": [[1, 1], [1, 2]]}})
    with pytest.raises(ConfigError, match="vision.fusion"):
        ModelConfig.from_dict({**base, "vision": {**TOKENS_VISION, "fusion": "concat"}})
