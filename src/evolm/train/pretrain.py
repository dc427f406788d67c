"""Pretraining: next-token prediction (or masked / span objectives) over a data mixture, in stages.

A recipe (``recipe.py``) names a model, a tokenizer, data and stages. This module prepares them
(trains the tokenizer if asked, tokenizes the corpus into shards, builds the model) and hands a
:class:`PretrainTask` to the one training loop of ``loop.py``, which owns optimizer, schedule,
accumulation, autocast, logging, evaluation, checkpoints and exact resume. The task supplies what
is specific to pretraining: each stage's ``MixtureLoader`` (optionally with document masking),
the stage's RoPE change for long-context extension, DeepSeek-V3's MoE bias update, held-out loss
per source, sampled continuations and the MFU numerator from the cost card. The recipe's
``objective`` (``data/objectives.py``) decides what a window becomes: the next tokens (``clm``), a
masked LM's inputs and labels (``mlm``, an encoder) or a seq2seq pair (``span_corruption``,
``denoise``).

The run folder holds ``metrics.jsonl``, TensorBoard events (``tb/``), ``checkpoints/``,
``loss.png``, ``report.md`` and, at the end, the final model + tokenizer, so that
``evolm generate --model RUN_DIR`` works on it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from evolm.checkpoint import CheckpointError
from evolm.config import ModelConfig
from evolm.inputs import did_you_mean
from evolm.train import parallel as par
from evolm.train.config import LoopConfig, LRShape, Phase, values_of
from evolm.train.loop import Runtime, run, seed_all, update_moe_bias
from evolm.train.recipe import Recipe, RecipeError, StageSpec


# --------------------------------------------------------------------------------------------
# setup pieces
# --------------------------------------------------------------------------------------------
def load_or_train_tokenizer(recipe: Recipe, out: Path, data_dir: str | None, log: Callable[[str], None]):
    """The recipe's tokenizer; a trained one is saved in the run folder and reused on resume."""
    from evolm.tokenizer import Tokenizer, train_bpe

    spec = recipe.tokenizer
    saved = out / "tokenizer.json"
    if spec.path is not None:
        p = spec.path
        if os.path.isdir(p):
            return Tokenizer.from_hf_dir(p)
        if p.endswith(".gguf"):
            from evolm.interop.gguf_vocab import tokenizer_from_gguf

            return tokenizer_from_gguf(p)
        if not os.path.isfile(p):
            raise RecipeError(f"{recipe.source}: tokenizer: path not found: {p}")
        return Tokenizer.from_file(p)
    if saved.is_file():
        return Tokenizer.from_hf_dir(out) if (out / "tokenizer_config.json").is_file() else Tokenizer.from_file(saved)
    from evolm.data.prepare import load_spec
    from evolm.data.sources import iter_documents

    opts = dict(spec.train or {})
    vocab = int(opts.pop("vocab_size", 4096))
    specials = opts.pop("special_tokens", ["<|endoftext|>"])
    names = opts.pop("sources", None)
    max_chars = int(opts.pop("max_chars", 20_000_000))
    if opts:
        raise RecipeError(f"{recipe.source}: tokenizer.train: unknown key(s) {sorted(opts)} "
                          "(valid: vocab_size, special_tokens, sources, max_chars)")
    sources, _ = load_spec(names or recipe.data["sources"])

    def texts():
        budget = max_chars
        for s in sources:
            for doc in iter_documents(s, data_dir):
                if budget <= 0:
                    return
                yield doc.text[:budget]
                budget -= len(doc.text)

    log(f"training a byte-level BPE tokenizer (vocab {vocab}) on {', '.join(s.name for s in sources)}")
    tok = train_bpe(texts(), vocab_size=vocab, special_tokens=specials)
    extra = recipe.objective.tokens_to_add()  # [MASK] / <mask>, or T5's sentinels at the vocabulary's end
    if extra:
        tok.backend.add_special_tokens(extra)
        log(f"objective {recipe.objective.name}: added {len(extra)} special token(s) ({extra[0]}...) "
            f"at ids {tok.vocab_size - len(extra)}..{tok.vocab_size - 1}")
    tok.save(out)
    return tok


