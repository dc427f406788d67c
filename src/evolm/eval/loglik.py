"""Batched log-likelihood of continuations: the one primitive behind every scored benchmark.

A request is ``(context, continuation)``; its answer is ``(sum log p(continuation | context),
is_greedy)`` where ``is_greedy`` says whether greedy decoding would have produced exactly the
continuation tokens (LAMBADA accuracy). Everything here follows lm-evaluation-harness' HFLM
(Gao et al. 2021-2024, ``lm_eval/models/huggingface.py``) so scores are comparable:

- **tokenization of a pair**: trailing spaces of the context move to the continuation, then the
  continuation tokens are ``encode(context + continuation)[len(encode(context)):]`` (no special
  tokens), so a word's leading space merges with it exactly as in running text;
- an **empty context** is replaced by one prefix token (BOS if the tokenizer has one, else EOS);
- **truncation** keeps the last ``max_length + 1`` tokens and feeds all but the last one;
- **batching** sorts by length (longest first, so the first batch shows any out-of-memory at once)
  and right-pads: with a causal mask the real positions never see the padding, so no attention
  mask is needed and results do not depend on the batch.

Beyond lm-eval (same numbers, less work): with an evolm model, requests that share their context
(the choices of one question) read that context **once**. The contexts of a batch are prefilled
into a KV cache (left-padded), the cache rows are repeated once per choice
(``KVCache.select_rows``), and only the continuations go through the model again; the LM head and
the log-softmax run only at continuation positions. HellaSwag's four endings of a ~90-token
context cost ~90 + 4 x 25 token positions instead of 4 x 115, and the head never sees a context
position. ``share_context=False`` (or a model that is not an evolm ``Transformer``) keeps the
one-row-per-request path; the two agree to float rounding (tested on every tiny family).

Results are cached per request in an append-only JSONL file, so an interrupted run resumes where
it stopped (a partial last line from a crash is ignored).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's split of (context, continuation) into token ids (see module docstring).

    Encoding uses the tokenizer's defaults, as lm-eval's ``tok_encode`` does (a tokenizer that adds
    BOS adds it to the context); an empty context becomes the prefix token (BOS, else EOS) unless
    the continuation already starts with it.
    """
    if context == "":
        cont = list(tokenizer.encode(continuation, add_special_tokens=False))
        prefix = prefix_token_id(tokenizer)
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = list(tokenizer.encode(context + continuation))
    ctx = list(tokenizer.encode(context))
    return ctx, whole[len(ctx):]


def prefix_token_id(tokenizer) -> int:
    """The token standing in for an empty context: BOS, else EOS (lm-eval's ``prefix_token_id``)."""
    for tid in (tokenizer.bos_id, tokenizer.eos_id):
        if tid is not None:
            return int(tid)
    raise ValueError("tokenizer has neither a BOS nor an EOS token: cannot score an empty context")


def rolling_windows(tokens: Sequence[int], prefix: int | None, max_length: int, stride: int | None = None):
    """Windows that score every token of ``tokens`` exactly once (``prefix`` is never scored).

    ``stride=None`` (or ``stride == max_length``) gives lm-eval's ``loglikelihood_rolling``: disjoint
    windows of ``max_length`` predictions; the first one reads ``prefix`` (BOS/EOS), later ones
    start from the token before their first target.

    ``stride < max_length`` gives the strided sliding window of Hugging Face's "Perplexity of
    fixed-length models" guide: over ``seq = [prefix] + tokens`` (``prefix=None``: ``tokens``
    alone, whose first token is then not scored), window k spans ``seq[k*stride : k*stride +
    max_length]`` and scores the tokens the previous window did not reach, so every scored token
    after the first window sees at least ``max_length - stride`` tokens of context.

    Yields ``(ids, n_scored)``: the model reads ``ids[:-1]`` and the last ``n_scored`` tokens of
    ``ids`` are the targets.
    """
    seq = ([] if prefix is None else [prefix]) + list(tokens)
    if stride is None or stride == max_length:
        if prefix is None:
            raise ValueError("lm-eval's disjoint rolling windows need a prefix token")
        scored, n = 0, len(tokens)
        while scored < n:
            new = min(max_length, n - scored)
            end = scored + new + 1  # seq[:end] holds the prefix and tokens up to the last new one
            yield seq[max(0, end - 1 - max_length):end], new
            scored += new
        return
    if not 0 < stride < max_length:
        raise ValueError(f"stride must be in 1..max_length={max_length}, got {stride}")
    prev_end = 1  # seq[0] has no context: never a target
    for begin in range(0, len(seq), stride):
        end = min(begin + max_length, len(seq))
        if end > prev_end:
            yield seq[begin:end], end - prev_end
            prev_end = end
        if end == len(seq):
            break


