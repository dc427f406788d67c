"""Training a vision-language model in stages: ``evolm vlm RECIPE``, on the one training loop.

A VLM joins a pretrained language model and an image encoder through a projector (and, for
Llama 3.2 Vision, gated cross-attention layers). It is trained in stages that differ in what
learns (Liu et al. 2023, LLaVA, arXiv:2304.08485 sec. 4.2; Llama 3 herd, arXiv:2407.21783 sec. 7.4;
the seed's "projection layer alignment, then full model fine-tuning"):

1. *alignment* (``freeze: [text, vision]``, ``train/freeze.py``): the language model and the encoder stay frozen and
   only the projector learns to map image states into what the text model reads. With
   cross-attention fusion the new cross-attention layers learn too (their tanh gates start at 0,
   so with them frozen the image could never reach the text): Llama 3.2's "adapter" training.
2. *full tuning* (``freeze: []``): everything learns, at a lower rate.

A recipe is one stage; the next stage's recipe starts from the previous run folder
(``model.init``). At toy size there is no pretrained language model to start from, so a stage 0
(``images: false``) trains the text side alone on the captions: it learns the
captions' language, and cannot know which digit an image shows (its loss on the digit word stays
at log 10). The data is the UCI digits (``evolm.data.digits``); images go through
:mod:`evolm.images` and the prompt layout of :mod:`evolm.infer.vision`, as at inference.

Held-out metrics at every evaluation, and before the first step: ``val_loss`` (the caption's
tokens and its end), ``val_digit_loss`` (the digit word alone: what only the image can tell) and
``val_accuracy`` (greedy captions of every held-out image that name the right digit).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from evolm.infer.vision import image_inputs, take_images
from evolm.train.config import LoopConfig, LoopSettings, LRShape, OptimConfig, Phase, values_of
from evolm.train.loop import Runtime, run, seed_all
from evolm.train.recipe import ModelSpec, RecipeError, TokenizerSpec, _build

IGNORE = -100
IMAGE_TOKEN = "<|image|>"
SPECIALS = ("<|endoftext|>", IMAGE_TOKEN)
# a captioner's chat template: the user's image and text become the prompt the model was trained on
# (image, BOS, the caption's start), and the assistant's turn continues the caption; OpenAI-style
# image parts reach it as {"type": "image"} (the server, evolm generate --image --chat)
CAPTION_TEMPLATE = (
    "{%- for m in messages if m['role'] == 'user' -%}"
    "{%- if m['content'] is string -%}{{ m['content'] }}"
    "{%- else -%}{%- for p in m['content'] -%}"
    "{%- if p['type'] == 'image' -%}<|image|><|endoftext|>{%- elif p['type'] == 'text' -%}{{ p['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}{%- endfor -%}")


# --------------------------------------------------------------------------------------------
# the recipe
# --------------------------------------------------------------------------------------------
@dataclass
class VlmData:
    name: str = "digits"  # the UCI digits from scikit-learn (the only captioned set so far)
    val_fraction: float = 0.2
    seed: int = 0  # the split's
    limit: int | None = None  # the first N training images
    val_limit: int | None = None


@dataclass
class VlmTrain(LoopSettings, LRShape):
    """The ``train`` section: the loop's settings (what is frozen among them), the stage's LR
    shape, and whether the stage shows images."""

    images: bool = True  # false: the text side alone learns the captions (stage 0)
    steps: int = 100
    micro_batch: int = 32
    accum: int = 1
    samples: int = 4  # held-out images captioned at the end
    threads: int | None = None


@dataclass
class VlmRecipe:
    name: str = "vlm"
    seed: int = 1337
    out: str | None = None
    model: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    data: VlmData = field(default_factory=VlmData)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: VlmTrain = field(default_factory=VlmTrain)
    source: str = "<dict>"


def vlm_recipe_from_dict(d: dict[str, Any], source: str = "<dict>") -> VlmRecipe:
    if not isinstance(d, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of sections, got {type(d).__name__}")
    sections = {"model": ModelSpec, "tokenizer": TokenizerSpec, "data": VlmData, "optim": OptimConfig,
                "train": VlmTrain}
    r = _build(VlmRecipe, {k: v for k, v in d.items() if k not in sections}, source)
    r.source = source
    for key, cls in sections.items():
        setattr(r, key, _build(cls, d.get(key), f"{source}: {key}"))
    t, m = r.train, r.model
    if sum(x is not None for x in (m.preset, m.config, m.init)) != 1:
        raise RecipeError(f"{source}: model: set exactly one of 'preset', 'config' or 'init'")
    if r.data.name != "digits":
        raise RecipeError(f"{source}: data: name must be 'digits' (the UCI digits), got {r.data.name!r}")
    for name in ("steps", "micro_batch", "accum"):
        if getattr(t, name) < 1:
            raise RecipeError(f"{source}: train: {name} must be >= 1, got {getattr(t, name)}")
    if t.dtype not in ("float32", "bfloat16"):
        raise RecipeError(f"{source}: train: dtype must be float32 or bfloat16, got {t.dtype!r}")
    if m.init is None and r.tokenizer.path is None and r.tokenizer.train is None:
        raise RecipeError(f"{source}: tokenizer: set 'path' or 'train' (or start the model from 'init')")
    return r


def load_vlm_recipe(path: str) -> VlmRecipe:
    import yaml

    if not os.path.isfile(path):
        raise RecipeError(f"recipe file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise RecipeError(f"{path}: not valid YAML ({e})") from None
    return vlm_recipe_from_dict({} if d is None else d, source=path)


# --------------------------------------------------------------------------------------------
# model and tokenizer
# --------------------------------------------------------------------------------------------
def caption_tokenizer(recipe: VlmRecipe, texts: list[str]):
    """The recipe's tokenizer, or a byte-level BPE trained on the captions with ``<|image|>`` added."""
    from evolm.tokenizer import Tokenizer, train_bpe

    spec = recipe.tokenizer
    if spec.path is not None:
        return Tokenizer.from_hf_dir(spec.path) if os.path.isdir(spec.path) else Tokenizer.from_file(spec.path)
    opts = dict(spec.train or {})
    vocab = int(opts.pop("vocab_size", 320))
    if opts:
        raise RecipeError(f"{recipe.source}: tokenizer.train: unknown key(s) {sorted(opts)} (valid: vocab_size)")
    return train_bpe(texts * 4, vocab_size=vocab, special_tokens=SPECIALS, chat_template=CAPTION_TEMPLATE)