def build_model(recipe: Recipe, tokenizer) -> tuple[Any, ModelConfig]:
    from evolm.model import build

    m = recipe.model
    if m.init is not None:
        from evolm.loading import load

        model, _ = load(m.init)
        return model, model.config
    from evolm.loading import load_config

    spec = m.preset if m.preset is not None else m.config
    if m.config is not None and not os.path.isfile(m.config):
        raise RecipeError(f"{recipe.source}: model.config: file not found: {m.config}")
    config = load_config(spec)
    overrides = dict(m.overrides)
    if overrides.get("vocab_size") == "tokenizer":
        overrides["vocab_size"] = tokenizer.vocab_size
    known = set(config.to_dict())
    for k in overrides:
        if k not in known:

            raise RecipeError(f"{recipe.source}: model.overrides: unknown ModelConfig field "
                              f"'{k}'{did_you_mean(k, known)}")
    config = config.replace(**overrides, name=recipe.name)
    if tokenizer.vocab_size > config.vocab_size:
        raise RecipeError(f"{recipe.source}: tokenizer has {tokenizer.vocab_size} tokens but the model's "
                          f"vocab_size is {config.vocab_size}; set model.overrides.vocab_size to at least "
                          f"{tokenizer.vocab_size} (or 'tokenizer')")
    return build(config), config


def check_objective(recipe: Recipe, config: ModelConfig) -> None:
    """The objective and the model kind must agree: a decoder learns clm, an encoder mlm, an
    encoder-decoder the seq2seq objectives (a clm model that sees the future learns nothing)."""
    name, where = recipe.objective.name, f"{recipe.source}: objective {recipe.objective.name}"
    seq2seq = getattr(config, "encoder_layers", 0) > 0
    if recipe.objective.seq2seq and not seq2seq:
        raise RecipeError(f"{where} trains an encoder-decoder model (T5, BART); this model is not one")
    if not recipe.objective.seq2seq and seq2seq:
        raise RecipeError(f"{where} is for a single stack; an encoder-decoder model needs span_corruption or denoise")
    if name == "mlm" and config.mask != "bidirectional":
        raise RecipeError(f"{where} trains an encoder: set model.overrides.mask: bidirectional (got {config.mask!r})")
    if name == "clm" and config.mask == "bidirectional":
        raise RecipeError(f"{where}: a bidirectional model sees the tokens it predicts; use objective mlm "
                          f"or model.overrides.mask: causal")


def positions_from_segments(seg: torch.Tensor) -> torch.Tensor:
    """Position ids that restart at 0 at every document boundary of a packed row."""
    T = seg.shape[1]
    idx = torch.arange(T, device=seg.device).expand_as(seg)
    start = torch.ones_like(seg, dtype=torch.bool)
    start[:, 1:] = seg[:, 1:] != seg[:, :-1]
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


# --------------------------------------------------------------------------------------------
# stages
# --------------------------------------------------------------------------------------------
@dataclass
class StagePlan:
    spec: StageSpec
    steps: int
    accum: int
    tokens_per_step: int

    def phase(self) -> Phase:
        return Phase(name=self.spec.name, steps=self.steps, accum=self.accum, tokens_per_step=self.tokens_per_step,
                     **values_of(self.spec, LRShape))


def plan_stages(recipe: Recipe, world: int) -> list[StagePlan]:
    """Each stage's steps and accumulation; ``world``: the data-parallel degree (the ranks that read
    different micro-batches; tensor/context/pipeline groups share theirs)."""
    plans = []
    for s in recipe.stages:
        micro_tokens = recipe.train.micro_batch * s.seq_len * world
        target = recipe.train.tokens_per_step or micro_tokens
        accum = max(1, round(target / micro_tokens))
        tps = accum * micro_tokens
        steps = s.tokens // tps
        if steps < 1:
            raise RecipeError(f"{recipe.source}: stages ({s.name}): tokens={s.tokens} is less than one step "
                              f"of {tps} tokens")
        plans.append(StagePlan(s, steps, accum, tps))
    return plans


