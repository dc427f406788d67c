"""`evolm finetune --task classify`: fine-tune an encoder with a sequence-classification head.

BERT's recipe (Devlin et al. 2018, arXiv:1810.04805, section 4.1): put one linear classifier on a
pooled vector of the pretrained encoder and train everything with cross-entropy for a few epochs at a
small learning rate (2e-5 .. 5e-5). The head is the encoder family's own (``config.head='classify'``,
``nn/heads.py``): the pooled vector is the ``[CLS]`` state through BERT's pooler (``pooling='cls'``,
``pooler=True``: transformers' BertForSequenceClassification) or the mean of the real tokens
(``pooling='mean'``: the vector a Sentence-BERT model such as all-MiniLM-L6-v2 was trained to make).
The loaded encoder keeps its weights; the classifier (and a pooler the checkpoint lacks) start from the
config's initialisation, so accuracy before training is the untrained head's (about chance).

Rows are ``{"text", "label"}`` JSONL (:mod:`evolm.post.classify_data`; built-in: ``bbc_news``). The
held-out split is ``--val``, else the built-in set's val split, else ``--val-fraction`` of ``--data``;
accuracy and loss on it are measured before and after and written to ``<out>/finetune_eval.json``.
The saved model loads with ``evolm.load`` and keeps the class names in ``config.meta['id2label']``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from evolm.post.classify_data import label_ids, label_names, read_rows
from evolm.post.common import (AdapterConfig, EpochOrder, LoopOptions, load_policy, pad_id, report_held_out,
                               run_folder, summary_text)
from evolm.post.flags import option, require

TASKS = ("classify",)


def as_classifier(model, num_labels: int, pooling: str | None = None, seed: int = 0):
    """``model`` (an encoder) rebuilt with a ``classify`` head of ``num_labels`` classes, every weight
    it had kept; the new head's weights are initialised as the config initialises them (seeded).
    ``pooling=None`` keeps a classifier's or an ``embed`` head's pooling, else takes the mean."""
    from evolm.model import Transformer

    c = model.config
    if c.mask != "bidirectional":
        raise ValueError(f"finetune --task classify needs an encoder (mask='bidirectional'); "
                         f"{c.name or 'this model'} has mask={c.mask!r}")
    if pooling is None:
        pooling = c.pooling if c.head in ("classify", "embed") else "mean"
    pooler = c.pooler if c.head == "classify" else pooling == "cls"
    new = dataclasses.replace(c, head="classify", num_labels=num_labels, pooling=pooling, pooler=pooler)
    torch.manual_seed(seed)
    with torch.device("meta"):
        clf = Transformer(new)
    old = model.state_dict()
    clf = clf.to_empty(device=next(model.parameters()).device)
    clf.reset_parameters()
    mine = clf.state_dict()
    kept = {k: v for k, v in old.items() if k in mine and mine[k].shape == v.shape}
    clf.load_state_dict(kept, strict=False)
    clf.reset_buffers()
    return clf.to(next(model.parameters()).dtype).train(model.training)


def collate(rows: list[dict], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, the attention mask and the class ids of encoded rows."""
    width = max(len(r["ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r["ids"])] = torch.tensor(r["ids"])
        mask[i, :len(r["ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r["y"] for r in rows])}


class ClassifyTask(EpochOrder):
    """Sequence classification for :func:`evolm.train.loop.run`: shuffled epochs of encoded rows
    (``{"ids", "y"}``), cross-entropy through the model's head, held-out accuracy."""

    def __init__(self, train: list[dict], val: list[dict], batch_size: int, eval_batch_size: int, pad: int,
                 seed: int = 0):
        if not train:
            raise ValueError("finetune: no training rows")
        self.train, self.val, self.bs, self.ebs, self.pad, self.seed = train, val, batch_size, eval_batch_size, pad, seed
        self.epoch, self.cursor, self.order = 0, 0, None

    def start_phase(self, index: int, phase) -> None:
        pass

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.order is None:
            self._shuffle()
        rows = []
        while len(rows) < self.bs:
            if self.cursor >= len(self.order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._shuffle()
            rows.append(self.train[self.order[self.cursor]])
            self.cursor += 1
        return collate(rows, self.pad)

    @staticmethod
    def _logits(model, batch):
        device = next(model.parameters()).device
        return model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))

    def loss(self, model, batch):
        """The head's own cross-entropy (``forward(targets=)``: with an MoE encoder's balancing losses)."""
        device = next(model.parameters()).device
        loss = model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                     targets=batch["labels"].to(device))
        return loss, {"tokens": int(batch["attention_mask"].sum())}

    def evaluate(self, model) -> dict[str, float]:
        """``val_accuracy`` and ``val_loss`` (mean cross-entropy) over the held-out rows."""
        if not self.val:
            return {}
        rows = sorted(self.val, key=lambda r: len(r["ids"]))  # similar lengths share a batch
        right, total_loss = 0, 0.0
        for s in range(0, len(rows), self.ebs):
            b = collate(rows[s:s + self.ebs], self.pad)
            logits = self._logits(model, b).float()
            y = b["labels"].to(logits.device)
            right += int((logits.argmax(-1) == y).sum())
            total_loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        return {"val_accuracy": right / len(rows), "val_loss": total_loss / len(rows)}



# ---------------------------------------------------------------------------------------------
# `evolm finetune`
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Everything ``evolm finetune`` runs from: the encoder, the (text, label) rows, the head and the loop."""

    task: str = option("classify", "what to fine-tune for: classify (one label per text)", choices=TASKS)
    model: str = option(help="an encoder: HF folder (BERT family, e.g. all-MiniLM-L6-v2) or evolm checkpoint")
    data: str = option(help="JSONL of {text, label} rows, or a built-in set: bbc_news")
    val: str | None = option(None, "held-out JSONL (default: the built-in set's val split, else --val-fraction)")
    val_fraction: float = option(0.1, "held-out share of --data when there is no --val")
    data_dir: str | None = option(None, "where built-in sets are installed (default data/post)")
    out: str | None = option(None, "run folder (default: runs/finetune-<model name>)")
    pooling: str | None = option(None, "what the classifier reads: cls (BERT's [CLS] + pooler) or mean (default: "
                                       "the model's head, else mean)", choices=["cls", "mean"])
    max_len: int = option(128, "tokens per text (longer ones keep their first tokens and the closing one)")
    batch_size: int = option(16, "texts per micro-batch")
    eval_batch_size: int = option(64)
    epochs: float = option(1.0, "passes over the training rows when --steps is not set")
    limit: int | None = option(None, "use N training rows, drawn at random (seeded)")
    val_limit: int | None = option(None, "use N held-out rows, drawn at random (seeded)")
    threads: int | None = option(None)
    json: bool = option(False, "print the summary as JSON")
    loop: LoopOptions = option(LoopOptions(lr=5e-5, warmup_ratio=0.1, eval_every=0))

    def __post_init__(self):
        require(self, "max_len", self.max_len >= 2, f"must be >= 2 (room for the special tokens), got {self.max_len}")
        for name in ("batch_size", "eval_batch_size"):
            require(self, name, getattr(self, name) >= 1, f"must be >= 1, got {getattr(self, name)}")
        require(self, "val_fraction", 0 <= self.val_fraction < 1, f"must be in [0, 1), got {self.val_fraction}")
        require(self, "epochs", self.epochs > 0 or self.loop.steps, f"must be > 0 without --steps, got {self.epochs}")


def read_splits(config: FinetuneConfig) -> tuple[list[dict], list[dict]]:
    """(train, val) rows, validated before any model loads: ``--val``, the built-in val split, or a
    seeded ``--val-fraction`` of ``--data``."""
    from evolm.post.data import BUILTIN, resolve

    train = read_rows(resolve(config.data, "train", config.data_dir))
    if config.val:
        val = read_rows(resolve(config.val, "train", config.data_dir))
    elif config.data in BUILTIN and not Path(config.data).is_file():
        val = read_rows(resolve(config.data, "val", config.data_dir))
    else:
        g = torch.Generator().manual_seed(config.loop.seed)
        perm = torch.randperm(len(train), generator=g).tolist()
        n_val = int(round(config.val_fraction * len(train)))
        held = set(perm[:n_val])
        train, val = [r for i, r in enumerate(train) if i not in held], [r for i, r in enumerate(train) if i in held]
    return _sample(train, config.limit, config.loop.seed), _sample(val, config.val_limit, config.loop.seed + 1)


def _sample(rows: list[dict], n: int | None, seed: int) -> list[dict]:
    """``n`` rows drawn without replacement (seeded; files are often sorted by label), in file order."""
    if n is None or n >= len(rows):
        return rows
    g = torch.Generator().manual_seed(seed)
    keep = set(torch.randperm(len(rows), generator=g)[:n].tolist())
    return [r for i, r in enumerate(rows) if i in keep]


def run_finetune(config: FinetuneConfig, log=print) -> dict:
    """`evolm finetune`: train ``config.model`` with a classification head on ``config.data``; returns the
    loop's summary plus ``before`` (held-out accuracy and loss of the untrained head)."""
    from evolm.infer.embed import encode_texts
    from evolm.train.loop import run

    train, val = read_splits(config)
    names = label_names(train, val)
    if len(names) < 2:
        raise ValueError(f"{config.data}: one label ({names}); classification needs at least two")
    loop = config.loop
    policy = load_policy(config.model, adapter=AdapterConfig(), seed=loop.seed, threads=config.threads,
                         purpose="classification", log=log)
    model = as_classifier(policy.model, len(names), config.pooling, seed=loop.seed)
    model.config.meta = {**model.config.meta, "id2label": {str(i): n for i, n in enumerate(names)}}
    tok = policy.tokenizer
    encoded = []
    for rows, where in ((train, config.data), (val, config.val or config.data)):
        ids = encode_texts(tok, [r["text"] for r in rows], config.max_len)
        encoded.append([{"ids": i, "y": y} for i, y in zip(ids, label_ids(rows, names, where))])
    task = ClassifyTask(encoded[0], encoded[1], config.batch_size, config.eval_batch_size, pad_id(tok), loop.seed)
    task.tokenizer, task.base_path = tok, str(config.model)
    steps = loop.steps or max(1, int(config.epochs * len(train) / (config.batch_size * loop.accum)))
    out = run_folder(config.out, "finetune", config.model)
    log(f"classify: {len(names)} classes {names}, {len(train)} train / {len(val)} val texts, {steps} steps of "
        f"{config.batch_size * loop.accum}, pooling {model.config.pooling}"
        f"{' + pooler' if model.config.pooler else ''}, at most {config.max_len} tokens")
    summary = run(model, task, [loop.phase("classify", steps)], loop.loop_config(), out, tokenizer=tok,
                  resume=loop.resume, seed=loop.seed, stop_after_steps=loop.stop_after)
    report_held_out(summary, model, out, "finetune", log)
    if config.json:
        print(summary_text(summary))
    return summary


def main(argv: list[str] | None = None) -> None:
    """``python -m evolm.post.classify ...`` (the same as ``evolm finetune``)."""
    from evolm.post import module_main

    module_main("evolm finetune", "fine-tune an encoder for classification", FinetuneConfig, run_finetune, argv)


__all__ = ["TASKS", "as_classifier", "collate", "ClassifyTask", "FinetuneConfig", "read_splits", "run_finetune", "main"]


if __name__ == "__main__":
    main()