def build_vlm(recipe: VlmRecipe, tokenizer):
    """The model of ``model.preset``/``config`` with ``overrides`` (``vocab_size: tokenizer``; the
    image token is the tokenizer's ``<|image|>`` unless ``vision.image_token_id`` says otherwise)."""
    from evolm.config import ModelConfig
    from evolm.loading import load_config
    from evolm.model import build

    m = recipe.model
    config = load_config(m.preset if m.preset is not None else m.config)
    overrides = dict(m.overrides)
    if overrides.get("vocab_size") == "tokenizer":
        overrides["vocab_size"] = tokenizer.vocab_size
    vision = dict(overrides.get("vision") or {})
    image_id = tokenizer.token_to_id(IMAGE_TOKEN)
    if vision.get("image_token_id", "tokenizer") == "tokenizer":
        if image_id is None:
            raise RecipeError(f"{recipe.source}: the tokenizer has no {IMAGE_TOKEN} token for vision.image_token_id")
        vision.update(image_token_id=image_id, extra_token_rows=0)
    if vision:
        overrides["vision"] = vision
    unknown = set(overrides) - set(config.to_dict())
    if unknown:
        raise RecipeError(f"{recipe.source}: model.overrides: unknown ModelConfig field(s) {sorted(unknown)}")
    config = ModelConfig.from_dict({**config.to_dict(), **overrides, "name": recipe.name})
    if config.vision is None:
        raise RecipeError(f"{recipe.source}: model: the model has no vision encoder; set model.overrides.vision")
    return build(config)


