"""Pretraining recipes: a model, a tokenizer, data and one or more stages, as a YAML file.

Modern pretraining runs in stages (Llama 3, OLMo 2, DeepSeek-V3): regular pretraining on the
broad mixture, long-context pretraining (longer sequences, a larger RoPE base or a RoPE scaling),
and annealing on the highest-quality data with the learning rate decayed to zero. A recipe lists
those stages; each one sets its mixture, sequence length, token budget and LR phase.

Every section is a dataclass; an unknown key fails with the closest valid one suggested, a value
of the wrong type (``seq_len: [1, 'x']``) with the key and the declared type. The sections the
loop reads extend its settings (``config.py``): ``optim`` is ``OptimConfig``, ``train`` extends
``LoopSettings``, a stage extends ``LRShape``; so each field is declared once.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from evolm.data.objectives import ObjectiveConfig, ObjectiveError
from evolm.inputs import describe, did_you_mean, first_line, has_type, short
from evolm.parallel.layout import FIELDS as PARALLEL_FIELDS
from evolm.parallel.layout import LayoutError, ParallelLayout, check_distributed, layout_from_dict

from evolm.train.config import LoopSettings, LRShape, OptimConfig
from evolm.train.optim import SCHEDULES


class RecipeError(ValueError):
    """A recipe that cannot run; the message names the file, section and key."""


@dataclass
class ModelSpec:
    preset: str | None = None  # a preset name (evolm arch list)
    config: str | None = None  # or a ModelConfig JSON / HF config.json
    init: str | None = None  # or start from a checkpoint / HF folder / GGUF
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class TokenizerSpec:
    path: str | None = None  # tokenizer.json, an HF folder, or a GGUF file
    train: dict[str, Any] | None = None  # {vocab_size, sources (default: data sources), special_tokens}


@dataclass
class TrainSpec(LoopSettings):
    """The ``train`` section: the loop's settings (``config.LoopSettings``) and pretraining's own."""

    micro_batch: int = 8  # sequences per forward/backward on one process
    tokens_per_step: int | None = None  # gradient accumulation reaches this (None: one micro batch)
    doc_masking: bool = False  # attention stays inside each packed document
    eval_batches: int = 8
    eval_data: str | None = None  # a prepared data folder whose val split is the held-out set (default: the run's)
    sample_prompts: list[str] = field(default_factory=lambda: ["The "])
    sample_tokens: int = 48
    threads: int | None = None


@dataclass
class StageSpec(LRShape):
    """One stage: its LR shape within the stage (``config.LRShape``), data and context length."""

    name: str = "pretrain"
    tokens: int = 1_000_000
    seq_len: int = 256
    mixture: dict[str, float] | str | None = None  # source -> weight, a quality tier ("high"), or None: data's
    rope_theta: float | None = None  # long-context extension
    rope_scaling: dict[str, Any] | None = None


@dataclass
class Recipe:
    name: str = "run"
    seed: int = 1337
    out: str | None = None
    model: ModelSpec = field(default_factory=ModelSpec)
    tokenizer: TokenizerSpec = field(default_factory=TokenizerSpec)
    data: dict[str, Any] = field(default_factory=dict)  # evolm.data.prepare spec (sources + options)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSpec = field(default_factory=TrainSpec)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)  # clm | mlm | span_corruption | denoise
    stages: list[StageSpec] = field(default_factory=lambda: [StageSpec()])
    # how the world is split (evolm.parallel.layout): dp_shard, dp_replicate, tp, pp, cp, ep; None:
    # train.distributed alone decides (none | ddp | fsdp over the whole world)
    parallel: ParallelLayout | None = None
    source: str = "<dict>"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        return d


def _build(cls, d: Any, where: str):
    if d is None:
        return cls()
    if not isinstance(d, dict):
        raise RecipeError(f"{where}: expected a mapping, got {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)} - {"source"}
    for key, value in d.items():
        if key not in known:
            raise RecipeError(f"{where}: unknown key '{key}'{did_you_mean(key, known)} "
                              f"(valid: {', '.join(sorted(known))})")
        if not has_type(value, hints[key]):
            as_text = isinstance(value, str) and has_type(1.0, hints[key])
            note = " (YAML reads 3e-4 as text: write 3.0e-4)" if as_text else ""
            raise RecipeError(f"{where}: {key} must be {describe(hints[key])}, got {value!r}{note}")
    try:
        return cls(**d)
    except TypeError as e:
        raise RecipeError(f"{where}: {e}") from None


def recipe_from_dict(d: dict[str, Any], source: str = "<dict>") -> Recipe:
    if not isinstance(d, dict):
        raise RecipeError(f"{source}: a recipe is a mapping of sections, got {type(d).__name__}")
    sections = ("model", "tokenizer", "optim", "train", "objective", "stages", "parallel")
    top = {k: v for k, v in d.items() if k not in sections}
    r = _build(Recipe, top, source)
    r.source = source
    if isinstance(d.get("model"), str):
        r.model = ModelSpec(preset=d["model"])
    else:
        r.model = _build(ModelSpec, d.get("model"), f"{source}: model")
    r.tokenizer = _build(TokenizerSpec, d.get("tokenizer"), f"{source}: tokenizer")
    r.optim = _build(OptimConfig, d.get("optim"), f"{source}: optim")
    r.train = _build(TrainSpec, d.get("train"), f"{source}: train")
    objective = d.get("objective")
    try:
        r.objective = _build(ObjectiveConfig, {"name": objective} if isinstance(objective, str) else objective,
                             f"{source}: objective")
    except ObjectiveError as e:  # its message names the objective's field
        raise RecipeError(f"{source}: {e}") from None
    stages = d.get("stages", [{}])
    if not isinstance(stages, list) or not stages:
        raise RecipeError(f"{source}: stages must be a non-empty list")
    r.stages = [_build(StageSpec, s, f"{source}: stages[{i}]") for i, s in enumerate(stages)]
    if d.get("parallel") is not None:
        try:
            r.parallel = layout_from_dict(d["parallel"], f"{source}: parallel")
        except LayoutError as e:
            raise RecipeError(str(e)) from None
    validate(r)
    return r


def load_recipe(path: str) -> Recipe:
    if not os.path.isfile(path):
        raise RecipeError(f"recipe file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f)
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as e:
        raise RecipeError(f"{path}: not valid YAML ({first_line(e)})") from None
    return recipe_from_dict({} if d is None else d, source=path)


def _check_sequence_split(where: str, seq_len: int, layout: ParallelLayout | None) -> None:
    """A sequence the layout splits must split evenly: context parallelism cuts it into 2 x cp
    chunks (the zigzag layout, ``parallel/ring.py``), tensor parallelism's sequence-parallel
    regions cut each cp rank's part into tp (``parallel/tensor.py``). Said here, with the stage,
    rather than by a collective deep inside the first step."""
    if layout is None:
        return
    cp, tp = max(layout.cp, 1), max(layout.tp, 1)
    if cp > 1 and seq_len % (2 * cp):
        raise RecipeError(f"{where}: seq_len {seq_len} must be a multiple of 2 x cp = {2 * cp} "
                          f"(context parallelism splits each sequence into 2 x cp chunks)")
    if tp > 1 and seq_len % (cp * tp):
        raise RecipeError(f"{where}: seq_len {seq_len} must be a multiple of cp x tp = {cp * tp} "
                          f"(tensor parallelism splits each rank's {seq_len // cp} tokens over tp = {tp})")


def validate(r: Recipe) -> None:
    src = r.source
    m = r.model
    if sum(x is not None for x in (m.preset, m.config, m.init)) != 1:
        raise RecipeError(f"{src}: model: set exactly one of 'preset', 'config' or 'init'")
    t = r.train
    if t.dtype not in ("float32", "bfloat16"):
        raise RecipeError(f"{src}: train: dtype must be float32 or bfloat16, got {t.dtype!r}")
    if t.distributed not in ("none", "ddp", "fsdp"):
        raise RecipeError(f"{src}: train: distributed must be none, ddp or fsdp, got {t.distributed!r}")
    try:
        check_distributed(t.distributed, r.parallel)
    except LayoutError as e:
        raise RecipeError(f"{src}: {e}") from None
    if t.micro_batch < 1:
        raise RecipeError(f"{src}: train: micro_batch must be >= 1")
    if r.tokenizer.path is None and r.tokenizer.train is None and m.init is None:
        raise RecipeError(f"{src}: tokenizer: set 'path' or 'train' (or start the model from 'init')")
    if not r.data.get("sources"):
        raise RecipeError(f"{src}: data: needs 'sources' (built-in corpus names, paths or source dicts)")
    if r.objective.seq2seq and t.doc_masking:
        raise RecipeError(f"{src}: train: doc_masking is for the clm and mlm objectives, not {r.objective.name}")
    names = [s.name for s in r.stages]
    if len(set(names)) != len(names):
        raise RecipeError(f"{src}: stages: names must be unique, got {names}")
    for i, s in enumerate(r.stages):
        where = f"{src}: stages[{i}] ({s.name})"
        if s.schedule not in SCHEDULES:
            raise RecipeError(f"{where}: schedule must be one of {list(SCHEDULES)}, got {s.schedule!r}")
        if s.tokens <= 0 or s.seq_len <= 0:
            raise RecipeError(f"{where}: tokens and seq_len must be positive")
        _check_sequence_split(where, s.seq_len, r.parallel)
        if isinstance(s.mixture, str):
            if s.mixture not in ("high", "medium", "low"):
                raise RecipeError(f"{where}: mixture as a string names a quality tier (high, medium, low), "
                                  f"got {s.mixture!r}")
        elif s.mixture is not None and (not isinstance(s.mixture, dict) or not s.mixture):
            raise RecipeError(f"{where}: mixture must be a mapping of source name -> weight, or a tier name")


def apply_parallel_flags(r: Recipe, **degrees: int | None) -> Recipe:
    """``evolm pretrain --tp 2 ...``: the given degrees (None: not given) override the recipe's
    ``parallel:`` section (made from the defaults when it has none); the result is validated."""
    given = {k: v for k, v in degrees.items() if v is not None}
    unknown = set(given) - set(PARALLEL_FIELDS)
    if unknown:
        raise RecipeError(f"unknown parallel degree(s) {sorted(unknown)} (valid: {', '.join(PARALLEL_FIELDS)})")
    if not given:
        return r
    base = r.parallel.to_dict() if r.parallel is not None else {}
    try:
        r.parallel = layout_from_dict({**base, **given}, f"{r.source}: parallel (with the command-line flags)")
    except LayoutError as e:
        raise RecipeError(str(e)) from None
    validate(r)
    return r
