"""Pretraining objectives: what a window of tokens becomes before the model sees it.

One window of the corpus (``MixtureLoader``) is turned into model inputs and targets:

- ``clm``: causal language modelling (GPT; Radford et al. 2018/2019): the input is the window, the
  target the window shifted by one. A decoder with the causal mask.
- ``mlm``: masked language modelling (BERT; Devlin et al. 2018, arXiv:1810.04805): each non-special
  token is selected with probability ``rate`` (0.15); a selected token becomes the mask token with
  probability ``mask_replace`` (0.8), a random token with ``random_replace`` (0.1), and stays as it
  is otherwise; the target is the original token at the selected positions and ignored (-100)
  elsewhere, unshifted. An encoder (``mask: bidirectional``). ``whole_word`` selects whole words
  (BERT's later whole-word-masking release): a word is chosen with probability ``rate`` and all
  its tokens are selected. These are the rules of transformers' ``DataCollatorForLanguageModeling``.
- ``span_corruption``: T5's objective (Raffel et al. 2019, arXiv:1910.10683, Sec. 3.1.4 and
  Fig. 2): ``round(rate * L)`` tokens (rate 0.15) in ``round(noise / mean_span)`` spans (mean 3)
  are dropped; each span is replaced in the input by a sentinel (``<extra_id_0>``,
  ``<extra_id_1>``, ... which T5 places at the top of the vocabulary, counting down), and the
  target lists each sentinel followed by the span it replaced, closed by the next sentinel. The
  span lengths are T5's ``random_spans_noise_mask``: the noise and the non-noise tokens are each
  cut into that many non-empty runs, uniformly among all such cuttings, and the runs alternate,
  starting with a non-noise run. An encoder-decoder.
- ``denoise``: BART's text infilling (Lewis et al. 2019, arXiv:1910.13461, Sec. 2.2): span
  lengths are drawn from Poisson(``mean_span`` = 3) until ``ceil(rate * L)`` tokens (rate 0.3)
  are covered (the last span cut to fit, as fairseq's ``DenoisingDataset`` does); each span,
  including a 0-length one (an insertion), becomes a single mask token, so the model also learns
  how many tokens are missing; the decoder's target is the original window. An encoder-decoder.

Every random draw comes from a generator keyed by ``(seed, step, global row)``: a batch is a
function of the loader's step and the run's seed, so an exact resume sees the same corruption,
and the number of processes does not change which row gets which noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

OBJECTIVES = ("clm", "mlm", "span_corruption", "denoise")
SEQ2SEQ = ("span_corruption", "denoise")  # objectives that need an encoder-decoder model
DEFAULT_RATE = {"mlm": 0.15, "span_corruption": 0.15, "denoise": 0.3}
DEFAULT_SPAN = {"span_corruption": 3.0, "denoise": 3.0}
MASK_TOKENS = ("[MASK]", "<mask>")  # BERT's and RoBERTa/BART's spelling, looked up in that order
_TRAIN_KEY, _EVAL_KEY = 0x747261696E, 0x6576616C  # separate the training and held-out noise streams


class ObjectiveError(ValueError):
    """An objective that cannot run with this tokenizer or these settings; names the field."""


@dataclass
class ObjectiveConfig:
    """The recipe's ``objective`` section (``objective: mlm`` is short for ``{name: mlm}``)."""

    name: str = "clm"  # clm | mlm | span_corruption | denoise
    rate: float | None = None  # fraction of tokens corrupted; None: the paper's (0.15, 0.15, 0.3)
    mean_span: float | None = None  # span_corruption: mean span length; denoise: Poisson lambda (3)
    whole_word: bool = False  # mlm: select whole words (word starts from the tokenizer's vocabulary)
    mask_replace: float = 0.8  # mlm: share of the selected tokens replaced by the mask token
    random_replace: float = 0.1  # mlm: share replaced by a random token (the rest stay unchanged)
    mask_token: str | None = None  # mlm/denoise; None: the first of [MASK], <mask> the tokenizer has
    sentinels: int = 100  # span_corruption: <extra_id_0> .. <extra_id_{n-1}> (T5 has 100)

    def __post_init__(self):
        if self.name not in OBJECTIVES:
            raise ObjectiveError(f"objective: name must be one of {', '.join(OBJECTIVES)}, got {self.name!r}")
        if self.rate is None:
            self.rate = DEFAULT_RATE.get(self.name)
        if self.mean_span is None:
            self.mean_span = DEFAULT_SPAN.get(self.name)
        if self.rate is not None and not 0.0 < self.rate < 1.0:
            raise ObjectiveError(f"objective: rate must be in (0, 1), got {self.rate}")
        if self.mean_span is not None and self.mean_span <= 0:
            raise ObjectiveError(f"objective: mean_span must be > 0, got {self.mean_span}")
        if not (0.0 <= self.mask_replace and 0.0 <= self.random_replace and
                self.mask_replace + self.random_replace <= 1.0):
            raise ObjectiveError(f"objective: mask_replace ({self.mask_replace}) and random_replace "
                                 f"({self.random_replace}) must be >= 0 and sum to at most 1")
        if self.sentinels < 2:
            raise ObjectiveError(f"objective: sentinels must be >= 2, got {self.sentinels}")
        if self.whole_word and self.name != "mlm":
            raise ObjectiveError(f"objective: whole_word is an mlm option, not {self.name}'s")

    @property
    def seq2seq(self) -> bool:
        return self.name in SEQ2SEQ

    def tokens_to_add(self) -> list[str]:
        """Special tokens a tokenizer trained for this objective gets, in the order they are
        appended: T5's sentinels last-first, so ``<extra_id_0>`` is the vocabulary's last id."""
        if self.name == "span_corruption":
            return [sentinel(i) for i in reversed(range(self.sentinels))]
        if self.name in ("mlm", "denoise"):
            return [self.mask_token or ("[MASK]" if self.name == "mlm" else "<mask>")]
        return []