# --------------------------------------------------------------------------------------------
# examples and batches
# --------------------------------------------------------------------------------------------
@dataclass
class Captioned:
    ids: list[int]  # prompt + caption + EOS
    labels: list[int]  # IGNORE on the prompt
    image: int  # row of the pixel tensor
    digit: int
    digit_pos: int  # index into ids of the digit word's first token


def encode_captions(digits, tokenizer, prefix: list[int]) -> list[Captioned]:
    """Each digit's caption after ``prefix`` (the image placeholders + BOS, or BOS alone), trained
    on the caption and its end-of-sequence token."""
    from evolm.data.digits import PROMPT

    head = len(tokenizer.encode(PROMPT, add_special_tokens=False))
    eos = tokenizer.eos_id
    out = []
    for i, d in enumerate(digits):
        text = tokenizer.encode(d.caption, add_special_tokens=False)
        ids = prefix + text + [eos]
        out.append(Captioned(ids, [IGNORE] * len(prefix) + text + [eos], i, d.label, len(prefix) + head))
    return out


@dataclass
class Batch:
    input_ids: torch.Tensor
    targets: torch.Tensor
    images: dict | None  # evolm.infer.vision.load_images of the rows, or None (a text stage)
    digit_targets: torch.Tensor  # (B, T): the digit word's first token only, else IGNORE
    n_tokens: int


def collate(rows: list[Captioned], images: dict | None, pad_id: int) -> Batch:
    T = max(len(r.ids) for r in rows) - 1
    x = torch.full((len(rows), T), pad_id, dtype=torch.long)
    y = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    yd = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r.ids) - 1
        x[b, :n] = torch.tensor(r.ids[:-1])
        y[b, :n] = torch.tensor(r.labels[1:])
        yd[b, r.digit_pos - 1] = r.ids[r.digit_pos]
    imgs = take_images(images, [r.image for r in rows]) if images is not None else None
    return Batch(x, y, imgs, yd, sum(len(r.ids) - 1 for r in rows))


def forward(model, input_ids: torch.Tensor, images: dict | None, **kw) -> torch.Tensor:
    """The model on a batch, with its images when the stage shows them."""
    extra = image_inputs(model, images, input_ids) if images is not None else {}
    return model(input_ids, **extra, **kw)


@torch.no_grad()
def greedy_captions(model, prompts: torch.Tensor, images: dict | None, n_new: int, stop: int
                    ) -> list[list[int]]:
    """Greedy continuations of equal-length prompts, each step a full forward (captions are a few
    tokens; no cache is needed, and the image stays in every call the same way as in training)."""
    ids = prompts
    for _ in range(n_new):
        logits = forward(model, ids, images, last_only=True)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    out = []
    for row in ids[:, prompts.shape[1]:].tolist():
        out.append(row[:row.index(stop)] if stop in row else row)
    return out