class LoglikScorer:
    """Scores requests with an evolm ``Transformer`` (anything with ``forward(ids) -> logits``).

    ``cache_path``: JSONL of finished requests (key -> result); ``model_id`` goes into the key so
    one cache file never mixes two models.
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int | None = None,
                 cache_path: str | Path | None = None, model_id: str = "", progress: bool = True,
                 share_context: bool = True):
        self.model = model
        self.share_context = share_context
        self.tokenizer = tokenizer
        self.batch_size = max(1, int(batch_size))
        cfg = getattr(model, "config", None)
        self.max_length = int(max_length or getattr(cfg, "max_seq_len", 2048))
        self.model_id = model_id
        self.progress = progress
        self.device = next(model.parameters()).device
        self.cache_path = Path(cache_path) if cache_path else None
        self.cache: dict[str, list] = {}
        if self.cache_path and self.cache_path.is_file():
            with open(self.cache_path, encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                    except json.JSONDecodeError:
                        continue  # torn last line of an interrupted run
                    self.cache[rec["k"]] = rec["v"]

    # ---- cache -------------------------------------------------------------------------------
    def _key(self, kind: str, *parts: str) -> str:
        h = hashlib.sha1(self.model_id.encode())
        for p in (kind, *parts):
            h.update(b"\x00" + p.encode("utf-8"))
        return h.hexdigest()

    def _store(self, items: list[tuple[str, list]]) -> None:
        for k, v in items:
            self.cache[k] = v
        if self.cache_path and items:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.cache_path, "a", encoding="utf-8") as f:
                f.write("".join(json.dumps({"k": k, "v": v}) + "\n" for k, v in items))
                f.flush()
                os.fsync(f.fileno())

    # ---- core --------------------------------------------------------------------------------
    @torch.no_grad()
    def score_tokens(self, items: Sequence[tuple[list[int], int]], bar=None) -> list[tuple[float, bool]]:
        """``items``: (input ids incl. the continuation, n continuation tokens) -> (logprob, greedy).

        The last ``n`` tokens are the targets; inputs are all tokens but the last (truncated to
        ``max_length`` from the left). One forward per batch of right-padded rows.
        """
        from evolm.model import Transformer

        if self.share_context and isinstance(self.model, Transformer):
            return self._score_shared(items, bar)
        return self._score_rows(items, bar)

    def _score_rows(self, items: Sequence[tuple[list[int], int]], bar=None) -> list[tuple[float, bool]]:
        """One right-padded row per request (lm-eval's HFLM path; any ``forward(ids) -> logits``)."""
        was_training = self.model.training
        self.model.eval()
        out: list[tuple[float, bool] | None] = [None] * len(items)
        order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
        own_bar = bar is None
        bar = _progress(len(items), self.progress and len(items) > self.batch_size) if own_bar else bar
        for b in range(0, len(order), self.batch_size):
            idx = order[b:b + self.batch_size]
            rows = []
            for i in idx:
                ids, n = items[i]
                if n < 1:
                    raise ValueError("a continuation must have at least one token")
                ids = ids[-(self.max_length + 1):]
                rows.append((ids[:-1], ids[-n:]))
            T = max(len(r[0]) for r in rows)
            inp = torch.zeros(len(rows), T, dtype=torch.long)
            for j, (x, _) in enumerate(rows):
                inp[j, :len(x)] = torch.tensor(x, dtype=torch.long)
            logits = self.model(inp.to(self.device))
            for j, (x, tgt) in enumerate(rows):
                L, n = len(x), len(tgt)
                lp = F.log_softmax(logits[j, L - n:L].float(), dim=-1)
                t = torch.tensor(tgt, dtype=torch.long, device=lp.device)
                ll = lp.gather(-1, t[:, None]).sum().item()
                greedy = bool((lp.argmax(-1) == t).all().item())
                out[idx[j]] = (ll, greedy)
            bar.update(len(idx))
        if own_bar:
            bar.close()
        self.model.train(was_training)
        return out  # type: ignore[return-value]

    def _score_shared(self, items: Sequence[tuple[list[int], int]], bar=None) -> list[tuple[float, bool]]:
        """Requests grouped by context; each batch reads its contexts once (see the module docstring)."""
        out: list[tuple[float, bool] | None] = [None] * len(items)
        groups: dict[tuple[int, ...], list[int]] = {}
        long_rows = []
        for i, (ids, n) in enumerate(items):
            if n < 1:
                raise ValueError("a continuation must have at least one token")
            if n >= len(ids):
                raise ValueError("a request needs at least one context token before its continuation")
            if len(ids) > self.max_length + 1:  # truncated from the left: its context is its own
                long_rows.append(i)
            else:
                groups.setdefault(tuple(ids[:len(ids) - n]), []).append(i)
        own_bar = bar is None
        bar = _progress(len(items), self.progress and len(items) > self.batch_size) if own_bar else bar
        if long_rows:
            for i, r in zip(long_rows, self._score_rows([items[i] for i in long_rows], bar)):
                out[i] = r
        # a batch holds whole groups (a group above batch_size is split) up to batch_size rows
        order = sorted(groups.items(), key=lambda kv: _group_order(kv[0], [items[i] for i in kv[1]]))
        was_training = self.model.training
        self.model.eval()
        batch: list[tuple[tuple[int, ...], list[int]]] = []
        rows = P = N = 0  # P: longest context prefix of the batch, N: longest continuation
        for ctx, members in order:
            for s in range(0, len(members), self.batch_size):
                part = members[s:s + self.batch_size]
                p, n = len(ctx) - 1, max(items[i][1] for i in part)
                # the batch's cache holds P + N slots: keep it within the window (learned positions)
                if batch and (rows + len(part) > self.batch_size or max(P, p) + max(N, n) > self.max_length):
                    self._shared_batch(items, batch, out)
                    bar.update(rows)
                    batch, rows, P, N = [], 0, 0, 0
                batch.append((ctx, part))
                rows, P, N = rows + len(part), max(P, p), max(N, n)
        if batch:
            self._shared_batch(items, batch, out)
            bar.update(rows)
        if own_bar:
            bar.close()
        self.model.train(was_training)
        return out  # type: ignore[return-value]

    def _shared_batch(self, items, batch: list[tuple[tuple[int, ...], list[int]]], out: list) -> None:
        """Prefill each context but its last token, repeat cache rows per request, score continuations."""
        from evolm.cache import KVCache

        dev = self.device
        G, P = len(batch), max(len(ctx) - 1 for ctx, _ in batch)
        members = [i for _, part in batch for i in part]
        N = max(items[i][1] for i in members)
        cache = KVCache.for_model(self.model, G, P + N)
        if P > 0:  # left-padded, so every context ends at slot P - 1 and continuations start at slot P
            ids = torch.zeros(G, P, dtype=torch.long)
            mask = torch.zeros(G, P, dtype=torch.long)
            for g, (ctx, _) in enumerate(batch):
                if len(ctx) > 1:
                    ids[g, P - len(ctx) + 1:] = torch.tensor(ctx[:-1])
                    mask[g, P - len(ctx) + 1:] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            self.model(ids.to(dev), position_ids=pos.to(dev), attention_mask=mask.to(dev), cache=cache,
                       last_only=True)
        cache.select_rows(torch.tensor([g for g, (_, part) in enumerate(batch) for _ in part]))
        inp = torch.zeros(len(members), N, dtype=torch.long)
        pos = torch.zeros(len(members), N, dtype=torch.long)
        r = 0
        for ctx, part in batch:
            for i in part:
                ids, n = items[i]
                inp[r, :n] = torch.tensor(ids[len(ctx) - 1:-1])  # the context's last token, then the continuation
                pos[r] = len(ctx) - 1 + torch.arange(N)
                r += 1
        # right padding of the continuations: causal, so a real position never sees it
        logits = self.model(inp.to(dev), position_ids=pos.to(dev), cache=cache)
        for r, i in enumerate(members):
            ids, n = items[i]
            lp = F.log_softmax(logits[r, :n].float(), dim=-1)
            t = torch.tensor(ids[-n:], dtype=torch.long, device=lp.device)
            out[i] = (lp.gather(-1, t[:, None]).sum().item(), bool((lp.argmax(-1) == t).all().item()))

    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """``[(context, continuation)] -> [(logprob, is_greedy)]``, cached and deduplicated."""
        keys = [self._key("ll", c, x) for c, x in requests]
        todo: dict[str, tuple[list[int], int]] = {}
        for k, (ctx, cont) in zip(keys, requests):
            if k in self.cache or k in todo:
                continue
            c_ids, x_ids = encode_pair(self.tokenizer, ctx, cont)
            if not c_ids:
                c_ids = [prefix_token_id(self.tokenizer)]
            todo[k] = (c_ids + x_ids, len(x_ids))
        self._run(todo)
        return [tuple(self.cache[k]) for k in keys]  # type: ignore[misc]

    def loglikelihood_rolling(self, texts: Sequence[str], stride: int | None = None,
                              prefix: bool = True) -> list[float]:
        """Total log-probability of each whole text (every token scored once; see ``rolling_windows``).

        Texts are encoded with the tokenizer's defaults (lm-eval's ``tok_encode``); ``prefix=False``
        scores from the text's second token on (Hugging Face's perplexity guide).
        """
        return self.loglikelihood_rolling_tokens(
            [list(self.tokenizer.encode(t)) for t in texts], stride, prefix,
            keys=[self._key("roll", str(stride), str(prefix), t) for t in texts])

    def loglikelihood_rolling_tokens(self, docs: Sequence[Sequence[int]], stride: int | None = None,
                                     prefix: bool = True, keys: Sequence[str] | None = None) -> list[float]:
        """``loglikelihood_rolling`` for documents that are already token ids (e.g. token shards)."""
        if keys is None:
            keys = [self._key("roll-ids", str(stride), str(prefix),
                              hashlib.sha1(json.dumps([int(t) for t in d]).encode()).hexdigest()) for d in docs]
        pre = prefix_token_id(self.tokenizer) if prefix else None
        todo: dict[str, tuple[list[int], int]] = {}
        parts: dict[str, list[str]] = {}
        for k, toks in zip(keys, docs):
            if k in self.cache or k in parts:
                continue
            parts[k] = []
            for w, (ids, n) in enumerate(rolling_windows([int(t) for t in toks], pre, self.max_length, stride)):
                wk = f"{k}:{w}"
                parts[k].append(wk)
                todo[wk] = (ids, n)
        window: dict[str, float] = {}
        small = {k: v for k, v in todo.items() if len(v[0]) * self._vocab() <= self.max_logits}
        if small:
            window.update(zip(small, (r[0] for r in self.score_tokens(list(small.values())))))
        for k, (ids, n) in todo.items():  # long windows: the fused head + loss, logits never built
            if k not in window:
                window[k] = self._fused_logprob(ids, n)
        # windows are not persisted one by one: only whole documents go to the cache file
        self._store([(k, [sum(window[w] for w in ws), False]) for k, ws in parts.items()])
        return [self.cache[k][0] for k in keys]

    max_logits = 1 << 27  # a window whose (T x vocab) logits exceed this goes through the fused loss

    def _vocab(self) -> int:
        cfg = getattr(self.model, "config", None)
        return int(getattr(cfg, "vocab_size", 0) or 1)

    @torch.no_grad()
    def _fused_logprob(self, ids: list[int], n: int) -> float:
        """Sum log p of the last ``n`` tokens via ``model(x, targets=...)`` (mean CE, fused with the head)."""
        was_training = self.model.training
        self.model.eval()
        ids = ids[-(self.max_length + 1):]
        x = torch.tensor([ids[:-1]], dtype=torch.long, device=self.device)
        y = torch.full_like(x, -100)
        y[0, -n:] = torch.tensor(ids[-n:], dtype=torch.long, device=self.device)
        loss = self.model(x, targets=y)
        self.model.train(was_training)
        return -float(loss) * n

    def _run(self, todo: dict[str, tuple[list[int], int]]) -> None:
        """Score ``todo`` in chunks, persisting each chunk so an interruption loses little."""
        # requests sharing a context stay in one chunk (longest group first), or the shared-context
        # path would see each choice of a question alone in a different chunk and read its context 4 times
        groups: dict[tuple[int, ...], list[tuple[str, tuple[list[int], int]]]] = {}
        for k, (ids, n) in todo.items():
            groups.setdefault(tuple(ids[:len(ids) - n]), []).append((k, (ids, n)))
        ordered = [g for _, g in sorted(groups.items(), key=lambda kv: _group_order(kv[0], [v for _, v in kv[1]]))]
        chunk = self.batch_size * 16
        bar = _progress(len(todo), self.progress and len(todo) > self.batch_size)

        def score(part: list[tuple[str, tuple[list[int], int]]]) -> None:
            res = self.score_tokens([v for _, v in part], bar=bar)
            self._store([(k, [ll, greedy]) for (k, _), (ll, greedy) in zip(part, res)])

        part: list[tuple[str, tuple[list[int], int]]] = []
        for g in ordered:
            if part and len(part) + len(g) > chunk:
                score(part)
                part = []
            part.extend(g)
        if part:
            score(part)
        bar.close()


def _group_order(ctx: tuple[int, ...], members: list[tuple[list[int], int]]) -> tuple[int, int]:
    """Sort key of a context's requests: longest continuation first, then longest context.

    A shared-context batch runs ``rows x longest continuation`` positions (right-padded) after
    ``contexts x longest context`` (left-padded, one row per context, so a quarter as many rows
    for 4 choices): grouping questions by continuation length wastes the least padding. Longest
    first shows an out-of-memory error at once.
    """
    return -max(n for _, n in members), -len(ctx)


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc="loglikelihood", unit="req", leave=False)


def perplexity(total_logprob: float, n_units: int) -> float:
    """exp(-mean log-likelihood per unit) (token, word or byte)."""
    return math.exp(-total_logprob / max(1, n_units))


def bits_per_byte(total_logprob: float, n_bytes: int) -> float:
    """-sum log p / (n_bytes * ln 2): tokenizer-independent compression (Gao et al., The Pile)."""
    return -total_logprob / (max(1, n_bytes) * math.log(2))


def iter_chunks(xs: Sequence, n: int) -> Iterable[Sequence]:
    for i in range(0, len(xs), n):
        yield xs[i:i + n]