def sentinel(i: int) -> str:
    return f"<extra_id_{i}>"


@dataclass
class Example:
    """A batch the way the model takes it: ``targets`` (-100 ignored) are aligned with the
    positions whose output predicts them (the objective does any shifting, the model none)."""

    input_ids: torch.Tensor  # (B, T)
    targets: torch.Tensor  # (B, T) for clm/mlm, (B, T_dec) for seq2seq
    segments: torch.Tensor | None = None  # (B, T) packed-document ids (clm/mlm with doc_masking)
    attention_mask: torch.Tensor | None = None  # (B, T) 0 on padding (denoise inputs differ in length)
    decoder_input_ids: torch.Tensor | None = None  # (B, T_dec): the targets shifted right


# --------------------------------------------------------------------------------------------
# the row transforms (numpy, one generator per row)
# --------------------------------------------------------------------------------------------
def mlm_row(tokens: np.ndarray, rng: np.random.Generator, *, rate: float, mask_id: int, vocab_size: int,
            special: np.ndarray, mask_replace: float = 0.8, random_replace: float = 0.1,
            word_start: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, labels) of BERT's masked LM for one window. ``special`` (vocab,) marks ids never
    selected; ``word_start`` (:func:`word_start_table`) turns on whole-word masking."""
    n = len(tokens)
    maskable = ~special[tokens]
    if word_start is None:
        selected = (rng.random(n) < rate) & maskable
    else:
        starts = word_starts(tokens, word_start, special)
        word = np.cumsum(starts) - 1  # word index of every token; -1 before the first start
        chosen = ((rng.random(n) < rate) & starts)[np.flatnonzero(starts)]  # one draw per word
        selected = maskable & (word >= 0) & (chosen[np.maximum(word, 0)] if chosen.size else False)
    labels = np.where(selected, tokens, -100)
    u = rng.random(n)  # one draw decides [MASK] / random / unchanged for each selected token
    inputs = tokens.copy()
    to_mask = selected & (u < mask_replace)
    to_random = selected & (u >= mask_replace) & (u < mask_replace + random_replace)
    inputs[to_mask] = mask_id
    inputs[to_random] = rng.integers(0, vocab_size, size=int(to_random.sum()))
    return inputs, labels


def word_starts(tokens: np.ndarray, word_start: np.ndarray, special: np.ndarray) -> np.ndarray:
    """True where a non-special token begins a word: its spelling says so (``word_start[0]``), it
    follows a token that ends one (``word_start[1]``: a trailing newline), a special token, or it
    is the window's first token."""
    starts = word_start[0][tokens].copy()
    starts[1:] |= word_start[1][tokens[:-1]] | special[tokens[:-1]]
    starts[0] = True
    return starts & ~special[tokens]