# --------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------
class VlmTask:
    """Caption loss on the digits (the loop's Task protocol): images on unless the stage is ``text``."""

    def __init__(self, recipe: VlmRecipe, model, tokenizer, rt: Runtime, log: Callable[[str], None]):
        from evolm.data.digits import PROMPT, split_digits
        from evolm.infer.vision import image_prefix, load_images

        d, t = recipe.data, recipe.train
        train, val = split_digits(d.val_fraction, d.seed)
        self.train_digits, self.val_digits = train[:d.limit] if d.limit else train, val[:d.val_limit] if d.val_limit else val
        self.tokenizer, self.rt, self.recipe = tokenizer, rt, recipe
        self.images = t.images
        bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
        self.prefix = image_prefix(model, tokenizer) if self.images else bos
        self.train = encode_captions(self.train_digits, tokenizer, self.prefix)
        self.val = encode_captions(self.val_digits, tokenizer, self.prefix)
        self.train_images = load_images(model, [x.image for x in self.train_digits]) if self.images else None
        self.val_images = load_images(model, [x.image for x in self.val_digits]) if self.images else None
        self.prompt = self.prefix + tokenizer.encode(PROMPT, add_special_tokens=False)
        self.pad = tokenizer.eos_id
        self.batch_size, self.seed = t.micro_batch, recipe.seed
        self.epoch, self.cursor, self._order = 0, 0, None
        log(f"data: {len(self.train)} training and {len(self.val)} held-out digit images, "
            f"{'with' if self.images else 'without'} images; a caption is {len(self.train[0].ids)} tokens "
            f"({len(self.prefix)} of prompt)")

    # --- data order --------------------------------------------------------------------------
    def start_phase(self, index: int, phase: Phase) -> None:
        self._order = None

    def _epoch_order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(len(self.train), generator=g).tolist()

    def next_batch(self) -> Batch:
        if self._order is None:
            self._order = self._epoch_order()
        if (self.cursor + 1) * self.batch_size > len(self._order):
            self.epoch, self.cursor = self.epoch + 1, 0
            self._order = self._epoch_order()
        idx = self._order[self.cursor * self.batch_size:(self.cursor + 1) * self.batch_size]
        self.cursor += 1
        return collate([self.train[i] for i in idx], self.train_images, self.pad)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.cursor, self._order = s["epoch"], s["cursor"], None

    # --- loss and evaluation ---------------------------------------------------------------
    def loss(self, model, b: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        dev = self.rt.device
        loss = forward(model, b.input_ids.to(dev), b.images, targets=b.targets.to(dev))
        return loss, {"tokens": b.n_tokens}

    def evaluate(self, model) -> dict[str, float]:
        """Caption loss, digit-word loss and greedy caption accuracy over the held-out images."""
        from evolm.data.digits import named_digit

        total = digit_total = 0.0
        count = hits = 0
        n_cap = 0
        dev = self.rt.device
        for s in range(0, len(self.val), 128):
            rows = self.val[s:s + 128]
            b = collate(rows, self.val_images, self.pad)
            n = int((b.targets != IGNORE).sum())
            total += float(forward(model, b.input_ids.to(dev), b.images, targets=b.targets.to(dev))) * n
            count += n
            digit_total += float(forward(model, b.input_ids.to(dev), b.images, targets=b.digit_targets.to(dev))) \
                * len(rows)
            caps = self.caption(model, b.images, len(rows))
            hits += sum(named_digit(c) == r.digit for c, r in zip(caps, rows))
            n_cap += len(rows)
        loss = total / max(count, 1)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_digit_loss": digit_total / max(n_cap, 1),
                "val_accuracy": hits / max(n_cap, 1)}

    def caption(self, model, images: dict | None, n: int) -> list[str]:
        """Greedy captions (the prompt "a handwritten digit" continued) of ``n`` images."""
        from evolm.data.digits import PROMPT

        prompts = torch.tensor([self.prompt] * n, device=self.rt.device)
        new = greedy_captions(model, prompts, images, 4, self.tokenizer.eos_id)
        return [PROMPT + self.tokenizer.decode(r, skip_special_tokens=True) for r in new]

    def example_rows(self, n: int) -> list[int]:
        """Held-out rows showing ``n`` different digits (the first image of each)."""
        rows, seen = [], set()
        for i, d in enumerate(self.val_digits):
            if d.label not in seen and len(rows) < n:
                seen.add(d.label)
                rows.append(i)
        return rows

    def samples(self, model) -> list[tuple[str, str]]:
        from evolm.data.digits import WORDS

        rows = self.example_rows(self.recipe.train.samples)
        if not rows:
            return []
        images = take_images(self.val_images, rows) if self.val_images is not None else None
        was = model.training
        model.eval()
        caps = self.caption(model, images, len(rows))
        model.train(was)
        return [(f"[held-out image of a {WORDS[self.val_digits[i].label]}] -> ", c) for i, c in zip(rows, caps)]


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
def write_example_images(task: VlmTask, out: Path, n: int = 10) -> list[str]:
    """PNGs of the first held-out image of each digit (``evolm generate --image`` tries them), at
    their own 8x8 pixels: read back, they give the model exactly the tensors evaluation gave it."""
    from PIL import Image

    folder = out / "images"
    folder.mkdir(parents=True, exist_ok=True)
    from evolm.data.digits import WORDS

    written = []
    for i in task.example_rows(n):
        d = task.val_digits[i]
        path = folder / f"val_{d.index}_{WORDS[d.label]}.png"
        Image.fromarray(d.image).save(path)
        written.append(str(path))
    return written


