"""A GGUF file's vocabulary -> evolm ``Tokenizer`` (llama.cpp keeps no tokenizer.json).

Two kinds of vocabulary exist in ``tokenizer.ggml.*`` metadata:

* ``tokenizer.ggml.model == "gpt2"``: byte-level BPE (Radford et al. 2019, GPT-2) with an explicit
  merge list; tokens are spelled in GPT-2's printable byte alphabet.
* ``"llama"``: a SentencePiece vocabulary (Kudo & Richardson 2018, arXiv:1808.06226) with
  per-token scores, ``▁`` for spaces and ``<0xNN>`` byte-fallback tokens. Gemma's files carry no
  merges, so they are rebuilt from the vocabulary.

The rebuilt tokenizer reproduces what ``transformers`` builds from the same file (its GGUF loader
is the reference our tests compare to, id for id). It lives in interop, beside the GGUF reader,
so that ``evolm.tokenizer`` stays a layer below the file formats.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from evolm.inputs import first_line, is_library_error, short
from evolm.tokenizer import Tokenizer, TokenizerError, byte_alphabet

# GGUF token types (llama.cpp's llama_token_type)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer split patterns named by GGUF's ``tokenizer.ggml.pre``: the regex each vocabulary's
# merges were learned after. Names not listed keep GPT-2's own pattern (ByteLevel's default).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "dbrx",
                     "smaug-bpe", "lfm2", "midm-2.0"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez", "kormo"), _QWEN2_SPLIT),
    **dict.fromkeys(("gpt-4o", "llama4", "minimax-m2"), _GPT4O_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}


def tokenizer_from_gguf(path_or_reader: Any) -> Tokenizer:
    """The tokenizer a GGUF file (a path, a ``GGUFFile`` or a ``gguf.GGUFReader``) describes."""
    from evolm.interop.gguf import read_metadata  # here, not at the top: the reader imports this module

    meta = read_metadata(path_or_reader, tokenizer=True)
    return tokenizer_from_gguf_metadata(meta, name=str(getattr(path_or_reader, "path", path_or_reader)))


def tokenizer_from_gguf_metadata(meta: dict[str, Any], name: str = "gguf", cache_key: str | None = None) -> Tokenizer:
    """Build the tokenizer from GGUF ``tokenizer.*`` metadata (a dict of plain Python values);
    anything wrong with it is a :class:`TokenizerError` naming ``name``. ``cache_key`` (see
    :func:`file_cache_key`): keep the built vocabulary on disk and read it back next time."""
    try:
        return _from_metadata(meta, name, cache_key)
    except TokenizerError as e:
        raise TokenizerError(str(e) if name in str(e) else f"{name}: {e}") from None
    except BaseException as e:  # tokenizers raises bare Exceptions and Rust panics (a merge of unknown tokens ...)
        if not is_library_error(e):
            raise
        raise TokenizerError(f"{name}: the GGUF vocabulary cannot be built ({first_line(e)})") from None


def file_cache_key(path: str, sources: tuple[Path, ...] = (Path(__file__),), extra: str = "") -> str | None:
    """A key for what is derived from the file at ``path`` (here: the vocabulary built from a GGUF
    file): its absolute path, size and modification time, and the ``sources`` that derive it (a
    change to how vocabularies are built invalidates every cached one). None where the file cannot
    be stat-ed."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    h = hashlib.sha256(b"".join(p.read_bytes() for p in sources) + extra.encode())
    h.update(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:24]


def _cache_path(key: str) -> Path:
    from evolm.assets import cache_dir

    return cache_dir() / "tokenizers" / f"{key}.json"


def _cached_backend(key: str | None) -> _Backend | None:
    """The backend built earlier for this key: SentencePiece vocabularies are slow to build in
    Python (Gemma 3's 262k tokens and their merges: 2.8 s idle), its tokenizer.json reads back in
    1.3 s. A missing or unreadable entry is rebuilt."""
    if key is None:
        return None
    try:
        return _Backend.from_file(str(_cache_path(key)))
    except Exception:  # absent, truncated, from another tokenizers version: rebuild
        return None


