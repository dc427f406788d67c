"""Text out of the decoding loop: UTF-8-safe streaming, stop strings, chat prompts.

Streaming turns tokens into text pieces as they arrive. A byte-level token may end in the middle
of a UTF-8 character, and some decoders treat the first token of a sequence specially (the
SentencePiece leading space), so we decode a short window of recent tokens and emit only the part
that is new and complete. Stop strings are matched on that text; text that could still become a
stop string is held back until the next token settles it.
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol, Sequence

import torch

from evolm.infer.decode import EvalMode, as_batch, decode_steps, stop_tokens
from evolm.infer.sampling import SamplingParams
from evolm.quant.policy import DEFAULT_POLICY, KernelPolicy


class TokenizerLike(Protocol):
    """What generation needs from a tokenizer (``evolm.tokenizer.Tokenizer`` provides it)."""

    eos_ids: Any

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class IncrementalDecoder:
    """Token ids in, complete text pieces out; the pieces concatenate to ``decode(all ids)``.

    We keep two offsets into the ids: text up to ``read`` has been emitted, and decoding starts
    at ``start`` (one emission behind) so the window's first token -- which some decoders treat
    specially, e.g. dropping a SentencePiece word's leading space -- is never a token whose text
    we still need. A piece is emitted only when the window's text grew and does not end in
    U+FFFD, the replacement for a UTF-8 character whose remaining bytes are in the next token.
    """

    def __init__(self, tokenizer: TokenizerLike):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.start = self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (e.g. bytes that never completed a character)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self.start:self.read])
        now = self.tokenizer.decode(self.ids[self.start:])
        if len(now) <= len(before) or (now.endswith("\ufffd") and not final):
            return ""
        self.start, self.read = self.read, len(self.ids)
        return now[len(before):]


class StopStrings:
    """Cuts streamed text at the first stop string; holds back text that may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = tuple(stops)
        self.pending = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add text; return what is safe to emit now. Sets ``stopped`` once a stop string appears."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending, self.stopped = self.pending[:min(hits)], "", True
            return out
        hold = 0  # longest tail of pending that is a proper prefix of some stop string
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.pending)), hold, -1):
                if self.pending.endswith(s[:n]):
                    hold = n
                    break
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


@torch.inference_mode()
def stream(model, tokenizer: TokenizerLike, prompt_ids, params: SamplingParams | None = None,
           compile: bool = False, policy: KernelPolicy | None = None,
           images: dict | None = None) -> Iterator[str]:
    """Yield the continuation of one prompt as text pieces, as the tokens arrive.

    No piece splits a UTF-8 character; generation stops at ``params.stop_token_ids``, the
    tokenizer's ``eos_ids`` (unless ``params.ignore_eos``), ``max_new_tokens``, or the first of
    ``params.stop`` strings, which is not emitted. ``compile`` / ``policy``: as :func:`evolm.infer.decode.generate`'s.
    """
    params = params or SamplingParams()
    if isinstance(prompt_ids, torch.Tensor):
        if prompt_ids.ndim == 2 and prompt_ids.shape[0] != 1:
            raise ValueError(f"stream: takes one prompt, got a batch of {prompt_ids.shape[0]}")
        prompt_ids = prompt_ids.reshape(-1).tolist()
    prompt_ids = list(prompt_ids)
    if prompt_ids and not isinstance(prompt_ids[0], int):
        raise ValueError("stream: takes one prompt (a list of token ids), not a batch")
    device = next(model.parameters()).device
    ids, mask = as_batch([prompt_ids], None, device)
    stop_ids = stop_tokens(params, tokenizer)
    decoder, stopper = IncrementalDecoder(tokenizer), StopStrings(params.stop)
    with EvalMode(model):
        for tok, _ in decode_steps(model, ids, mask, params, stop_ids, compile, policy or DEFAULT_POLICY,
                                   images=images):
            t = int(tok[0])
            if t in stop_ids:
                break
            piece = stopper.push(decoder.push(t))
            if piece:
                yield piece
            if stopper.stopped:
                return
    piece = stopper.push(decoder.flush())
    piece += stopper.flush()
    if piece:
        yield piece


def chat_prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """A conversation rendered with the tokenizer's chat template, the assistant turn opened."""
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    if isinstance(rendered, dict) or hasattr(rendered, "input_ids"):
        rendered = rendered["input_ids"]
    if isinstance(rendered, str):  # the template already holds any BOS it wants: add none
        try:
            return list(tokenizer.encode(rendered, add_special_tokens=False))
        except TypeError:
            return list(tokenizer.encode(rendered))
    return list(rendered)


def generate_text(model, tokenizer: TokenizerLike, prompt: str, params: SamplingParams | None = None,
                  chat: bool = False, compile: bool = False, policy: KernelPolicy | None = None) -> str:
    """The continuation of ``prompt`` as a string (only the new text).

    ``chat=True`` wraps the prompt as a user message with the tokenizer's chat template (with the
    assistant turn opened) and stops at the template's end token (the tokenizer's ``eos_ids``).
    """
    ids = chat_prompt_ids(tokenizer, [{"role": "user", "content": prompt}]) if chat else list(tokenizer.encode(prompt))
    return "".join(stream(model, tokenizer, ids, params, compile, policy))
