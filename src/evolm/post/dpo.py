"""Direct preference optimisation (DPO) and its IPO / SimPO variants.

DPO (Rafailov et al. 2023, arXiv:2305.18290) skips the reward model of RLHF: the optimal policy
of KL-regularised reward maximisation satisfies r(x, y) = beta * log(pi(y|x) / pi_ref(y|x)) + const,
so the Bradley-Terry likelihood of a human preference y_w > y_l becomes a loss on the policy itself:

    L_DPO = -log sigmoid(beta * [(log pi(y_w) - log pi_ref(y_w)) - (log pi(y_l) - log pi_ref(y_l))])

with log pi(y) summed over the completion's tokens. beta (0.1 typical) sets how far the policy
may move from the frozen reference pi_ref (the starting model).

- **Conservative DPO** (cDPO, Mitchell 2023): labels are flipped with probability eps, so the
  target is a smoothed one: L = -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h), as TRL's
  DPO (<= 0.x) and CPO trainers define ``label_smoothing``.
- **IPO** (Azar et al. 2023, arXiv:2310.12036, eq. 17): DPO can drive h to infinity on
  deterministic preferences; IPO regresses h to a finite target instead:
  L = (h - 1 / (2 beta))^2, where (as TRL does, confirmed with the IPO authors) the log-ratios are
  *averaged* over each completion's tokens so that beta does not depend on length.
- **SimPO** (Meng et al. 2024, arXiv:2405.14734, eq. 6): no reference model at all; the implicit
  reward is the length-normalised log-likelihood, with a target margin gamma:
  L = -log sigmoid(beta / |y_w| log pi(y_w) - beta / |y_l| log pi(y_l) - gamma)  (beta ~ 2, gamma ~ 0.5-1.5).

Logged like TRL: rewards/chosen = beta * (log pi - log pi_ref) of y_w (SimPO: beta * mean log pi),
rewards/rejected likewise, their margin, and the *preference accuracy*: the share of pairs whose
chosen reward beats the rejected one.

Chosen and rejected completions of a batch run through one forward pass ([chosen rows; rejected
rows]). The reference log-probs come from a frozen copy of the starting model, from the base
model with LoRA adapters switched off, or are computed once before training and stored with the
data (``--reference precompute``): then no second model sits in memory while training.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from evolm.post.common import (AdapterConfig, EpochOrder, LoopOptions, load_policy, pad_id, report_held_out,
                               run_folder, summary_text)
from evolm.post.flags import invalid, option, require
from evolm.post.logprobs import REFERENCES

LOSSES = ("dpo", "ipo", "simpo")


@dataclass
class PreferenceLoss:
    """Per-pair losses and the implicit rewards logged alongside them (all shape (B,))."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor

    def metrics(self, prefix: str = "") -> dict[str, float]:
        c, r = self.chosen_rewards.detach().float(), self.rejected_rewards.detach().float()
        return {f"{prefix}rewards/chosen": float(c.mean()), f"{prefix}rewards/rejected": float(r.mean()),
                f"{prefix}rewards/margin": float((c - r).mean()),
                f"{prefix}rewards/accuracy": float((c > r).float().mean())}