def _store_backend(key: str | None, backend: _Backend) -> None:
    if key is None:
        return
    path = _cache_path(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(backend.to_str())
        os.replace(tmp, path)  # whole or absent: a concurrent reader never sees half a file
    except OSError:
        pass  # a read-only cache only costs the rebuild


def _from_metadata(meta: dict[str, Any], name: str, cache_key: str | None = None) -> Tokenizer:
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind is None or tokens is None:
        raise TokenizerError(f"{name}: GGUF file has no tokenizer (tokenizer.ggml.model / .tokens missing)")
    _check_vocabulary(meta, name)
    arch = str(meta.get("general.architecture", ""))
    if kind == "gpt2":  # byte-level BPE: its merges are in the file, built in ~0.25 s (reading a cached
        backend = _build_backend(meta, tokens, kind, arch)  # tokenizer.json back takes longer)
    elif kind == "llama":  # SentencePiece: merges rebuilt in Python from the ranked vocabulary
        backend = _cached_backend(cache_key)
        if backend is None:
            backend = _build_backend(meta, tokens, kind, arch)
            _store_backend(cache_key, backend)
    else:
        raise TokenizerError(f"{name}: GGUF tokenizer.ggml.model={short(kind)} is not supported "
                             f"(supported: 'gpt2' byte-level BPE, 'llama' SentencePiece BPE)")
    return _wrap(meta, tokens, kind, backend, name)


def _build_backend(meta: dict[str, Any], tokens: list[str], kind: str, arch: str) -> _Backend:
    """The ``tokenizers`` backend: the model, pre-tokenizer and decoder, control tokens special and
    user-defined tokens whole."""
    types = meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens)
    if kind == "gpt2":
        backend, vocab, control_ok = _gguf_byte_level_bpe(meta, tokens)
    else:
        backend, vocab = _gguf_sentencepiece_bpe(meta, tokens, gemma=arch.startswith("gemma"))
        control_ok = None

    # control tokens (<|im_start|>, <bos>, ...) stay whole and are special; user-defined ones
    # (llama.cpp matches them whole too) stay whole but are ordinary text
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types)
               if ty == _CONTROL and (control_ok is None or control_ok(t))]
    if control:
        backend.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types)
            if ty == _USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens(user)
    return backend


def _wrap(meta: dict[str, Any], tokens: list[str], kind: str, backend: _Backend, name: str) -> Tokenizer:
    """evolm's :class:`Tokenizer` around the backend: special tokens, BOS/EOS, stop ids, chat template."""

    def special(key: str) -> str | None:
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    add_bos = meta.get("tokenizer.ggml.add_bos_token")
    if add_bos is None:  # llama.cpp adds BOS to a SentencePiece vocabulary that does not say
        add_bos = kind == "llama"
    stop = [meta[k] for k in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id") if k in meta]
    return Tokenizer(backend, bos_token=special("bos_token_id"), eos_token=special("eos_token_id"),
                     unk_token=special("unknown_token_id"), pad_token=special("padding_token_id"),
                     add_bos=bool(add_bos), add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
                     chat_template=meta.get("tokenizer.chat_template"), eos_token_ids=stop, name=name)


def _check_vocabulary(meta: dict[str, Any], name: str) -> None:
    """The ``tokenizer.*`` keys have the types llama.cpp writes (they come from an untrusted file)."""
    tokens = meta["tokenizer.ggml.tokens"]

    def bad(key: str, want: str):
        return TokenizerError(f"{name}: metadata {key!r} is {short(meta.get(key))}; expected {want}")

    if not (isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens)):
        raise bad("tokenizer.ggml.tokens", "a non-empty array of strings")
    n = len(tokens)
    for key, want, ok in (
            ("tokenizer.ggml.token_type", f"an array of {n} integers",
             lambda v: isinstance(v, list) and len(v) == n and all(isinstance(x, int) for x in v)),
            ("tokenizer.ggml.scores", f"an array of {n} numbers",
             lambda v: isinstance(v, list) and len(v) == n and all(isinstance(x, (int, float)) for x in v)),
            ("tokenizer.ggml.merges", "an array of strings 'left right'",
             lambda v: isinstance(v, list) and all(isinstance(m, str) and m.count(" ") == 1 for m in v)),
            ("tokenizer.chat_template", "a string", lambda v: isinstance(v, str)),
            ("tokenizer.ggml.pre", "a string", lambda v: isinstance(v, str)),
            *((f"tokenizer.ggml.{k}", f"a token id below {n}",
               lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < n)
              for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id", "eot_token_id",
                        "eom_token_id"))):
        if key in meta and not ok(meta[key]):
            raise bad(key, want)