def random_segmentation(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """``k`` positive lengths summing to ``n``, uniform over all such ordered cuttings (T5's
    ``_random_segmentation``: ``k - 1`` cut points among the ``n - 1`` gaps)."""
    cuts = np.sort(rng.choice(n - 1, size=k - 1, replace=False)) + 1
    return np.diff(np.concatenate([[0], cuts, [n]]))


def span_counts(length: int, rate: float, mean_span: float) -> tuple[int, int]:
    """(noise tokens, noise spans) of T5's ``random_spans_noise_mask`` for a window of ``length``:
    ``round(rate * length)`` kept in [1, length - 1], ``round(noise / mean_span)`` spans, at least
    one and at most the non-noise tokens (each noise span follows a non-noise run). Rounding
    is half to even, as TensorFlow's ``round`` and numpy's are."""
    noise = min(max(int(np.round(length * rate)), 1), length - 1)
    spans = min(max(int(np.round(noise / mean_span)), 1), length - noise)
    return noise, spans


def seq2seq_lengths(config: ObjectiveConfig, length: int) -> tuple[float, float]:
    """(source, target) tokens a seq2seq objective makes of a window of ``length``: span corruption's
    kept tokens plus one sentinel per span, and the spans with their sentinels plus a closing one;
    text infilling's kept tokens plus one mask per span (on average ``rate * length / mean_span``
    spans; the batch pads to its longest row), and the whole window. What a step costs (lab/budget.py)."""
    if config.name == "span_corruption":
        noise, spans = span_counts(length, config.rate, config.mean_span)
        return length - noise + spans, noise + spans + 1
    if config.name == "denoise":
        noise = math.ceil(length * config.rate)
        return length - noise + noise / config.mean_span, length
    raise ObjectiveError(f"objective {config.name} is not a seq2seq objective")


def span_lengths(length: int, rate: float, mean_span: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(non-noise run lengths, noise span lengths), each of ``spans`` entries; the window is
    non-noise[0], noise[0], non-noise[1], noise[1], ..."""
    noise, spans = span_counts(length, rate, mean_span)
    return random_segmentation(length - noise, spans, rng), random_segmentation(noise, spans, rng)


def span_corrupt_row(tokens: np.ndarray, rng: np.random.Generator, *, rate: float, mean_span: float,
                     sentinel_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of T5's span corruption: each noise span is one sentinel in the inputs;
    the targets are sentinel + span for every span, then the next sentinel (the paper's Fig. 2)."""
    keep, drop = span_lengths(len(tokens), rate, mean_span, rng)
    if len(drop) + 1 > len(sentinel_ids):
        raise ObjectiveError(f"objective: {len(drop)} noise spans need {len(drop) + 1} sentinels, only "
                             f"{len(sentinel_ids)} exist; raise objective.sentinels or shorten seq_len")
    inputs, targets, pos = [], [], 0
    for i, (a, b) in enumerate(zip(keep, drop)):
        inputs += [tokens[pos:pos + a], sentinel_ids[i:i + 1]]
        targets += [sentinel_ids[i:i + 1], tokens[pos + a:pos + a + b]]
        pos += a + b
    targets.append(sentinel_ids[len(drop):len(drop) + 1])
    return np.concatenate(inputs), np.concatenate(targets)


def poisson_spans(budget: int, lam: float, rng: np.random.Generator) -> np.ndarray:
    """Span lengths from Poisson(``lam``) until they cover ``budget`` tokens, the last one cut so
    that they sum to exactly ``budget`` (fairseq's ``DenoisingDataset``); zeros are insertions."""
    lengths = rng.poisson(lam, size=budget)
    while lengths.sum() < budget:
        lengths = np.concatenate([lengths, rng.poisson(lam, size=budget)])
    cum = np.cumsum(lengths)
    last = int(np.searchsorted(cum, budget))  # first index where the running sum reaches the budget
    lengths = lengths[:last + 1].copy()
    lengths[last] = budget - (cum[last - 1] if last > 0 else 0)
    return lengths


def infill_plan(n: int, rate: float, lam: float, rng: np.random.Generator) -> list[tuple[int, int]]:
    """(start, length) of every masked span of BART's text infilling, in order; spans do not
    overlap, and ``length`` 0 is a mask inserted before token ``start``. The spans (in random
    order) and the kept tokens are interleaved uniformly at random."""
    budget = math.ceil(n * rate)
    spans = rng.permutation(poisson_spans(budget, lam, rng))
    slots = n - budget + len(spans)  # kept tokens and spans, in one row
    is_span = np.zeros(slots, dtype=bool)
    is_span[rng.choice(slots, size=len(spans), replace=False)] = True
    plan, pos, k = [], 0, 0
    for s in is_span:
        if s:
            plan.append((pos, int(spans[k])))
            pos += int(spans[k])
            k += 1
        else:
            pos += 1
    return plan


def infill_row(tokens: np.ndarray, rng: np.random.Generator, *, rate: float, mean_span: float,
               mask_id: int) -> np.ndarray:
    """The corrupted input of BART's text infilling (the target is ``tokens`` itself)."""
    out, pos = [], 0
    for start, length in infill_plan(len(tokens), rate, mean_span, rng):
        out += [tokens[pos:start], np.array([mask_id])]
        pos = start + length
    out.append(tokens[pos:])
    return np.concatenate(out).astype(tokens.dtype)


# --------------------------------------------------------------------------------------------
# the objective: a batch of windows -> Example
# --------------------------------------------------------------------------------------------
class Objective:
    """Turns the loader's windows into :class:`Example` batches, with the token ids resolved
    once from the tokenizer (a missing mask or sentinel token fails here, naming the field)."""

    def __init__(self, config: ObjectiveConfig, tokenizer=None, decoder_start_id: int | None = None):
        self.config = c = config
        self.name = c.name
        if c.name == "clm":
            return
        if tokenizer is None:
            raise ObjectiveError(f"objective {c.name} needs the tokenizer (for its special tokens)")
        self.vocab_size = tokenizer.vocab_size
        self.special = np.zeros(self.vocab_size, dtype=bool)
        self.special[sorted(i for i in tokenizer.special_ids if i < self.vocab_size)] = True
        self.pad_id = next(i for i in (tokenizer.pad_id, tokenizer.eos_id, 0) if i is not None)
        self.decoder_start_id = self.pad_id if decoder_start_id is None else decoder_start_id
        if c.name in ("mlm", "denoise"):
            self.mask_id = _mask_id(tokenizer, c)
        if c.name == "span_corruption":
            ids = [tokenizer.token_to_id(sentinel(i)) for i in range(c.sentinels)]
            missing = [sentinel(i) for i, t in enumerate(ids) if t is None]
            if missing:
                raise ObjectiveError(f"objective span_corruption: the tokenizer lacks {missing[0]} (and "
                                     f"{len(missing) - 1} more of objective.sentinels={c.sentinels}); train the "
                                     f"tokenizer in the recipe (it adds them) or lower objective.sentinels")
            self.sentinel_ids = np.array(ids, dtype=np.int64)
        self.word_start = word_start_table(tokenizer) if c.whole_word else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None, segments: torch.Tensor | None = None,
                 *, seed: int = 0, step: int = 0, first_row: int = 0, held_out: bool = False) -> Example:
        """The Example of a batch of windows ``x`` (B, T) (``y``: the next tokens, for clm).
        ``(seed, step, first_row + i)`` keys row i's noise; ``held_out`` uses a separate stream."""
        if self.name == "clm":
            return Example(x, y, segments)
        key = _EVAL_KEY if held_out else _TRAIN_KEY
        rows = x.numpy()
        rngs = [np.random.default_rng([seed, key, step, first_row + i]) for i in range(len(rows))]
        c = self.config
        if self.name == "mlm":
            pairs = [mlm_row(r, g, rate=c.rate, mask_id=self.mask_id, vocab_size=self.vocab_size,
                             special=self.special, mask_replace=c.mask_replace,
                             random_replace=c.random_replace, word_start=self.word_start)
                     for r, g in zip(rows, rngs)]
            return Example(_stack([p[0] for p in pairs]), _stack([p[1] for p in pairs]), segments)
        if segments is not None:
            raise ObjectiveError(f"objective {self.name}: document masking (train.doc_masking) is for clm and mlm")
        if self.name == "span_corruption":
            pairs = [span_corrupt_row(r, g, rate=c.rate, mean_span=c.mean_span, sentinel_ids=self.sentinel_ids)
                     for r, g in zip(rows, rngs)]
            inputs, targets = _stack([p[0] for p in pairs]), _stack([p[1] for p in pairs])
            return Example(inputs, targets, decoder_input_ids=self.shift_right(targets))
        corrupted = [infill_row(r, g, rate=c.rate, mean_span=c.mean_span, mask_id=self.mask_id)
                     for r, g in zip(rows, rngs)]
        inputs, attention = _pad([torch.from_numpy(r) for r in corrupted], self.pad_id)
        return Example(inputs, x.clone(), attention_mask=attention, decoder_input_ids=self.shift_right(x))

    def shift_right(self, targets: torch.Tensor) -> torch.Tensor:
        """The decoder's inputs: the decoder start token, then the targets but the last."""
        start = torch.full_like(targets[:, :1], self.decoder_start_id)
        return torch.cat([start, targets[:, :-1]], dim=1)


def _stack(rows: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(rows).astype(np.int64))


def _pad(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad rows to the longest; (ids, attention mask with 0 on padding)."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = r, 1
    return ids, mask


def _mask_id(tokenizer, c: ObjectiveConfig) -> int:
    names = [c.mask_token] if c.mask_token else list(MASK_TOKENS)
    for name in names:
        i = tokenizer.token_to_id(name)
        if i is not None:
            return i
    raise ObjectiveError(f"objective {c.name}: the tokenizer has no mask token ({' or '.join(names)}); set "
                         f"objective.mask_token to the one it has, or train the tokenizer in the recipe (it adds one)")


def word_start_table(tokenizer) -> np.ndarray:
    """(2, vocab): row 0 True for ids whose token begins a word, row 1 for ids whose token ends
    with whitespace, read from the vocabulary's spelling: WordPiece marks continuations with
    ``##``; byte-level BPE (GPT-2's ``Ġ`` for a space, ``Ċ`` for a newline) and SentencePiece
    (``▁``) spell the whitespace before a word into its first token. transformers' whole-word
    masking reads the same boundaries from character offsets (a gap between two tokens)."""
    from evolm.tokenizer import byte_alphabet

    spaces = {byte_alphabet()[b] for b in b" \t\n\r\x0b\x0c"} | {"▁"}
    out = np.zeros((2, tokenizer.vocab_size), dtype=bool)
    for i in range(tokenizer.vocab_size):
        t = tokenizer.id_to_token(i) or ""
        if t.startswith("##") or not t:
            continue
        out[0, i] = t[0] in spaces or t[0].isspace()
        out[1, i] = t[-1] in spaces or t[-1].isspace()
    return out


__all__ = ["OBJECTIVES", "ObjectiveConfig", "ObjectiveError", "Objective", "Example", "mlm_row",
           "span_corrupt_row", "span_counts", "span_lengths", "random_segmentation", "infill_row",
           "infill_plan", "poisson_spans", "word_start_table", "sentinel"]
