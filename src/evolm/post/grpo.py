"""Group relative policy optimisation (GRPO): reinforcement learning from verifiable rewards.

GRPO (Shao et al. 2024, DeepSeekMath, arXiv:2402.03300, sec. 4.1) is PPO without the value
network. For each prompt q it samples a *group* of G completions o_1..o_G from the current policy,
scores each with a reward r_i, and uses the group itself as the baseline:

    A_i = (r_i - mean(r)) / (std(r) + eps)          (outcome supervision: every token of o_i gets A_i)

so a completion is pushed up exactly when it beats its siblings. The objective (eq. 3) is PPO's
clipped surrogate plus a KL penalty to the frozen reference policy, averaged per token within each
completion and then over the group:

    J = 1/G sum_i 1/|o_i| sum_t [ min(rho_it A_i, clip(rho_it, 1 - e, 1 + e) A_i) - beta KL_it ]
    rho_it = pi(o_it | q, o_i,<t) / pi_old(o_it | q, o_i,<t)

with the KL estimated per token by the unbiased, always-positive "k3" estimator (Schulman 2020,
"Approximating KL divergence"; eq. 4 of the paper):

    KL_it = pi_ref / pi - log(pi_ref / pi) - 1.

We minimise -J. Choices, stated:
- **Per-token averaging as the paper defines it** (mean over each completion's tokens, then over
  completions; TRL's ``loss_type="grpo"``). Later work (Dr. GRPO, DAPO) argues for other
  normalisations; the paper's is the default here.
- **std** is the sample standard deviation of the group (Bessel-corrected) and eps = 1e-4, as TRL
  computes it; a group whose rewards are all equal gets zero advantages (no signal), which we log.
- **pi_old**: with one policy update per generated batch (``iterations=1``, the usual setting)
  pi_old is the current policy, so rho = 1 in value while its gradient is grad log pi; with
  ``iterations=mu > 1`` the batch is reused mu times and pi_old is the policy that sampled it.
- log-probs are taken at the sampling **temperature** (logits / T), the distribution sampled from.

Sampling uses ``evolm.infer.generate`` (KV cache, seeded, temperature / top-p), with the policy itself.
Rewards are functions ``(prompt, completion, answer) -> float`` (``evolm.post.rewards``).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evolm.post.common import (AdapterConfig, LoopOptions, load_policy, report_held_out, run_folder, save_policy,
                               summary_text)
from evolm.post.flags import invalid, option, require
from evolm.post.logprobs import completion_batch, masked_mean, token_logprobs


# ---------------------------------------------------------------------------------------------
# the math
# ---------------------------------------------------------------------------------------------
def group_advantages(rewards: torch.Tensor, group: int, eps: float = 1e-4, scale: bool = True) -> torch.Tensor:
    """(r - group mean) / (group std + eps) for rewards laid out group by group, shape (n * group,)."""
    if rewards.ndim != 1 or rewards.numel() % group:
        raise ValueError(f"group_advantages: {tuple(rewards.shape)} rewards do not split into groups of {group}")
    r = rewards.float().view(-1, group)
    adv = r - r.mean(dim=1, keepdim=True)
    if scale:
        std = r.std(dim=1, keepdim=True) if group > 1 else torch.zeros_like(r[:, :1])
        adv = adv / (std + eps)
    return adv.reshape(-1)


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor | None, ref_logps: torch.Tensor | None,
              advantages: torch.Tensor, mask: torch.Tensor, clip: float = 0.2, beta: float = 0.04,
              clip_high: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """-J of the module docstring for per-token log-probs (B, T) under a completion ``mask`` (B, T).

    ``old_logps=None`` means pi_old = pi (one update per batch). ``clip_high`` (default ``clip``)
    allows DAPO's asymmetric clipping. Returns the loss and float metrics.
    """
    if beta and ref_logps is None:
        raise ValueError("grpo_loss: beta > 0 needs the reference log-probs (ref_logps)")
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    adv = advantages.to(logps.dtype)[:, None]
    hi = clip if clip_high is None else clip_high
    unclipped, clipped = ratio * adv, torch.clamp(ratio, 1 - clip, 1 + hi) * adv
    per_token = -torch.min(unclipped, clipped)
    kl = None
    if beta:
        kl = k3_kl(logps, ref_logps)
        per_token = per_token + beta * kl
    loss = masked_mean(per_token, mask, dim=1).mean()
    with torch.no_grad():
        metrics = {"clip_ratio": float(masked_mean((clipped < unclipped).to(logps.dtype), mask)),
                   "ratio": float(masked_mean(ratio, mask))}
        if kl is not None:
            metrics["kl"] = float(masked_mean(kl, mask))
    return loss, metrics


# ---------------------------------------------------------------------------------------------
# prompts
# ---------------------------------------------------------------------------------------------
@dataclass
class Prompt:
    """A prompt (text, or chat messages) and the reference answer the reward functions compare with."""

    prompt: Any
    answer: str = ""

    @property
    def text(self) -> str:
        if isinstance(self.prompt, str):
            return self.prompt
        return "\n".join(m["content"] for m in self.prompt if m.get("role") == "user")


GSM8K_INSTRUCTION = "Solve the problem. End your reply with the final answer as '#### <number>'."


def arithmetic_prompts(n: int, seed: int, low: int = 1, high: int = 20) -> list[Prompt]:
    """Simple additions ('What is 7 + 12?'), seeded: a task a 135M model gets partly right, so GRPO has signal."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(low, high), rng.randint(low, high)
        out.append(Prompt(f"What is {a} + {b}? Reply with just the number.", str(a + b)))
    return out