def _gguf_byte_level_bpe(meta: dict, tokens: list[str]):
    """GPT-2-style byte-level BPE with the file's merges.

    Tokens are stored in the byte alphabet; a token using any other character (a mislabelled
    special token) is re-spelled from its UTF-8 bytes, and is not made a special token, so the
    vocabulary keeps the size the model expects.
    """
    alphabet = byte_alphabet()
    chars = set(alphabet.values())
    in_alphabet = lambda t: set(t) <= chars  # noqa: E731
    vocab = {}
    for i, t in enumerate(tokens):
        vocab[t if in_alphabet(t) else "".join(alphabet[b] for b in t.encode("utf-8"))] = i
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges") or []]
    bpe = models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                     end_of_word_suffix="", fuse_unk=False)
    backend = _Backend(bpe)
    split = GGUF_PRE_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:  # GPT-2's pattern, built into ByteLevel
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    return backend, vocab, in_alphabet


def _gguf_sentencepiece_bpe(meta: dict, tokens: list[str], gemma: bool) -> tuple[_Backend, dict[str, int]]:
    """A SentencePiece BPE vocabulary as a ``tokenizers`` BPE with byte fallback.

    ``tokenizers`` needs merges; SentencePiece BPE has only scored pieces, so merges are derived:
    every way to cut a piece into two pieces of the vocabulary is a merge, ranked by the piece's
    score (Llama), or, for Gemma, by the piece's position in the file (its scores do not follow
    the merge order). Gemma stores runs of 2+ spaces as real spaces; they are spelled with ``▁``
    like every other space so the derived merges line up.
    """
    if gemma:
        tokens = ["▁" * len(t) if " " in t and not t.strip() else t for t in tokens]
        rank = {t: -i for i, t in enumerate(tokens)}
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None:
            raise TokenizerError("GGUF SentencePiece vocabulary has no tokenizer.ggml.scores")
        rank = dict(zip(tokens, scores))
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = meta.get("tokenizer.ggml.merges")
    if merges:
        merges = [tuple(m.split(" ")) for m in merges]
    else:
        merges = _merges_from_ranked_vocab(vocab, rank)
    unk_id = meta.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None else "<unk>"
    backend = _Backend(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                                  byte_fallback=True, dropout=None))
    if gemma:  # spaces become ▁, split after each (Gemma's own tokenizer.json)
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:  # Llama/Mistral SentencePiece: a prefix ▁ on the first word, spaces -> ▁
        prepend = meta.get("tokenizer.ggml.add_space_prefix", True)
        backend.normalizer = None
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁",
                                                         prepend_scheme="first" if prepend else "never",
                                                         split=False)
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prepend:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        backend.decoder = decoders.Sequence(steps)
    return backend, vocab


def _merges_from_ranked_vocab(vocab: dict[str, int], rank: dict[str, float]) -> list[tuple[str, str]]:
    """Merges implied by a vocabulary: each split of a piece into two pieces of the vocabulary.

    Ordered best first by (piece rank, length of the left part, length of the right part); ties
    keep the order of the pieces in ``rank`` and, within a piece, the vocabulary ids of its parts
    (the order transformers derives, so ids match it exactly).
    """
    found = []
    for piece, score in rank.items():
        local = []
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                local.append((left, right))
        if len(local) > 1:
            local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        for left, right in local:
            found.append((score, len(left), len(right), left, right))
    found.sort(key=lambda m: (m[0], m[1], m[2]), reverse=True)  # stable: ties keep their order
    return [(l, r) for _, _, _, l, r in found]


__all__ = ["tokenizer_from_gguf", "tokenizer_from_gguf_metadata", "GGUF_PRE_SPLITS"]
