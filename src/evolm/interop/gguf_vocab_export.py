"""An evolm ``Tokenizer`` -> GGUF ``tokenizer.*`` metadata (the inverse of ``gguf_vocab.py``).

llama.cpp keeps no tokenizer.json: it rebuilds the tokenizer from the vocabulary, a model kind
and a pre-tokenizer *name* (it knows each name's split regex), so export has to say what our
``tokenizers`` pipeline is in those terms:

* byte-level BPE (GPT-2, SmolLM2, Qwen, evolm's own ``train_bpe``) -> ``tokenizer.ggml.model =
  "gpt2"`` with the merges, and ``.pre`` named from the pre-tokenizer's split pattern;
* SentencePiece-style BPE with byte fallback (Llama 2, Gemma) -> ``"llama"`` with per-token
  scores. SentencePiece ranks its pieces by score, best first, in vocabulary order, so a normal
  piece's score is minus its rank among normal pieces (exactly what Gemma's files hold); control
  and user-defined tokens score -1000, byte tokens ``<0xNN>`` 0.

Token types follow llama.cpp: special added tokens are control tokens, other added tokens
user-defined (matched whole in the raw text, so their ``▁`` are written as spaces), ids the
model has but the tokenizer lacks are unused ``[PAD{i}]`` tokens. Gemma's runs of spaces, which
``gguf_vocab`` reads as ``▁`` pieces, go back to the user-defined space tokens of its files.
"""

from __future__ import annotations

import json
import re
from typing import Any

from evolm.interop.gguf_vocab import GGUF_PRE_SPLITS

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BYTE_TOKEN = re.compile(r"<0x[0-9A-F]{2}>")
_PRE_NAMES: dict[str, str] = {}
for _name, _regex in GGUF_PRE_SPLITS.items():  # llama.cpp's first name for each split pattern
    _PRE_NAMES.setdefault(_regex, _name)


def vocab_metadata(tokenizer, vocab_size: int, arch: str) -> dict[str, Any]:
    """The ``tokenizer.*`` keys for ``tokenizer`` serving a model with ``vocab_size`` embedding rows."""
    from evolm.interop.gguf_export import ExportError

    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer {tokenizer.name!r}: a {model.get('type')} vocabulary cannot be written as "
                          f"GGUF; llama.cpp's formats are byte-level BPE and SentencePiece-style BPE")
    spm = bool(model.get("byte_fallback"))
    added = {t["id"]: t for t in spec.get("added_tokens") or []}
    tokens, types = _tokens_and_types(tokenizer, added, vocab_size, spm, spm and arch.startswith("gemma"))
    meta: dict[str, Any] = {"tokenizer.ggml.model": "llama" if spm else "gpt2",
                            "tokenizer.ggml.pre": "default" if spm else _pre_name(spec, tokenizer.name),
                            "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types}
    if spm:
        meta["tokenizer.ggml.scores"] = _spm_scores(types)
        meta["tokenizer.ggml.add_space_prefix"] = _adds_space_prefix(spec)
    else:
        meta["tokenizer.ggml.merges"] = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    for key, value in (("bos", tokenizer.bos_id), ("eos", tokenizer.eos_id),
                       ("unknown", tokenizer.token_to_id(tokenizer.unk_token) if tokenizer.unk_token else None),
                       ("padding", tokenizer.pad_id)):
        if value is not None:
            meta[f"tokenizer.ggml.{key}_token_id"] = int(value)
    eot = [i for i in tokenizer.eos_ids if i != tokenizer.eos_id]
    if eot:  # the end-of-turn token llama.cpp stops chat replies at
        meta["tokenizer.ggml.eot_token_id"] = int(eot[0])
    meta["tokenizer.ggml.add_bos_token"] = bool(tokenizer.add_bos)
    meta["tokenizer.ggml.add_eos_token"] = bool(tokenizer.add_eos)
    if isinstance(tokenizer.chat_template, str) and tokenizer.chat_template:
        meta["tokenizer.chat_template"] = tokenizer.chat_template
    return meta


def _tokens_and_types(tokenizer, added: dict, vocab_size: int, spm: bool,
                      gemma: bool) -> tuple[list[str], list[int]]:
    from evolm.interop.gguf_export import ExportError

    n = tokenizer.backend.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ExportError(f"tokenizer {tokenizer.name!r} has {n} tokens but the model only {vocab_size} "
                          f"embedding rows; llama.cpp needs a row for every token")
    unk = tokenizer.token_to_id(tokenizer.unk_token) if tokenizer.unk_token else None
    tokens, types = [], []
    for i in range(vocab_size):
        text = tokenizer.id_to_token(i) if i < n else None
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        elif i in added:
            special = added[i].get("special", False)
            tokens.append(text if special or not spm else text.replace("▁", " "))
            types.append(CONTROL if special else USER_DEFINED)
        elif gemma and len(text) > 1 and set(text) == {"▁"}:  # Gemma's runs of spaces (gguf_vocab reads them so)
            tokens.append(" " * len(text))
            types.append(USER_DEFINED)
        else:
            tokens.append(text)
            types.append(UNKNOWN if i == unk else BYTE if spm and _BYTE_TOKEN.fullmatch(text) else NORMAL)
    return tokens, types


def _spm_scores(types: list[int]) -> list[float]:
    scores, rank = [], 0
    for t in types:
        if t == NORMAL:
            scores.append(-float(rank))
            rank += 1
        else:
            scores.append(-1000.0 if t in (CONTROL, USER_DEFINED, UNUSED) else 0.0)
    return scores


def _adds_space_prefix(spec: dict) -> bool:
    """SentencePiece's "add dummy prefix": a Metaspace that prepends, or a normalizer Prepend("▁")."""
    def walk(node):
        if isinstance(node, dict):
            yield node
            for v in node.values():
                yield from walk(v)
        elif isinstance(node, list):
            for v in node:
                yield from walk(v)

    for node in walk([spec.get("pre_tokenizer"), spec.get("normalizer")]):
        if node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") != "never":
            return True
        if node.get("type") == "Prepend":
            return True
    return False


def _pre_name(spec: dict, name: str) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level pipeline (it knows each name's regex)."""
    from evolm.interop.gguf_export import ExportError

    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if spec.get("normalizer") is None:
        if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
            return "gpt-2"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
            regex = (steps[0].get("pattern") or {}).get("Regex")
            if regex in _PRE_NAMES and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
                return _PRE_NAMES[regex]
    raise ExportError(f"tokenizer {name!r}: its pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}"
                      f"{', with a normalizer' if spec.get('normalizer') else ''}) has no llama.cpp name; "
                      f"supported: GPT-2's, SmolLM's and the split patterns {sorted(set(_PRE_NAMES.values()))}")


__all__ = ["vocab_metadata"]