def gsm8k_prompts(start: int, stop: int, data_dir=None) -> list[Prompt]:
    """GSM8K problems (Cobbe et al. 2021) from the locally installed benchmark copy (``make eval-data``)."""
    from evolm.eval.data import load

    rows = load("gsm8k", "test", data_dir)[start:stop]
    return [Prompt(f"{r['question']}\n{GSM8K_INSTRUCTION}", r["answer"]) for r in rows]


def read_prompts(path: str | Path) -> list[Prompt]:
    """JSONL rows ``{"prompt": str | [messages], "answer": str}`` (``question`` is accepted for ``prompt``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such prompt file (expected JSONL rows with 'prompt' and 'answer')")
    from evolm.post.data import check_messages, iter_jsonl

    out = []
    for where, row in iter_jsonl(path):
        p = row.get("prompt", row.get("question"))
        if isinstance(p, list):
            p = check_messages(p, where, "prompt", need_assistant=False)
        elif not isinstance(p, str) or not p.strip():
            raise ValueError(f"{where}: field 'prompt' must be a non-empty string or a message list")
        answer = row.get("answer", "")
        if not isinstance(answer, (str, int, float)):
            raise ValueError(f"{where}: field 'answer' must be a string or a number")
        out.append(Prompt(p, str(answer)))
    if not out:
        raise ValueError(f"{path}: no prompts (empty file)")
    return out


TASKS = {"arith": "sums of two numbers in 1..20 (synthetic, seeded): 256 train / 32 val prompts",
         "gsm8k-mini": "GSM8K test problems 0-199 for training, 200-249 held out (local benchmark copy)"}


def load_task(spec: str, n_train: int | None = None, n_val: int | None = None, seed: int = 0,
              val: str | None = None, data_dir=None) -> tuple[list[Prompt], list[Prompt]]:
    """(train prompts, held-out prompts) for a built-in task name or a JSONL file (+ optional val file)."""
    if spec == "arith":
        train, held = arithmetic_prompts(n_train or 256, seed), arithmetic_prompts(n_val or 32, seed + 10_000)
    elif spec == "gsm8k-mini":
        nt, nv = n_train or 200, n_val or 50
        train, held = gsm8k_prompts(0, nt, data_dir), gsm8k_prompts(nt, nt + nv, data_dir)
    elif Path(spec).is_file():
        train = read_prompts(spec)
        if val:
            held = read_prompts(val)
        else:
            k = min(n_val or max(1, len(train) // 10), len(train) - 1)
            if k < 1:
                raise ValueError(f"{spec}: one prompt is too few to hold any out; pass --val FILE")
            held, train = train[-k:], train[:-k]
        train = train[:n_train] if n_train else train
    else:
        raise ValueError(f"--task {spec!r}: neither a built-in task ({', '.join(TASKS)}) nor a JSONL file")
    return train, held[:n_val] if n_val else held


def prompt_ids(tokenizer, p: Prompt, chat: bool, system: str | None = None) -> list[int]:
    """Token ids of a prompt: the chat template with the assistant turn opened, or the plain text."""
    from evolm.infer.text import chat_prompt_ids

    if isinstance(p.prompt, list) or chat:
        msgs = p.prompt if isinstance(p.prompt, list) else [{"role": "user", "content": p.prompt}]
        if system and not any(m["role"] == "system" for m in msgs):
            msgs = [{"role": "system", "content": system}] + msgs
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("grpo: the tokenizer has no chat template; pass --no-chat for plain-text prompts "
                             "or --chat-template chatml")
        return chat_prompt_ids(tokenizer, msgs)
    return list(tokenizer.encode(p.prompt))


# ---------------------------------------------------------------------------------------------
# the task for the training loop
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class GRPOOptions:
    """Sampling and the GRPO objective (see the module docstring)."""

    flag_group = "GRPO"

    group: int = option(8, "completions sampled per prompt (G)")
    prompts_per_step: int = option(2, "prompts per micro-batch")  # each brings G completions
    beta: float = option(0.04, "KL penalty coefficient (0 = no reference model)")  # DeepSeekMath: 0.04
    clip: float = option(0.2, "PPO clipping epsilon")
    clip_high: float | None = option(None, "upper clipping epsilon (DAPO); default --clip")
    iterations: int = option(1, "policy updates per generated batch (mu)")
    temperature: float = option(1.0)
    top_p: float = option(1.0)
    top_k: int = option(0)
    max_new_tokens: int = option(128)
    reference: str = option("auto", "auto: the base with adapters off for LoRA, else a frozen copy",
                            choices=["auto", "copy", "adapters", "none"])
    scale_rewards: bool = option(True, "advantages r - mean, not divided by the std", flag="--no-scale-rewards")
    chat: bool = option(True, "plain-text prompts instead of the chat template", flag="--no-chat")
    system: str | None = option(None, "system prompt for chat prompts")
    eval_batch_size: int = option(64, cli=False)

    def __post_init__(self):
        require(self, "group", self.group >= 2,
                f"--group must be >= 2 (advantages compare completions of one prompt), got {self.group}")
        require(self, "iterations", self.iterations >= 1, f"--iterations must be >= 1, got {self.iterations}")
        require(self, "prompts_per_step", self.prompts_per_step >= 1,
                f"--prompts-per-step must be >= 1, got {self.prompts_per_step}")
        require(self, "clip", 0 < self.clip < 1, f"--clip must be in (0, 1), got {self.clip}")
        require(self, "beta", self.beta >= 0, f"--beta must be >= 0, got {self.beta}")
        require(self, "temperature", self.temperature > 0,
                "--temperature must be > 0: GRPO needs different completions within a group")
        require(self, "reference", self.reference != "precompute",
                "--reference precompute does not apply to GRPO: its completions are new every step; use copy or "
                "adapters (auto)")
        require(self, "reference", not (self.beta > 0 and self.reference == "none"),
                f"--beta {self.beta} penalises the KL to a reference model, and --reference none gives none; use "
                f"--reference copy|adapters, or --beta 0")


class GRPOTask:
    """Sample, score and learn (the Task protocol of :func:`evolm.train.loop.run`).

    ``model`` is the policy the loop trains (generation uses it directly); the reference is frozen
    from it at construction. ``seed`` (the run's) orders the prompts and seeds each group's sampling.
    """

    def __init__(self, model, tokenizer, train: list[Prompt], val: list[Prompt], rewards, cfg: GRPOOptions,
                 log=print, seed: int = 0):
        from evolm.post.logprobs import Reference

        if not train:
            raise ValueError("grpo: no training prompts")
        self.model, self.tok, self.train, self.val, self.rewards, self.cfg = model, tokenizer, train, val, rewards, cfg
        self.seed = seed
        self.ref = Reference(model, cfg.reference) if cfg.beta > 0 else None
        self.stop_ids = list(tokenizer.eos_ids)
        if not self.stop_ids:
            log("warning: the tokenizer has no end-of-sequence token; completions run to --max-new-tokens")
        self.pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else (self.stop_ids or [0])[0]
        self.epoch, self.cursor, self.generated, self.order = 0, 0, 0, None
        self.cached, self.uses = None, 0

    # -- sampling and scoring -------------------------------------------------------------------
    def _ids(self, p: Prompt) -> list[int]:
        return prompt_ids(self.tok, p, self.cfg.chat, self.cfg.system)

    def _text(self, ids: list[int]) -> str:
        return self.tok.decode([t for t in ids if t not in self.stop_ids], skip_special_tokens=True)

    def complete(self, model, prompts: list[Prompt], n: int, temperature: float, seed: int | None):
        """n completions per prompt (grouped): (prompt ids per row, completion ids per row, texts)."""
        from evolm.infer import SamplingParams, generate

        rows = [self._ids(p) for p in prompts for _ in range(n)]
        params = SamplingParams(max_new_tokens=self.cfg.max_new_tokens, temperature=temperature,
                                top_p=self.cfg.top_p if temperature else 1.0, top_k=self.cfg.top_k if temperature else 0,
                                seed=seed, stop_token_ids=self.stop_ids)
        outs = generate(model, rows, params)
        return rows, outs, [self._text(o) for o in outs]

    def score(self, prompts: list[Prompt], texts: list[str], n: int) -> tuple[torch.Tensor, dict[str, float]]:
        from evolm.post.rewards import score

        totals, parts = [], {}
        for i, t in enumerate(texts):
            p = prompts[i // n]
            total, per = score(self.rewards, p.text, t, p.answer)
            totals.append(total)
            for k, v in per.items():
                parts[k] = parts.get(k, 0.0) + v
        return torch.tensor(totals, dtype=torch.float32), {f"reward/{k}": v / len(texts) for k, v in parts.items()}

    def _next_prompts(self) -> list[Prompt]:
        out = []
        while len(out) < self.cfg.prompts_per_step:
            if self.order is None or self.cursor >= len(self.order):
                if self.order is not None:
                    self.epoch += 1
                self.cursor = 0
                self._shuffle()
            out.append(self.train[self.order[self.cursor]])
            self.cursor += 1
        return out

    def _shuffle(self) -> None:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        self.order = torch.randperm(len(self.train), generator=g).tolist()

    @torch.no_grad()
    def make_batch(self) -> dict[str, Any]:
        """Sample G completions for each of the next prompts, score them, and freeze what the loss needs."""
        c = self.cfg
        prompts = self._next_prompts()
        seed = self.seed * 7_919 + self.generated
        self.generated += 1
        rows, outs, texts = self.complete(self.model, prompts, c.group, c.temperature, seed)
        rewards, parts = self.score(prompts, texts, c.group)
        adv = group_advantages(rewards, c.group, scale=c.scale_rewards)
        ids, mask = completion_batch(rows, [o if o else [self.pad_id] for o in outs], self.pad_id)
        dev = next(self.model.parameters()).device
        ids, mask = ids.to(dev), mask.to(dev)
        batch = {"input_ids": ids, "completion_mask": mask, "advantages": adv.to(dev), "old_logps": None,
                 "ref_logps": None}
        if c.iterations > 1:  # pi_old: the policy that sampled, kept for the mu updates on this batch
            batch["old_logps"] = token_logprobs(self.model, ids, mask, c.temperature)
        if self.ref is not None:
            batch["ref_logps"] = self.ref.token_logprobs(ids, mask, c.temperature)
        std = rewards.view(-1, c.group).std(dim=1)
        batch["metrics"] = {"reward": float(rewards.mean()), "reward_std": float(std.mean()),
                            "zero_std_groups": float((std < 1e-6).float().mean()),
                            "completion_len": float(sum(len(o) for o in outs) / len(outs)), **parts}
        return batch

    # -- the Task protocol ----------------------------------------------------------------------
    def start_phase(self, index: int, phase) -> None:
        pass

    def next_batch(self) -> dict[str, Any]:
        if self.cached is None or self.uses >= self.cfg.iterations:
            self.cached, self.uses = self.make_batch(), 0
        self.uses += 1
        return self.cached

    def loss(self, model, batch):
        c = self.cfg
        logps = token_logprobs(model, batch["input_ids"], batch["completion_mask"], c.temperature)
        mask = batch["completion_mask"].clone()
        mask[:, 0] = 0
        loss, m = grpo_loss(logps, batch["old_logps"], batch["ref_logps"], batch["advantages"], mask,
                            clip=c.clip, beta=c.beta, clip_high=c.clip_high)
        m.update(batch["metrics"])
        m["tokens"] = int(batch["input_ids"].numel())
        return loss, m

    def evaluate(self, model) -> dict[str, float]:
        """Mean reward of greedy completions of the held-out prompts (``val_reward``, ``val_reward/<fn>``)."""
        if not self.val:
            return {}
        totals, parts, lens = [], {}, []
        for s in range(0, len(self.val), self.cfg.eval_batch_size):
            chunk = self.val[s:s + self.cfg.eval_batch_size]
            _, outs, texts = self.complete(model, chunk, 1, 0.0, None)
            r, per = self.score(chunk, texts, 1)
            totals.append(r)
            lens += [len(o) for o in outs]
            for k, v in per.items():
                parts[k] = parts.get(k, 0.0) + v * len(chunk)
        out = {"val_reward": float(torch.cat(totals).mean()), "val_completion_len": sum(lens) / len(lens)}
        out.update({f"val_{k}": v / len(self.val) for k, v in parts.items()})
        return out

    def samples(self, model) -> list[tuple[str, str]]:
        if not self.val:
            return []
        _, _, texts = self.complete(model, self.val[:2], 1, 0.0, None)
        return [(p.text[:60] + " -> ", t) for p, t in zip(self.val[:2], texts)]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "generated": self.generated, "cached": self.cached,
                "uses": self.uses, "has_order": self.order is not None}

    def load_state_dict(self, s: dict) -> None:
        self.epoch, self.cursor, self.generated = s["epoch"], s["cursor"], s["generated"]
        self.cached, self.uses = s["cached"], s["uses"]
        self.order = None
        if s["has_order"]:
            self._shuffle()

    def save_final(self, model, state: dict, out) -> None:
        save_policy(model, state, out, self.tok, self.base_path)

    base_path = None


# ---------------------------------------------------------------------------------------------
# `evolm grpo`
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class GRPOConfig:
    """Everything ``evolm grpo`` runs from: the model, the prompts and rewards, GRPO, LoRA and the loop."""

    model: str = option(help="HF folder, GGUF file or evolm checkpoint to start from")
    task: str = option(help=f"prompts: {', '.join(f'{k} ({v})' for k, v in TASKS.items())}, or a JSONL file of "
                            "{prompt, answer} rows")
    out: str | None = option(None, "run folder (default: runs/<command>-<model name>)")
    val: str | None = option(None, "held-out prompt JSONL (default: the task's own held-out part)")
    n_train: int | None = option(None, "use this many training prompts")
    n_val: int | None = option(None, "held-out prompts scored at each evaluation")
    data_dir: str | None = option(None, "benchmark data folder for gsm8k-mini (default data/eval)")
    reward: str = option("exact_numeric", "built-in rewards, comma-separated: exact_numeric, format")
    reward_fn: tuple[str, ...] = option((), "your reward function fn(prompt, completion, answer) -> float "
                                            "(repeatable); module:func or path/to/file.py:func", metavar="MODULE:FUNC")
    reward_weights: str | None = option(None, "comma-separated weights, one per reward (default 1)")
    chat_template: str | None = option(None, "'chatml' or a Jinja file, for models without one")
    threads: int | None = option(None)
    json: bool = option(False, "print the summary as JSON")
    objective: GRPOOptions = option(GRPOOptions())
    adapter: AdapterConfig = option(AdapterConfig())
    loop: LoopOptions = option(LoopOptions(steps=50))

    def __post_init__(self):
        require(self.loop, "steps", self.loop.steps is not None, "GRPO needs a number of steps")
        try:
            self.weights()
        except ValueError:
            raise invalid(self, "reward_weights", f"expected comma-separated numbers, got {self.reward_weights!r}") \
                from None

    def weights(self) -> list[float] | None:
        return [float(w) for w in self.reward_weights.split(",")] if self.reward_weights else None


def run_grpo(config: GRPOConfig, log=print) -> dict:
    """`evolm grpo`: returns the loop's summary plus ``before`` (held-out reward of the starting model)."""
    from evolm.post.rewards import resolve_rewards
    from evolm.train.loop import run

    opts, loop = config.objective, config.loop
    rewards = resolve_rewards(config.reward, list(config.reward_fn), config.weights())  # fail before loading
    train, val = load_task(config.task, config.n_train, config.n_val, loop.seed, config.val, config.data_dir)
    policy = load_policy(config.model, adapter=config.adapter, seed=loop.seed, chat_template=config.chat_template,
                         threads=config.threads, purpose="grpo", log=log)
    model, tok = policy.model, policy.tokenizer
    task = GRPOTask(model, tok, train, val, rewards, opts, log, seed=loop.seed)
    task.base_path = str(config.model)
    out = run_folder(config.out, "grpo", config.model)
    log(f"grpo: {len(train)} train / {len(val)} val prompts, {loop.steps} steps x {loop.accum} x "
        f"{opts.prompts_per_step} prompts x {opts.group} completions, rewards "
        f"{[n for n, _, _ in rewards]}, beta {opts.beta}, reference {task.ref.mode if task.ref else 'none'}")
    summary = run(model, task, [loop.phase("grpo", loop.steps)], loop.loop_config(), out, tokenizer=tok,
                  resume=loop.resume, seed=loop.seed, stop_after_steps=loop.stop_after)
    curve = summary["reward_curve"] = [r["reward"] for r in summary["rows"] if "reward" in r]
    report_held_out(summary, model, out, "grpo", log, train_reward=curve)
    if config.json:
        print(summary_text(summary))
    return summary


def main(argv: list[str] | None = None) -> None:
    """``python -m evolm.post.grpo ...`` (the same as ``evolm grpo``)."""
    from evolm.post import module_main

    module_main("evolm grpo", "GRPO: reinforcement learning from verifiable rewards", GRPOConfig, run_grpo, argv)


__all__ = ["group_advantages", "k3_kl", "grpo_loss", "Prompt", "arithmetic_prompts", "gsm8k_prompts",
           "read_prompts", "load_task", "TASKS", "GRPOOptions", "GRPOConfig", "GRPOTask", "run_grpo", "main"]


if __name__ == "__main__":
    main()
