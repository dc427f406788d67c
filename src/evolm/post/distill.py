"""Knowledge distillation: a student learns the teacher's next-token distributions, on the shared loop.

``evolm distill --teacher T --student S --data D`` trains the student S to match the teacher T's
softened next-token distribution at every position of D's text (Hinton et al. 2015, "Distilling
the Knowledge in a Neural Network", arXiv:1503.02531), with the divergence of GKD (Agarwal et al.
2024, arXiv:2306.13649) as TRL's ``GKDTrainer`` defines it: ``--beta 0`` forward KL, ``1`` reverse
KL, in between the generalized JSD, at ``--temperature`` (:mod:`evolm.post.distill_loss`, fused
with both LM heads so neither model's full logits exist).

- **Data**: plain text, a built-in corpus (``shakespeare``, ``kjv``, ``python_stdlib``,
  ``python_docs``) or a text / JSONL / Parquet file (``evolm.data.sources``), tokenized with the
  teacher's tokenizer, documents split into train and held out by a seeded hash
  (``evolm.data.prepare.split_documents``), then cut into rows of ``--seq-len`` tokens.
- **On-policy** (GKD): with probability ``--lmbda`` a step's batch is the student's own sampled
  continuations (``--max-new-tokens`` at ``--sample-temperature``) of each row's first
  ``--prompt-len`` tokens, scored by the teacher on the continuation tokens only, as TRL's
  ``training_step`` does; else with ``--seq-kd`` the *teacher's* continuations (sequence-level KD,
  Kim & Rush 2016); else the data itself. The draw and the sampling are seeded by the step, so a
  resumed run continues bit for bit.
- **Mixed objective**: ``--kd-weight`` x divergence + ``--ce-weight`` x next-token cross-entropy
  on the data's real tokens. ``--kd-weight 0 --ce-weight 1`` is plain language-model training of
  the same student on the same tokens: the baseline distillation is compared with (the teacher is
  then not run while training, only at evaluation).
- **Models**: the teacher is any model ``evolm.load`` reads, frozen, in eval mode. The student is a
  model too (``--student`` a folder or GGUF file: a pruned model, a smaller relative), or a config
  (a preset name or config JSON, changed by ``--student-override n_layers=6``) built with random
  weights from ``--seed``. Architectures may differ; the vocabularies must be the same, token for
  token, or :class:`VocabularyMismatchError` says where they part.

Held-out metrics at each evaluation: ``val_kl`` (forward KL(teacher || student) per token at
temperature 1, the "distance to the teacher" both objectives are judged by), ``val_loss`` / ``val_ppl``
(the student's cross-entropy on the real next tokens; the teacher's is logged once as
``teacher_val_loss``) and, when it is another quantity, ``val_distill`` (the configured divergence).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evolm.post.common import LoopOptions, peak_memory_mb, run_folder, save_policy, summary_text
from evolm.post.distill_loss import DEFAULT_CHUNK, IGNORE, check_beta_temperature, fused_distill_loss
from evolm.post.flags import flat, option, require


class VocabularyMismatchError(ValueError):
    """Teacher and student do not share one vocabulary: logit distillation compares distributions
    over the same token ids, so there is nothing to compare."""


# ---------------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------------
def _tokens(tok) -> list[str | None]:
    return [tok.id_to_token(i) for i in range(len(tok))]


def check_vocabularies(teacher, student, teacher_tok, student_tok, teacher_name: str, student_name: str) -> None:
    """Raise :class:`VocabularyMismatchError` unless both models' heads have the same size and
    (when both carry a tokenizer) their tokenizers give every id the same token."""
    vt, vs = teacher.config.vocab_size, student.config.vocab_size
    if vt != vs:
        raise VocabularyMismatchError(
            f"teacher {teacher_name} has a vocabulary of {vt:,} tokens but student {student_name} has {vs:,}: "
            f"logit distillation needs the same vocabulary (a student config with vocab_size={vt} and the "
            f"teacher's tokenizer)")
    if teacher_tok is None or student_tok is None:
        return
    a, b = _tokens(teacher_tok), _tokens(student_tok)
    if len(a) != len(b):
        raise VocabularyMismatchError(
            f"teacher {teacher_name}'s tokenizer has {len(a):,} tokens but student {student_name}'s has {len(b):,}")
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            raise VocabularyMismatchError(
                f"teacher {teacher_name} and student {student_name} have {vt:,} tokens each, but their tokenizers "
                f"differ first at id {i}: teacher {x!r}, student {y!r}")


def _override(item: str) -> tuple[str, Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--student-override {item!r}: expected KEY=VALUE (e.g. n_layers=6)")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def is_model_path(spec: str) -> bool:
    """True when ``spec`` holds weights (a GGUF file, an evolm or Hugging Face model folder)."""
    from evolm.loading import detect_format

    p = Path(spec)
    if not p.exists() or (p.is_file() and p.suffix == ".json"):
        return False
    try:
        detect_format(p)
    except ValueError:
        return False
    return not (p.is_dir() and not any(p.glob("*.safetensors")) and not any(p.glob("*.gguf")))


def load_student(spec: str, overrides: tuple[str, ...], seed: int):
    """(student, its tokenizer or None, 'weights' | 'random'): a model's weights, or a config
    (preset name, config JSON) with ``overrides`` built with random weights seeded by ``seed``."""
    from evolm.loading import load, load_config
    from evolm.model import build
    from evolm.train.loop import seed_all

    if is_model_path(spec):
        if overrides:
            raise ValueError(f"--student-override changes a config, but --student {spec} is a model with weights")
        model, tok = load(spec)
        return model.float(), tok, "weights"
    config = load_config(spec)
    if overrides:
        config = config.replace(**dict(_override(o) for o in overrides))
    seed_all(seed)
    return build(config), None, "random"


def load_teacher(path: str, dtype: str):
    """The frozen teacher in eval mode (no dropout) and its tokenizer."""
    from evolm.loading import load

    model, tok = load(path)
    model = model.to(torch.bfloat16 if dtype == "bfloat16" else torch.float32).eval().requires_grad_(False)
    if tok is None:
        raise ValueError(f"--teacher {path}: no tokenizer beside the weights (tokenizer.json or GGUF metadata); "
                         f"distillation tokenizes --data with the teacher's tokenizer")
    return model, tok


def _raw(model):
    """The module under a DDP wrapper (the head's weights are read from it)."""
    return getattr(model, "module", model)


# ---------------------------------------------------------------------------------------------
# data: text -> rows of token ids
# ---------------------------------------------------------------------------------------------
def read_token_rows(data: str, tokenizer, seq_len: int, *, max_tokens: int, val_rows: int, seed: int,
                    data_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, held-out rows), each (n, seq_len + 1) token ids: documents from ``data``,
    held out by a seeded hash of their text, each tokenized and closed with EOS, concatenated and
    cut into rows. Train tokens stop at ``max_tokens``; ``val_rows`` rows are held out."""
    from evolm.data.prepare import split_documents
    from evolm.data.sources import DataError, SourceSpec, iter_documents

    docs = list(iter_documents(SourceSpec.from_any(data), data_dir))
    if len(docs) < 2:
        raise DataError(f"--data {data}: {len(docs)} document(s); distillation holds whole documents out for "
                        f"validation and needs at least 2")
    train_docs, val_docs = split_documents(docs, 0.05, 1, seed)
    eos = tokenizer.eos_id
    width = seq_len + 1

    def rows(ds, budget: int) -> torch.Tensor:
        ids: list[int] = []
        for s in range(0, len(ds), 64):
            for e in tokenizer.encode_batch([d.text for d in ds[s:s + 64]], add_special_tokens=False):
                ids += e + ([eos] if eos is not None else [])
            if len(ids) >= budget:
                break
        n = min(len(ids), budget) // width
        return torch.tensor(ids[:n * width], dtype=torch.long).view(n, width)

    val = rows(val_docs, val_rows * width)
    train = rows(train_docs, max_tokens)
    if len(train) == 0 or len(val) == 0:
        raise DataError(f"--data {data}: too little text for one {seq_len}-token row of training and of held-out "
                        f"data ({len(train)} / {len(val)} rows); lower --seq-len")
    return train, val


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T)
    labels: torch.Tensor  # (B, T): the next token of each position, -100 where not trained
    source: str = "data"  # data | student | teacher (whose continuations these are)


def data_batch(rows: torch.Tensor) -> Batch:
    return Batch(rows[:, :-1].contiguous(), rows[:, 1:].contiguous())


def continuation_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, source: str) -> Batch:
    """Prompt + completion rows, right-padded; only completion tokens are targets (TRL's labels)."""
    seqs = [p + c for p, c in zip(prompts, completions)]
    T = max(len(s) for s in seqs) - 1
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE, dtype=torch.long)
    for b, (p, s) in enumerate(zip(prompts, seqs)):
        ids[b, :len(s) - 1] = torch.tensor(s[:-1])
        labels[b, len(p) - 1:len(s) - 1] = torch.tensor(s[len(p):])
    return Batch(ids, labels, source)


# ---------------------------------------------------------------------------------------------
# the objective's settings
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DistillOptions:
    """What the student is trained to match, and on which sequences (defaults: TRL's GKD, except
    that on-policy sampling is off: on text corpora the data itself is the usual distillation set)."""

    flag_group = "objective"

    beta: float = option(0.5, "0: forward KL(teacher||student), 1: reverse KL, between: generalized JSD (TRL's "
                              "default 0.5)")
    temperature: float = option(1.0, "softmax temperature of both models inside the divergence")
    kd_weight: float = option(1.0, "weight of the divergence")
    ce_weight: float = option(0.0, "weight of the next-token cross-entropy on the data (kd 0, ce 1: no teacher)")
    lmbda: float = option(0.0, "probability that a step trains on the student's own samples (GKD on-policy; TRL "
                               "default 0.5)")
    seq_kd: bool = option(False, "otherwise train on the teacher's samples (sequence-level KD)")
    prompt_len: int = option(32, "tokens of each row that prompt on-policy / seq-kd sampling")
    max_new_tokens: int = option(64, "tokens sampled per prompt")
    sample_temperature: float = option(0.9, "sampling temperature (TRL's GKDConfig.temperature)")
    chunk: int = option(DEFAULT_CHUNK, "rows of logits per chunk of the fused loss (memory ~ chunk x vocab)")

    def __post_init__(self):
        try:
            check_beta_temperature(self.beta, self.temperature)
        except ValueError as e:
            name = "beta" if "beta" in str(e) else "temperature"
            require(self, name, False, str(e))
        for name in ("kd_weight", "ce_weight"):
            require(self, name, getattr(self, name) >= 0, f"must be >= 0, got {getattr(self, name)}")
        require(self, "kd_weight", self.kd_weight > 0 or self.ce_weight > 0, "and --ce-weight are both 0: no loss")
        require(self, "lmbda", 0.0 <= self.lmbda <= 1.0, f"must be in [0, 1], got {self.lmbda}")
        for name in ("prompt_len", "max_new_tokens", "chunk"):
            require(self, name, getattr(self, name) >= 1, f"must be >= 1, got {getattr(self, name)}")
        require(self, "sample_temperature", self.sample_temperature >= 0,
                f"must be >= 0 (0: greedy), got {self.sample_temperature}")
        require(self, "kd_weight", self.kd_weight > 0 or not (self.lmbda or self.seq_kd),
                "0 with --lmbda/--seq-kd: sampled continuations have no real next tokens, only the divergence "
                "trains on them")

    @property
    def samples(self) -> bool:
        return self.lmbda > 0 or self.seq_kd


# ---------------------------------------------------------------------------------------------
# the task
# ---------------------------------------------------------------------------------------------
class DistillTask:
    """The loop's Task: batches of rows (or sampled continuations), the mixed loss, held-out KL."""

    def __init__(self, student, teacher, train: torch.Tensor, val: torch.Tensor, opts: DistillOptions, *,
                 batch_size: int, tokenizer, seed: int, device: torch.device | None = None):
        self.student, self.teacher, self.train, self.val = student, teacher, train, val
        self.opts, self.batch_size, self.tokenizer, self.seed = opts, batch_size, tokenizer, seed
        self.device = device or torch.device("cpu")
        self.epoch, self.cursor, self.drawn = 0, 0, 0
        self.order: list[int] | None = None
        self.teacher_val_loss: float | None = None

    # --- data order ------------------------------------------------------------------------------
    def start_phase(self, index: int, phase) -> None:
        pass

    def _shuffle(self) -> None:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.order = torch.randperm(len(self.train), generator=g).tolist()

    def _rows(self) -> torch.Tensor:
        if self.order is None:
            self._shuffle()
        picked = []
        while len(picked) < self.batch_size:
            if self.cursor >= len(self.order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._shuffle()
            picked.append(self.order[self.cursor])
            self.cursor += 1
        return self.train[picked]

    def next_batch(self) -> Batch:
        rows = self._rows()
        o = self.opts
        if not o.samples:
            return data_batch(rows)
        n = self.drawn
        self.drawn += 1
        on_policy = random.Random(self.seed * 1_000_003 + n).random() < o.lmbda  # TRL: random() <= lmbda
        if not (on_policy or o.seq_kd):
            return data_batch(rows)
        who = "student" if on_policy else "teacher"
        return self.sample(_raw(self.student) if on_policy else self.teacher, rows, who, self.seed * 7_919 + n)

    def sample(self, model, rows: torch.Tensor, who: str, seed: int) -> Batch:
        """Continuations of each row's prompt by ``model`` (up to and including an end token)."""
        from evolm.infer import SamplingParams, generate

        o, tok = self.opts, self.tokenizer
        prompts = rows[:, :min(o.prompt_len, rows.shape[1] - 1)].tolist()
        params = SamplingParams(max_new_tokens=o.max_new_tokens, temperature=o.sample_temperature, seed=seed,
                                stop_token_ids=tok.eos_ids if tok is not None else ())
        outs = generate(model, prompts, params)
        pad = tok.pad_id if tok is not None and tok.pad_id is not None else 0
        return continuation_batch(prompts, [c or [pad] for c in outs], pad, who)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "drawn": self.drawn}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.cursor, self.drawn = s["epoch"], s["cursor"], s["drawn"]
        self._shuffle()

    # --- the loss ----------------------------------------------------------------------------------
    def _teacher_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(ids, return_hidden=True)

    def divergence(self, h_s, student, h_t, labels, beta: float, temperature: float) -> torch.Tensor:
        ws, bs = student.head_weight_bias()
        wt, bt = self.teacher.head_weight_bias()
        return fused_distill_loss(h_s, ws, h_t, wt, labels, b_student=bs, b_teacher=bt, beta=beta,
                                  temperature=temperature, student_softcap=student.config.final_softcap,
                                  teacher_softcap=self.teacher.config.final_softcap, chunk=self.opts.chunk)

    def cross_entropy(self, h_s, student, labels) -> torch.Tensor:
        from evolm.nn.loss import fused_linear_cross_entropy

        w, b = student.head_weight_bias()
        return fused_linear_cross_entropy(h_s, w, labels, b, student.config.final_softcap)

    def loss(self, model, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        o, student = self.opts, _raw(model)
        ids, labels = batch.input_ids.to(self.device), batch.labels.to(self.device)
        h_s = model(ids, return_hidden=True)
        total = torch.zeros((), device=self.device)
        metrics: dict[str, float] = {"tokens": int((labels != IGNORE).sum()),
                                     "on_policy": float(batch.source == "student")}
        if o.kd_weight > 0:
            kd = self.divergence(h_s, student, self._teacher_hidden(ids), labels, o.beta, o.temperature)
            total = total + o.kd_weight * kd
            metrics["kd"] = float(kd.detach())
        if o.ce_weight > 0 and batch.source == "data":
            ce = self.cross_entropy(h_s, student, labels)
            total = total + o.ce_weight * ce
            metrics["ce"] = float(ce.detach())
        aux = student.aux_loss()
        return (total + aux if aux is not None else total), metrics

    # --- held-out ------------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model) -> dict[str, float]:
        """Token-weighted held-out KL(teacher || student), the student's cross-entropy and, when it
        differs, the configured divergence."""
        student = _raw(model)
        o = self.opts
        other = o.kd_weight > 0 and not (o.beta == 0 and o.temperature == 1.0)  # a divergence val_kl is not
        sums = {"kl": 0.0, "loss": 0.0, "distill": 0.0, "teacher": 0.0}
        n = 0
        for s in range(0, len(self.val), self.batch_size):
            b = data_batch(self.val[s:s + self.batch_size])
            ids, labels = b.input_ids.to(self.device), b.labels.to(self.device)
            k = int(labels.numel())
            h_s, h_t = model(ids, return_hidden=True), self._teacher_hidden(ids)
            sums["kl"] += float(self.divergence(h_s, student, h_t, labels, 0.0, 1.0)) * k
            sums["loss"] += float(self.cross_entropy(h_s, student, labels)) * k
            if other:
                sums["distill"] += float(self.divergence(h_s, student, h_t, labels, o.beta, o.temperature)) * k
            if self.teacher_val_loss is None:
                sums["teacher"] += float(self.cross_entropy(h_t, self.teacher, labels)) * k
            n += k
        out = {"val_kl": sums["kl"] / n, "val_loss": sums["loss"] / n,
               "val_ppl": math.exp(min(sums["loss"] / n, 50.0))}
        if other:
            out["val_distill"] = sums["distill"] / n
        if self.teacher_val_loss is None:
            self.teacher_val_loss = sums["teacher"] / n
        return out

    def save_final(self, model, state: dict, out) -> None:
        save_policy(model, state, out, self.tokenizer, None)


# ---------------------------------------------------------------------------------------------
# `evolm distill`
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Everything ``evolm distill`` runs from: teacher, student, data, objective and the loop."""

    teacher: str = option(help="the model to learn from: HF folder, GGUF file or evolm checkpoint/run")
    student: str = option(help="the model to train: a model (folder / GGUF: starts from its weights) or a config "
                               "(preset name, config JSON: random weights)")
    data: str = option(help="text to distill on: a built-in corpus (shakespeare, kjv, python_stdlib, python_docs) "
                            "or a text / JSONL / Parquet file")
    student_override: tuple[str, ...] = option((), "KEY=VALUE change of the student config (repeatable), e.g. "
                                                   "n_layers=6", metavar="KEY=VALUE")
    out: str | None = option(None, "run folder (default runs/distill-<data name>)")
    data_dir: str | None = option(None, "where the built-in corpora are (default data/corpora)")
    seq_len: int = option(256, "tokens per training row")
    batch_size: int = option(8, "rows per micro-batch")
    max_tokens: int = option(2_000_000, "training tokens read from --data at most")
    val_rows: int = option(16, "held-out rows of --seq-len tokens")
    teacher_dtype: str = option("float32", "the teacher's weights: float32 | bfloat16", choices=["float32", "bfloat16"])
    threads: int | None = option(None)
    json: bool = option(False, "print the summary as JSON")
    objective: DistillOptions = option(DistillOptions())
    loop: LoopOptions = option(LoopOptions(steps=200, lr=1e-3, warmup_ratio=0.05, schedule="cosine", eval_every=50,
                                           log_every=10, ckpt_every=50))

    def __post_init__(self):
        for name in ("seq_len", "batch_size", "max_tokens", "val_rows"):
            require(self, name, getattr(self, name) >= 1, f"must be >= 1, got {getattr(self, name)}")
        require(self, "seq_len", self.seq_len > self.objective.prompt_len or not self.objective.samples,
                f"({self.seq_len}) must be longer than --prompt-len ({self.objective.prompt_len})")
        for o in self.student_override:
            _override(o)


def prepare(config: DistillConfig, log=print):
    """(teacher, student, tokenizer, train rows, val rows, how the student started), all checked."""
    loop = config.loop
    if config.threads:
        torch.set_num_threads(config.threads)
    teacher, tok = load_teacher(config.teacher, config.teacher_dtype)
    student, s_tok, init = load_student(config.student, config.student_override, loop.seed)
    check_vocabularies(teacher, student, tok, s_tok, config.teacher, config.student)
    max_len = min(teacher.config.max_seq_len, student.config.max_seq_len)
    longest = max(config.seq_len, config.objective.prompt_len + config.objective.max_new_tokens
                  if config.objective.samples else 0)
    if longest > max_len:
        raise ValueError(f"--seq-len {config.seq_len} (or prompt + new tokens) exceeds the models' context "
                         f"({max_len} tokens)")
    train, val = read_token_rows(config.data, tok, config.seq_len, max_tokens=config.max_tokens,
                                 val_rows=config.val_rows, seed=loop.seed, data_dir=config.data_dir)
    n_t, n_s = teacher.num_params(), student.num_params()
    log(f"teacher {config.teacher}: {n_t / 1e6:.1f}M parameters; student {config.student} ({init} weights): "
        f"{n_s / 1e6:.1f}M ({student.config.n_layers} layers, d_model {student.config.d_model})")
    log(f"data {config.data}: {train.numel():,} training tokens in {len(train)} rows, {val.numel():,} held out")
    return teacher, student.train(), tok, train, val, init


def run_distill(config: DistillConfig, log=print) -> dict[str, Any]:
    """``evolm distill``: returns the loop's summary (+ teacher_val_loss, before, sizes); writes
    ``distill_summary.json`` and the student (+ tokenizer) in the run folder."""
    from evolm.train.loop import Runtime, run

    t0 = time.time()
    loop, o = config.loop, config.objective
    rt = Runtime.create("none")  # one process; a CUDA GPU when there is one
    teacher, student, tok, train, val, init = prepare(config, log)
    teacher, student = teacher.to(rt.device), student.to(rt.device)
    task = DistillTask(student, teacher, train, val, o, batch_size=config.batch_size, tokenizer=tok, seed=loop.seed,
                       device=rt.device)
    out = run_folder(config.out, "distill", config.data)
    steps = loop.steps or 1
    what = {0.0: "forward KL", 1.0: "reverse KL"}.get(o.beta, f"generalized JSD (beta {o.beta})")
    log(f"objective: {o.kd_weight} x {what} at temperature {o.temperature}" +
        (f" + {o.ce_weight} x cross-entropy" if o.ce_weight else "") +
        (f"; on-policy with probability {o.lmbda}" if o.lmbda else "") + ("; seq-kd" if o.seq_kd else "") +
        f"; {steps} steps of {loop.accum} x {config.batch_size} x {config.seq_len} tokens")
    out.mkdir(parents=True, exist_ok=True)
    (out / "distill_args.json").write_text(json.dumps(flat(config), indent=2, default=str))
    summary = run(student, task, [loop.phase("distill", steps)], loop.loop_config(), out, tokenizer=tok,
                  resume=loop.resume, rt=rt, seed=loop.seed, stop_after_steps=loop.stop_after, log=log)
    summary.update({"teacher_val_loss": task.teacher_val_loss, "student_init": init,
                    "teacher_params": teacher.num_params(), "student_params": student.num_params(),
                    "train_tokens_available": int(train.numel()), "peak_memory_mb": peak_memory_mb(task.device),
                    "before": summary.get("initial_eval") or {}, "wall_s": time.time() - t0})
    if not summary["stopped_early"]:
        (out / "distill_summary.json").write_text(summary_text(summary))
        b, a = summary["before"], summary
        log(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens, {summary['tokens_per_s']:,.0f} tok/s; "
            f"held-out KL to teacher {b.get('val_kl', float('nan')):.4f} -> {a.get('val_kl', float('nan')):.4f}, "
            f"loss {b.get('val_loss', float('nan')):.4f} -> {a.get('val_loss', float('nan')):.4f} "
            f"(teacher {task.teacher_val_loss:.4f}); student in {out}")
    if config.json:
        print(summary_text(summary))
    return summary


def main(argv: list[str] | None = None) -> None:
    """``python -m evolm.post.distill ...`` (the same as ``evolm distill``)."""
    from evolm.post import module_main

    module_main("evolm distill", "distil a teacher's next-token distributions into a student", DistillConfig,
                run_distill, argv)


__all__ = ["VocabularyMismatchError", "check_vocabularies", "load_student", "load_teacher", "read_token_rows",
           "Batch", "data_batch", "continuation_batch", "DistillOptions", "DistillTask", "DistillConfig", "prepare",
           "run_distill", "main"]


if __name__ == "__main__":
    main()