def run_vlm(recipe: VlmRecipe, out_dir: str | None = None, resume: bool = False, log=print,
            stop_after_steps: int | None = None) -> dict[str, Any]:
    """Train one stage of a VLM recipe; returns the summary (also ``vlm_summary.json`` in the run folder)."""
    from evolm.data.digits import split_digits

    t0 = time.time()
    rt = Runtime.create("none")
    out = Path(out_dir or recipe.out or f"runs/{recipe.name}")
    t = recipe.train
    if t.threads:
        torch.set_num_threads(t.threads)
    seed_all(recipe.seed)
    if recipe.model.init is not None:  # the previous stage's run folder (model + tokenizer)
        from evolm.loading import load

        if recipe.model.overrides:
            raise RecipeError(f"{recipe.source}: model: overrides apply to a preset or config, not to 'init'")
        model, tokenizer = load(recipe.model.init, need_tokenizer=True)
        model = model.float()
        if model.config.vision is None:
            raise RecipeError(f"{recipe.source}: model.init {recipe.model.init}: no vision encoder in this model")
    else:
        train, _ = split_digits(recipe.data.val_fraction, recipe.data.seed)
        tokenizer = caption_tokenizer(recipe, [d.caption for d in train])
        model = build_vlm(recipe, tokenizer)
    model.train().to(rt.device)
    from evolm.train.freeze import freeze

    n_total = sum(p.numel() for p in model.parameters())
    n_train = n_total - freeze(model, t.freeze)  # train/freeze.py (the loop applies train.freeze again: a no-op)
    log(f"model: {n_total:,} parameters, {n_train:,} trainable (frozen: {', '.join(t.freeze) or 'none'}); fusion "
        f"{getattr(model.config.vision, 'fusion', 'cross_attention')}")
    task = VlmTask(recipe, model, tokenizer, rt, log)
    phase = Phase(recipe.name, steps=t.steps, accum=t.accum, **values_of(t, LRShape))
    cfg = LoopConfig(**values_of(recipe.optim, OptimConfig), **values_of(t, LoopSettings), eval_at_start=True)
    out.mkdir(parents=True, exist_ok=True)
    images = write_example_images(task, out)
    summary = run(model, task, [phase], cfg, out, tokenizer=tokenizer, resume=resume, rt=rt, log=log,
                  stop_after_steps=stop_after_steps, seed=recipe.seed)
    before = summary.get("initial_eval") or {}
    summary.update(frozen=list(t.freeze), images=t.images, trainable_params=n_train, total_params=n_total,
                   example_images=images, wall_s=time.time() - t0)
    if not summary["stopped_early"]:
        keep = {k: v for k, v in summary.items() if k not in ("losses", "rows")}
        (out / "vlm_summary.json").write_text(json.dumps(keep, indent=2, default=str))
        log(f"done: {summary['steps']} steps in {summary['wall_s']:.0f}s; held-out caption loss "
            f"{before.get('val_loss', float('nan')):.4f} -> {summary.get('val_loss', float('nan')):.4f}, digit-word "
            f"loss {before.get('val_digit_loss', float('nan')):.3f} -> {summary.get('val_digit_loss', float('nan')):.3f},"
            f" caption accuracy {before.get('val_accuracy', float('nan')):.1%} -> "
            f"{summary.get('val_accuracy', float('nan')):.1%}; model in {out}")
    return summary


__all__ = ["VlmRecipe", "load_vlm_recipe", "vlm_recipe_from_dict", "run_vlm",
           "VlmTask", "encode_captions", "greedy_captions"]