def apply_stage_to_model(model, spec: StageSpec) -> None:
    """Long-context stages change RoPE's base or scaling; the tables are recomputed."""
    changes: dict[str, Any] = {}
    c = model.config
    if spec.rope_theta is not None and spec.rope_theta != c.rope_theta:
        changes["rope_theta"] = spec.rope_theta
    if spec.rope_scaling is not None and spec.rope_scaling != c.rope_scaling:
        changes["rope_scaling"] = spec.rope_scaling
    if spec.seq_len > c.max_seq_len:
        if c.pos_emb == "learned":
            raise RecipeError(f"stage {spec.name}: seq_len {spec.seq_len} exceeds the learned position "
                              f"table ({c.max_seq_len}); learned positions cannot be extended")
        changes["max_seq_len"] = spec.seq_len
    if changes:
        if c.pos_emb != "rope" and ("rope_theta" in changes or "rope_scaling" in changes):
            raise RecipeError(f"stage {spec.name}: rope_theta/rope_scaling set but the model has pos_emb={c.pos_emb!r}")
        model.config = c.replace(**changes)
        model.reset_buffers()


# --------------------------------------------------------------------------------------------
# the task
# --------------------------------------------------------------------------------------------
class PretrainTask:
    """Next-token prediction over each stage's mixture (the loop's Task protocol, see loop.py)."""

    def __init__(self, recipe: Recipe, model, tokenizer, data_out: Path, manifest: dict,
                 plans: list[StagePlan], rt: Runtime, log: Callable[[str], None] = lambda s: None):
        self.log = log
        self.recipe, self.model, self.tokenizer = recipe, model, tokenizer
        self.data_out, self.manifest, self.plans, self.rt = data_out, manifest, plans, rt
        self.loader = None
        self.seq_len = plans[0].spec.seq_len
        from evolm.data.objectives import Objective

        start = getattr(model.config, "decoder_start_token_id", None)
        self.objective = Objective(recipe.objective, tokenizer, decoder_start_id=start)

    def start_phase(self, index: int, phase: Phase) -> None:
        from evolm.data.mixture import MixtureLoader, tier_mixture

        for p in self.plans[:index + 1]:  # cumulative: a resumed run re-applies earlier stages' changes
            apply_stage_to_model(self.model, p.spec)
        spec = self.plans[index].spec
        self.seq_len = spec.seq_len
        weights = tier_mixture(self.manifest, spec.mixture) if isinstance(spec.mixture, str) else spec.mixture
        t = self.recipe.train
        self.loader = MixtureLoader(self.data_out, spec.seq_len, t.micro_batch, weights=weights,
                                    seed=self.recipe.seed + index, rank=self.rt.dp_rank, world_size=self.rt.dp_world,
                                    return_segments=t.doc_masking)
        self.log(f"stage {index + 1}/{len(self.plans)} '{spec.name}': {phase.steps} steps, seq_len "
                 f"{spec.seq_len}, {phase.accum} micro-batch(es) of {t.micro_batch} per step, "
                 f"mixture {self.loader.weights}")

    def next_batch(self):
        """The objective's Example of the loader's next windows; its noise is keyed by the
        stage's seed, the loader's step and the global row, so a resumed run sees the same."""
        step = self.loader.step
        windows = self.loader.next_batch()
        return self.objective(*windows, seed=self.loader.seed, step=step,
                              first_row=self.rt.dp_rank * self.recipe.train.micro_batch)

    def loss(self, model, batch):
        return self.forward(model, batch), {}

    def forward(self, model, ex):
        """The mean cross-entropy of an Example (+ MoE aux), fused with the head."""
        device = self.rt.device
        kwargs = {}
        if ex.segments is not None:
            seg = ex.segments.to(device)
            kwargs = {"doc_ids": seg, "position_ids": positions_from_segments(seg)}
        if ex.attention_mask is not None:
            kwargs["attention_mask"] = ex.attention_mask.to(device)
        if ex.decoder_input_ids is not None:
            kwargs["decoder_input_ids"] = ex.decoder_input_ids.to(device)
        return model(ex.input_ids.to(device), targets=ex.targets.to(device), **kwargs)

    def after_step(self, model) -> None:
        update_moe_bias(model, self.rt.world)

    def flops_per_token(self, phase: Phase) -> float:
        """Per corpus token under the objective (the lab's count: an MLM head at the masked share,
        a seq2seq window as its source and target tokens), for the MFU column."""
        from evolm.lab.budget import training_flops_per_token

        return training_flops_per_token(self.model.config, self.seq_len, self.recipe.objective)

    def evaluate(self, model) -> dict[str, float]:
        """Held-out loss per source; batches are shared out across the data-parallel ranks (a
        tensor-parallel group works on one together) and the sums reduced, so the figure is the
        same for any layout."""
        from evolm.data.mixture import iter_eval_batches

        t, rank, world = self.recipe.train, self.rt.dp_rank, self.rt.dp_world
        sums: dict[str, list[float]] = {}
        heldout = Path(t.eval_data) if t.eval_data else self.data_out  # one held-out set for many runs
        batches = list(iter_eval_batches(heldout, self.seq_len, t.micro_batch,
                                         max_windows_per_source=t.eval_batches * t.micro_batch))
        for source, _, _ in batches:
            sums.setdefault(source, [0.0, 0.0])
        # batch i is rank i % world's. With sharded parameters (FSDP, TP, ...) every forward is a
        # collective, so the ranks must run as many: a rank past the last batch runs the first one
        # again and counts nothing (else the ranks with one batch more wait forever for the others)
        for i in range(rank, -(-len(batches) // world) * world, world):
            if i >= len(batches) and not self.rt.sharded:
                break
            source, x, y = batches[i % len(batches)]
            ex = self.objective(x, y, seed=self.recipe.seed, step=i % len(batches), held_out=True)  # same noise each eval
            loss = float(self.forward(model, ex))
            if i < len(batches):
                n = int((ex.targets != -100).sum())
                sums[source][0] += loss * n
                sums[source][1] += n
        names = sorted(sums)
        totals = par.all_reduce_sum([v for n in names for v in sums[n]], world, self.rt.dp_group)
        res = {f"val_loss_{n}": totals[2 * i] / max(1.0, totals[2 * i + 1]) for i, n in enumerate(names)}
        res["val_loss"] = sum(totals[0::2]) / max(1.0, sum(totals[1::2]))
        res["val_ppl"] = math.exp(min(res["val_loss"], 50.0))
        return res

    def samples(self, model) -> list[tuple[str, str]]:
        """Continuations of the sample prompts; for a seq2seq objective the decoder's output for
        each prompt as the encoder's input (sentinels / masks kept visible); for mlm the prompts
        with their mask tokens filled in."""
        if self.objective.name == "mlm":
            return self.filled_masks(model)
        from evolm.infer import SamplingParams, generate

        t, tok = self.recipe.train, self.tokenizer
        params = SamplingParams(max_new_tokens=t.sample_tokens, temperature=0.8, top_k=50,
                                seed=self.recipe.seed, ignore_eos=False, stop_token_ids=tok.eos_ids)
        outs = []
        for p in t.sample_prompts:
            ids = tok.encode(p, add_special_tokens=False) or [tok.eos_id or 0]
            new = generate(model, [ids], params)[0]
            outs.append((p, tok.decode(new, skip_special_tokens=not self.objective.config.seq2seq)))
        return outs

    @torch.no_grad()
    def filled_masks(self, model) -> list[tuple[str, str]]:
        """An encoder's guesses: each prompt with its mask tokens replaced by the top prediction."""
        tok, mask_id, outs = self.tokenizer, self.objective.mask_id, []
        for p in self.recipe.train.sample_prompts:
            ids = torch.tensor([tok.encode(p, add_special_tokens=False) or [mask_id]], device=self.rt.device)
            guess = model(ids).argmax(-1)
            filled = torch.where(ids == mask_id, guess, ids)[0].tolist()
            outs.append((p, tok.decode(filled, skip_special_tokens=True)))
        return outs

    def state_dict(self) -> dict:
        return {"loader": self.loader.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        self.loader.load_state_dict(s["loader"])

    def reshard_data_state(self, states: list[dict], saved: int, dp_rank: int, dp_degree: int) -> dict:
        """The data position under another data-parallel degree, exactly: ``MixtureLoader`` draws
        each step's *global* batch from (seed, step) and global cursors, and rank r reads rows
        [r*micro_batch, (r+1)*micro_batch) of it, so every rank's state is the same global one.
        It carries over when the rows per loader step (micro_batch x degree) are unchanged; then
        the resumed run reads exactly the windows the saved one would have, split another way."""
        first = states[0]["loader"]
        if any(s["loader"] != first for s in states):
            raise CheckpointError(f"loader state: the {saved} data-parallel ranks were at different positions; "
                                  f"this loader cannot re-derive them for degree {dp_degree}")
        rows, now = int(first["global_batch"]), self.recipe.train.micro_batch * dp_degree
        if rows != now:
            fix = (f"set train.micro_batch to {rows // dp_degree} (so that micro_batch x {dp_degree} = {rows})"
                   if rows % dp_degree == 0 else
                   f"no micro_batch gives {rows} rows over {dp_degree} ranks: use a degree that divides {rows}")
            raise CheckpointError(
                f"resume: saved with data-parallel degree {saved} ({rows} rows per loader step = micro_batch "
                f"{rows // saved} x {saved}), resuming with degree {dp_degree} and micro_batch "
                f"{self.recipe.train.micro_batch} ({now} rows): the data order would change. Resume with degree "
                f"{saved}, or {fix}")
        return states[0]


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def prepare_tokenizer_and_data(recipe: Recipe, out: Path, rt: Runtime, data_dir: str | None,
                               say: Callable[[str], None], data_out: Path | None = None) -> tuple[Any, Path, dict]:
    """The tokenizer and the tokenized shards (``out/data``, or ``data_out`` when shards are shared
    between runs: prepared once, reused by every run whose data and tokenizer match): rank 0
    trains / writes them first, the other ranks then read what it wrote."""
    from evolm.data.prepare import prepare

    main = rt.main
    seed_all(recipe.seed)
    tokenizer = load_or_train_tokenizer(recipe, out, data_dir, say) if main else None
    par.barrier(rt.world)
    if not main:
        tokenizer = load_or_train_tokenizer(recipe, out, data_dir, say)
    data_out = Path(data_out) if data_out is not None else out / "data"
    if main:
        manifest = prepare(recipe.data, tokenizer, data_out, data_dir=data_dir, log=say)
    par.barrier(rt.world)
    if not main:
        manifest = json.loads((data_out / "manifest.json").read_text())
    return tokenizer, data_out, manifest


def pretrain(recipe: Recipe, out_dir: str | None = None, resume: bool = False,
             log: Callable[[str], None] | None = None, data_dir: str | None = None,
             stop_after_steps: int | None = None, data_out: str | Path | None = None) -> dict[str, Any]:
    """Run a recipe; returns a summary (final losses, tokens, throughput, run folder, and the
    wall time split into ``setup_s``: tokenizer, shards, model; and ``train_s``: the loop).

    ``stop_after_steps`` ends the run early after that many optimizer steps of this call (used
    to test exact resumption). ``data_out``: where the shards are (prepared there if missing),
    instead of the run folder's ``data``: runs of one lab ablation share them.
    """
    import time

    from evolm.data.mixture import check_tokenizer

    t_start = time.time()
    rt = Runtime.create(recipe.train.distributed, recipe.parallel)
    main = rt.main
    say = (log or print) if main else (lambda s: None)
    if recipe.train.threads:
        torch.set_num_threads(recipe.train.threads)
    out = Path(out_dir or recipe.out or os.path.join("runs", recipe.name))
    if main:
        out.mkdir(parents=True, exist_ok=True)
        import yaml

        (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    par.barrier(rt.world)
    tokenizer, data_out, manifest = prepare_tokenizer_and_data(recipe, out, rt, data_dir, say, data_out)
    if recipe.train.eval_data:
        check_tokenizer(_heldout_manifest(recipe), tokenizer)

    seed_all(recipe.seed)  # the same initial weights whatever the tokenizer/data steps consumed
    model, config = build_model(recipe, tokenizer)
    check_objective(recipe, config)
    check_tokenizer(manifest, tokenizer, config.vocab_size)
    model.to(rt.device)
    plans = plan_stages(recipe, rt.dp_world)
    say(f"model {config.name}: {sum(p.numel() for p in model.parameters()):,} parameters; "
        f"{len(plans)} stage(s): " + ", ".join(f"{p.spec.name} {p.steps} steps x {p.tokens_per_step} tokens"
                                                for p in plans))

    task = PretrainTask(recipe, model, tokenizer, data_out, manifest, plans, rt, log=say)
    summary = run(model, task, [p.phase() for p in plans], LoopConfig.from_recipe(recipe), out,
                  tokenizer=tokenizer, resume=resume, rt=rt, log=say, stop_after_steps=stop_after_steps,
                  extra_state={"recipe": recipe.to_dict()})
    summary["train_s"] = summary["wall_s"]  # the loop's own clock
    summary["wall_s"] = time.time() - t_start
    summary["setup_s"] = summary["wall_s"] - summary["train_s"]
    samples, peak_note = summary.pop("samples"), summary.pop("peak_note")
    summary.pop("rows")
    if main and not summary["stopped_early"]:
        _report(recipe, model.config, manifest, plans, summary, samples, peak_note, out / "report.md")
        say(f"done: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['wall_s']:.0f}s; "
            f"val loss {summary.get('val_loss', float('nan')):.4f}; run folder {out}")
    return summary


def _heldout_manifest(recipe: Recipe) -> dict:
    from evolm.data.mixture import load_manifest

    folder = Path(recipe.train.eval_data)
    if not (folder / "manifest.json").is_file():
        raise RecipeError(f"{recipe.source}: train.eval_data: {folder} is not a prepared data folder "
                          f"(no manifest.json; make one with `evolm data prepare`)")
    return load_manifest(folder)


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------
def _report(recipe, config, manifest, plans, summary, samples, peak_note, path: Path) -> None:
    from evolm.analysis.cost import cost_card, human_count

    card = cost_card(config, context_len=plans[-1].spec.seq_len)
    lines = [f"# {recipe.name}", "",
             f"Model: `{recipe.model.preset or recipe.model.config or recipe.model.init}` with overrides "
             f"`{recipe.model.overrides}`: {human_count(card['params_total'])} parameters "
             f"({card['params_total']:,}), d_model {config.d_model}, {config.n_layers} layers, "
             f"{config.n_heads} heads / {config.n_kv_heads} KV heads, vocab {config.vocab_size}.", "",
             "## Data", "", "| source | train tokens | val tokens | documents |", "|---|---|---|---|"]
    for name, info in manifest.get("sources", {}).items():
        splits = info.get("splits", {})
        tr, va = splits.get("train", {}), splits.get("val", {})
        lines.append(f"| {name} | {tr.get('tokens', 0):,} | {va.get('tokens', 0):,} | "
                     f"{tr.get('docs', 0) + va.get('docs', 0):,} |")
    lines += ["", "## Stages", "", "| stage | steps | tokens/step | seq_len | LR | mixture |", "|---|---|---|---|---|---|"]
    for p in plans:
        s = p.spec
        lines.append(f"| {s.name} | {p.steps} | {p.tokens_per_step:,} | {s.seq_len} | {s.schedule} "
                     f"{s.lr_start}->{s.lr_end} x {recipe.optim.lr} | {s.mixture or 'data weights'} |")
    lines += ["", "## Results", "",
              f"- steps {summary['steps']}, tokens {summary['tokens']:,}, wall time {summary['wall_s']:.0f} s",
              f"- final train loss {summary['train_loss']:.4f}",
              f"- final val loss {summary.get('val_loss', float('nan')):.4f} "
              f"(perplexity {summary.get('val_ppl', float('nan')):.2f})"]
    for k, v in summary.items():
        if k.startswith("val_loss_"):
            lines.append(f"  - {k[9:]}: {v:.4f}")
    mfu = summary.get("mfu")
    mfu_text = f"MFU {100 * mfu:.1f}% against {peak_note}" if mfu is not None else "MFU not measured"
    lines += [f"- throughput (median) {summary['tokens_per_s']:,.0f} tokens/s; {mfu_text}",
              "", "![loss](loss.png)", "", "## Samples", ""]
    for p, text in samples:
        lines.append(f"- `{p}` → {text!r}")
    path.write_text("\n".join(lines) + "\n")