def preference_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                    ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None,
                    *, loss_type: str = "dpo", beta: float = 0.1, label_smoothing: float = 0.0,
                    gamma: float = 0.5, chosen_lengths: torch.Tensor | None = None,
                    rejected_lengths: torch.Tensor | None = None) -> PreferenceLoss:
    """The preference loss of each pair from *summed* completion log-probs (see the module docstring).

    ``chosen_lengths`` / ``rejected_lengths`` (completion token counts) are needed by IPO and SimPO,
    which average per token. ``gamma`` is SimPO's target margin; ``label_smoothing`` applies to the
    sigmoid losses (DPO, SimPO).
    """
    if loss_type not in LOSSES:
        raise ValueError(f"--loss: unknown preference loss {loss_type!r}; expected one of {list(LOSSES)}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"--label-smoothing must be in [0, 0.5) (the probability that a preference label is "
                         f"flipped), got {label_smoothing}")
    if beta <= 0:
        raise ValueError(f"--beta must be > 0, got {beta}")
    if loss_type in ("ipo", "simpo") and (chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"{loss_type} averages log-probs per token: pass chosen_lengths and rejected_lengths")

    def smoothed(h: torch.Tensor) -> torch.Tensor:
        return -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)

    if loss_type == "simpo":
        chosen = beta * chosen_logps / chosen_lengths.clamp(min=1)
        rejected = beta * rejected_logps / rejected_lengths.clamp(min=1)
        return PreferenceLoss(smoothed(chosen - rejected - gamma), chosen.detach(), rejected.detach())

    if ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError(f"{loss_type} needs reference log-probs (a frozen reference model or precomputed "
                         f"ones); only simpo works without a reference")
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    if loss_type == "dpo":
        losses = smoothed(beta * (chosen_ratio - rejected_ratio))
    else:  # ipo
        h = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        losses = (h - 1 / (2 * beta)) ** 2
    return PreferenceLoss(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


# ---------------------------------------------------------------------------------------------
# batches of pairs
# ---------------------------------------------------------------------------------------------
def encode_pairs(tokenizer, pairs, max_len: int) -> tuple[list[dict], int]:
    """Render + tokenize preference pairs (``evolm.post.data.encode_pair``); returns (encoded, dropped).

    A pair is dropped when truncation to ``max_len`` leaves a side with no response token, or
    leaves both sides identical (it then carries no preference).
    """
    from evolm.post.data import encode_pair

    out, dropped = [], 0
    for p in pairs:
        e = encode_pair(tokenizer, p, max_len)
        n_c = sum(1 for x in e["chosen_labels"][1:] if x != -100)
        n_r = sum(1 for x in e["rejected_labels"][1:] if x != -100)
        if n_c == 0 or n_r == 0 or e["chosen_ids"] == e["rejected_ids"]:
            dropped += 1
            continue
        e["where"] = p.where
        out.append(e)
    return out, dropped


def collate_pairs(rows: list[dict], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """B encoded pairs -> one right-padded batch of 2B rows: chosen rows first, then rejected."""
    from evolm.post.logprobs import pad_right

    ids = [r["chosen_ids"] for r in rows] + [r["rejected_ids"] for r in rows]
    labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
    batch = {"input_ids": pad_right(ids, pad_id), "completion_mask": (pad_right(labels, -100) != -100).long()}
    if all("ref_chosen" in r for r in rows):
        batch["ref_logps"] = torch.tensor([r["ref_chosen"] for r in rows] + [r["ref_rejected"] for r in rows])
    return batch


@dataclass(frozen=True, kw_only=True)
class DPOOptions:
    """The preference-loss knobs (see the module docstring); ``beta=None`` takes the loss's usual value."""

    flag_group = "preference loss"

    loss: str = option("dpo", choices=LOSSES)
    beta: float | None = option(None, "DPO/IPO: 0.1; SimPO: 2.0 (default per loss)")  # 0.1: TRL; 2.0: Meng et al.
    label_smoothing: float = option(0.0, "conservative DPO: P(label flipped)")
    gamma: float = option(0.5, "SimPO target reward margin")  # Meng et al. use 0.5-1.6 with beta 2-2.5
    reference: str = option("auto", "auto: the base with adapters off for LoRA, else a frozen copy; precompute: "
                                    "reference log-probs computed once before training", choices=REFERENCES)
    batch_size: int = option(4, "pairs per micro-batch")
    eval_batch_size: int = option(8, cli=False)

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise invalid(self, "loss", f"--loss: unknown preference loss {self.loss!r}; expected one of "
                                        f"{list(LOSSES)}")
        if self.loss != "simpo" and self.reference == "none":
            raise invalid(self, "reference", f"--loss {self.loss} compares the policy with a reference model, and "
                                             f"--reference none gives none; use --reference copy|adapters|precompute, "
                                             f"or --loss simpo (reference-free)")
        require(self, "beta", self.beta is None or self.beta > 0, f"--beta must be > 0, got {self.beta}")
        require(self, "batch_size", self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(self, "eval_batch_size", self.eval_batch_size >= 1, f"must be >= 1, got {self.eval_batch_size}")

    @property
    def loss_beta(self) -> float:
        """``beta``, or the loss's usual value when it is None: 0.1 for DPO/IPO (TRL), 2.0 for SimPO."""
        if self.beta is not None:
            return self.beta
        return 2.0 if self.loss == "simpo" else 0.1


class DPOTask(EpochOrder):
    """The preference-optimisation task for :func:`evolm.train.loop.run`.

    ``train`` / ``val``: encoded pairs (:func:`encode_pairs`). The reference is built from ``model``
    as it is at construction (the starting point); with ``reference='precompute'`` its log-probs of
    every pair are computed here, once, and the frozen copy is dropped. ``seed`` (the run's) orders
    the pairs of each epoch.
    """

    def __init__(self, model, train: list[dict], val: list[dict], cfg: DPOOptions, pad_id: int = 0,
                 log=print, seed: int = 0):
        from evolm.post.logprobs import Reference

        if not train:
            raise ValueError("dpo: no training pairs")
        self.cfg, self.train, self.val, self.pad_id, self.seed = cfg, train, val, pad_id, seed
        self.ref = Reference(model, cfg.reference) if cfg.loss != "simpo" else None
        if self.ref is not None and self.ref.mode == "precompute":
            log(f"precomputing reference log-probs of {len(train) + len(val)} pairs")
            for rows in (train, val):
                self._attach_ref(rows)
            self.ref.release()
        self.epoch, self.cursor, self.order = 0, 0, None

    # -- reference log-probs ------------------------------------------------------------------
    def _attach_ref(self, rows: list[dict]) -> None:
        """Store the reference's summed log-probs on each pair (once; the reference never changes)."""
        todo = sorted((r for r in rows if "ref_chosen" not in r),  # similar lengths share a batch: less padding
                      key=lambda r: len(r["chosen_ids"]) + len(r["rejected_ids"]))
        for s in range(0, len(todo), self.cfg.eval_batch_size):
            chunk = todo[s:s + self.cfg.eval_batch_size]
            b = collate_pairs(chunk, self.pad_id)
            lp = self.ref.sequence_logprobs(b["input_ids"].to(self._device()), b["completion_mask"].to(self._device()))
            for i, r in enumerate(chunk):
                r["ref_chosen"], r["ref_rejected"] = float(lp[i]), float(lp[len(chunk) + i])

    def _device(self):
        model = self.ref.policy if self.ref is not None else None
        return next(model.parameters()).device if model is not None else torch.device("cpu")

    # -- the Task protocol ----------------------------------------------------------------------
    def start_phase(self, index: int, phase) -> None:
        pass

    def _shuffle(self) -> None:
        """This epoch's order: shuffled, then sorted by length inside windows of 16 batches, whose
        batches are shuffled again -- batches hold pairs of similar length (less padding: responses
        range from a few tokens to hundreds), while every epoch still sees a fresh random order."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(len(self.train), generator=g).tolist()
        bs = self.cfg.batch_size
        window = bs * 16
        self.order = []
        for s in range(0, len(order), window):
            idx = sorted(order[s:s + window], key=lambda i: max(len(self.train[i]["chosen_ids"]),
                                                                  len(self.train[i]["rejected_ids"])))
            groups = [idx[j:j + bs] for j in range(0, len(idx), bs)]
            for k in torch.randperm(len(groups), generator=g).tolist():
                self.order += groups[k]

    def next_batch(self) -> dict[str, torch.Tensor]:
        if self.order is None:
            self._shuffle()
        rows = []
        while len(rows) < self.cfg.batch_size:
            if self.cursor >= len(self.order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._shuffle()
            rows.append(self.train[self.order[self.cursor]])
            self.cursor += 1
        if self.ref is not None:  # computed once per pair: later epochs reuse them
            self._attach_ref(rows)
        return collate_pairs(rows, self.pad_id)

    def pair_losses(self, model, batch: dict[str, torch.Tensor]) -> tuple[PreferenceLoss, torch.Tensor]:
        """Preference losses of a collated batch, and the policy's summed log-probs (2B,)."""
        from evolm.post.logprobs import token_logprobs

        dev = next(p for p in model.parameters()).device
        ids, mask = batch["input_ids"].to(dev), batch["completion_mask"].to(dev)
        B = ids.shape[0] // 2
        logps = token_logprobs(model, ids, mask).sum(-1)
        lengths = mask[:, 1:].sum(-1)
        ref = None
        if self.ref is not None:
            ref = batch["ref_logps"].to(dev) if "ref_logps" in batch else self.ref.sequence_logprobs(ids, mask)
        c = self.cfg
        out = preference_loss(logps[:B], logps[B:], ref[:B] if ref is not None else None,
                              ref[B:] if ref is not None else None, loss_type=c.loss, beta=c.loss_beta,
                              label_smoothing=c.label_smoothing, gamma=c.gamma, chosen_lengths=lengths[:B],
                              rejected_lengths=lengths[B:])
        return out, logps

    def loss(self, model, batch):
        out, logps = self.pair_losses(model, batch)
        B = logps.shape[0] // 2
        m = out.metrics()
        m.update({"logps/chosen": float(logps[:B].detach().mean()), "logps/rejected": float(logps[B:].detach().mean()),
                  "tokens": int(batch["input_ids"].numel())})
        return out.losses.mean(), m

    def evaluate(self, model) -> dict[str, float]:
        """Held-out metrics (``val_*``), averaged over pairs.

        ``loss`` and ``rewards/*`` are the preference loss and TRL's implicit-reward metrics; at the
        start they are 0 by construction (policy = reference), so ``rewards/accuracy`` starts at 0.
        ``logp_accuracy`` is the model's own preference: the share of pairs whose chosen response it
        finds more likely than the rejected one (summed log-probs; ``logp_accuracy_avg`` per token),
        meaningful for the starting model too.
        """
        if not self.val:
            return {}
        if self.ref is not None and self.ref.mode != "precompute":
            self._attach_ref(self.val)  # once: the reference is fixed
        n, sums = 0, {}
        order = sorted(range(len(self.val)), key=lambda i: len(self.val[i]["chosen_ids"]) +
                       len(self.val[i]["rejected_ids"]))
        for s in range(0, len(order), self.cfg.eval_batch_size):
            rows = [self.val[i] for i in order[s:s + self.cfg.eval_batch_size]]
            batch = collate_pairs(rows, self.pad_id)
            out, logps = self.pair_losses(model, batch)
            B = len(rows)
            lengths = batch["completion_mask"][:, 1:].sum(-1).to(logps.device).clamp(min=1)
            avg = logps / lengths
            c, r = out.chosen_rewards.float(), out.rejected_rewards.float()
            for k, v in (("loss", out.losses), ("rewards/accuracy", (c > r).float()), ("rewards/margin", c - r),
                         ("rewards/chosen", c), ("rewards/rejected", r),
                         ("logp_accuracy", (logps[:B] > logps[B:]).float()),
                         ("logp_accuracy_avg", (avg[:B] > avg[B:]).float())):
                sums[k] = sums.get(k, 0.0) + float(v.detach().float().sum())
            n += B
        return {f"val_{k}": v / n for k, v in sums.items()}



# ---------------------------------------------------------------------------------------------
# `evolm dpo`
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DPOConfig:
    """Everything ``evolm dpo`` runs from: the model, the pairs, the loss, LoRA and the loop."""

    model: str = option(help="HF folder, GGUF file or evolm checkpoint to start from")
    data: str = option(help="preference JSONL ({prompt, chosen, rejected}) or a built-in set: dpo_en_demo")
    out: str | None = option(None, "run folder (default: runs/<command>-<model name>)")
    val: str | None = option(None, "held-out preference JSONL (built-in sets have their own val split)")
    val_fraction: float = option(0.1, "held-out share of --data when there is no --val")
    data_dir: str | None = option(None, "where built-in sets are installed (default data/post)")
    max_pairs: int | None = option(None, "use only the first N training pairs")
    epochs: float = option(1.0, "passes over the training pairs when --steps is not set")
    max_len: int = option(512, "tokens per prompt + response (longer ones are cut)")
    chat_template: str | None = option(None, "'chatml' or a Jinja file, for models without one")
    threads: int | None = option(None)
    json: bool = option(False, "print the summary as JSON")
    objective: DPOOptions = option(DPOOptions())
    adapter: AdapterConfig = option(AdapterConfig())
    loop: LoopOptions = option(LoopOptions())

    def __post_init__(self):
        require(self, "max_len", self.max_len >= 2, f"must be >= 2 (a prompt token and a response token), got "
                                                   f"{self.max_len}")
        require(self, "epochs", self.epochs > 0 or self.loop.steps, f"must be > 0 without --steps, got {self.epochs}")


def _read_pair_splits(config: DPOConfig):
    """(train, val) preference pairs, validated as they are read (before any model is loaded)."""
    from evolm.post import data

    name = config.data  # an old BIG-bench name (hhh, hhh_alignment) raises a DataError naming dpo_en_demo
    train = data.load_preferences(name, "train", config.data_dir)
    if config.val:
        val = data.load_preferences(config.val, "val", config.data_dir)
    elif name in data.BUILTIN and not Path(name).is_file():
        val = data.load_preferences(name, "val", config.data_dir)
    else:
        if not 0 < config.val_fraction < 1:
            raise invalid(config, "val_fraction", f"--val-fraction must be in (0, 1), got {config.val_fraction}")
        g = torch.Generator().manual_seed(config.loop.seed)
        order = torch.randperm(len(train), generator=g).tolist()
        n_val = max(1, int(round(config.val_fraction * len(train))))
        if n_val >= len(train):
            raise ValueError(f"{config.data}: {len(train)} pairs are too few to hold out {n_val} for validation; "
                             f"pass --val FILE")
        val = [train[i] for i in sorted(order[:n_val])]
        train = [train[i] for i in sorted(order[n_val:])]
    if config.max_pairs:
        train = train[:config.max_pairs]
    return train, val


def _encode_splits(config: DPOConfig, tokenizer, train, val, log):
    from evolm.post import data

    data.require_template(tokenizer)
    enc_train, d1 = encode_pairs(tokenizer, train, config.max_len)
    enc_val, d2 = encode_pairs(tokenizer, val, config.max_len)
    if d1 or d2:
        log(f"dropped {d1} train / {d2} val pairs left without a distinct response after cutting to "
            f"--max-len {config.max_len}")
    if not enc_train:
        raise ValueError(f"{config.data}: no usable training pair (all {len(train)} lost their response when cut to "
                         f"--max-len {config.max_len}; raise it)")
    return enc_train, enc_val


def run_dpo(config: DPOConfig, log=print) -> dict:
    """`evolm dpo`: preference optimisation of ``config.model`` on ``config.data``; returns the loop's
    summary plus ``before`` (held-out metrics of the starting model)."""
    from evolm.train.loop import run

    opts, loop = config.objective, config.loop
    train, val = _read_pair_splits(config)  # bad settings and bad rows fail before the model loads
    policy = load_policy(config.model, adapter=config.adapter, seed=loop.seed, chat_template=config.chat_template,
                         threads=config.threads, purpose="dpo", log=log)
    model, tok = policy.model, policy.tokenizer
    train, val = _encode_splits(config, tok, train, val, log)
    task = DPOTask(model, train, val, opts, pad_id=pad_id(tok), log=log, seed=loop.seed)
    task.tokenizer, task.base_path = tok, str(config.model)
    steps = loop.steps or max(1, int(config.epochs * len(train) / (opts.batch_size * loop.accum)))
    out = run_folder(config.out, "dpo", config.model)
    log(f"{opts.loss}: beta {opts.loss_beta}, {len(train)} train / {len(val)} val pairs, {steps} steps of "
        f"{opts.batch_size * loop.accum} pairs, reference: {task.ref.mode if task.ref else 'none (simpo)'}")
    summary = run(model, task, [loop.phase(opts.loss, steps)], loop.loop_config(), out, tokenizer=tok,
                  resume=loop.resume, seed=loop.seed, stop_after_steps=loop.stop_after)
    report_held_out(summary, model, out, "dpo", log)
    if config.json:
        print(summary_text(summary))
    return summary


def main(argv: list[str] | None = None) -> None:
    """``python -m evolm.post.dpo ...`` (the same as ``evolm dpo``)."""
    from evolm.post import module_main

    module_main("evolm dpo", "preference optimisation (DPO / IPO / SimPO) on preference pairs", DPOConfig, run_dpo,
                argv)


__all__ = ["LOSSES", "PreferenceLoss", "preference_loss", "DPOOptions", "DPOConfig", "DPOTask", "encode_pairs",
           "collate_pairs", "run_dpo", "main"]


if __name__ == "__main__":
    main()
