"""Tokenizers: a thin wrapper over Hugging Face ``tokenizers`` (Rust), never a hand-written BPE.

One ``Tokenizer`` class serves every model, whatever its vocabulary came from:

- ``from_file`` / ``from_hf_dir``: a ``tokenizer.json`` (+ ``tokenizer_config.json`` for the
  special tokens, BOS/EOS handling and the chat template, + ``generation_config.json`` for the
  stop tokens), as Hugging Face checkpoints ship them.
- a GGUF file's vocabulary: ``evolm.interop.gguf_vocab`` builds a ``Tokenizer`` from it.
- ``train_bpe``: train a byte-level BPE on your own text; ``train_tokenizer`` also trains BERT's
  WordPiece and T5's SentencePiece-unigram (``evolm tokenizer train --model bpe|wordpiece|unigram``).

Chat templates are Jinja2 programs shipped with a model. They are rendered here in the same
environment transformers uses (sandboxed, ``trim_blocks``/``lstrip_blocks``, ``loopcontrols``,
``raise_exception``, ``strftime_now``, a non-escaping ``tojson``, the special tokens as
variables), so a prompt is byte-identical to the one the model was tuned on.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Sequence

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _Backend

from evolm.inputs import first_line, is_library_error, read_json, short

# tokens that end a turn in the chat formats of the lineage; present ones join ``eos_ids``
END_OF_TURN_TOKENS = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|end|>", "<|endoftext|>",
                      "<|end_of_text|>", "<|eom_id|>", "</s>", "<eos>", "<|return|>")

class TokenizerError(ValueError):
    """A tokenizer file or argument that cannot be used; the message names it."""


@lru_cache(maxsize=1)
def byte_alphabet() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to printable characters.

    Byte-level BPE spells every token as bytes, but merges and vocab files are text: bytes that
    are printable Latin-1 stand for themselves, the others (control chars, space, ...) are shifted
    to code points 256 and up, so ' ' (0x20) is written 'Ġ' and '\\n' is 'Ċ'.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shift = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def _token_str(tok: Any) -> str | None:
    """A special token as tokenizer_config.json spells it: a string or an AddedToken dict."""
    if tok is None or isinstance(tok, str):
        return tok
    if isinstance(tok, dict):
        return tok.get("content")
    return str(tok)


# ----------------------------------------------------------------------------------------------
class Tokenizer:
    """Text <-> token ids, special tokens, and the model's chat template.

    ``backend`` is the ``tokenizers.Tokenizer`` doing the work; its post-processor adds BOS/EOS
    when ``encode(..., add_special_tokens=True)`` and the model expects them.
    """

    def __init__(self, backend: _Backend, *, bos_token: str | None = None, eos_token: str | None = None,
                 unk_token: str | None = None, pad_token: str | None = None, mask_token: str | None = None,
                 add_bos: bool | None = None, add_eos: bool | None = None,
                 chat_template: str | None = None, eos_token_ids: Sequence[int] = (),
                 name: str = "tokenizer"):
        self.backend = backend
        self.name = name
        self.bos_token, self.eos_token = bos_token, eos_token
        self.unk_token, self.pad_token, self.mask_token = unk_token, pad_token, mask_token
        for role, tok in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token),
                          ("mask_token", mask_token)):
            if tok is not None and backend.token_to_id(tok) is None:
                raise TokenizerError(f"{name}: {role} {tok!r} is not in the vocabulary")
        self.chat_template = chat_template
        self._extra_eos = [int(i) for i in eos_token_ids]
        if add_bos is not None or add_eos is not None:
            self.set_special_tokens_template(bool(add_bos), bool(add_eos))
        else:
            self.add_bos, self.add_eos = self._infer_template_flags()
            # the file's post-processor stays in charge (BERT's "[CLS] A [SEP] B [SEP]" with segment ids,
            # T5's "A </s>"): saving then writes no add_*_token flags, which would make transformers
            # (and ``from_hf_dir``) rebuild it as "BOS A EOS BOS B EOS"
            self.template_is_ours = False

    # --- special tokens ---------------------------------------------------------------------
    def set_special_tokens_template(self, add_bos: bool, add_eos: bool) -> None:
        """Make ``encode(add_special_tokens=True)`` add BOS and/or EOS, as transformers does."""
        add_bos = add_bos and self.bos_token is not None
        add_eos = add_eos and self.eos_token is not None
        self.add_bos, self.add_eos = add_bos, add_eos
        self.template_is_ours = True
        bos, eos = self.bos_token, self.eos_token
        single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
        pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
        special = ([(bos, self.bos_id)] if add_bos else []) + ([(eos, self.eos_id)] if add_eos else [])
        self.backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                                    special_tokens=special)

    def _infer_template_flags(self) -> tuple[bool, bool]:
        probe = self.backend.encode("a", add_special_tokens=True).ids
        plain = self.backend.encode("a", add_special_tokens=False).ids
        add_bos = self.bos_id is not None and len(probe) > len(plain) and probe[0] == self.bos_id
        add_eos = self.eos_id is not None and len(probe) > len(plain) and probe[-1] == self.eos_id
        return add_bos, add_eos

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    @property
    def bos_id(self) -> int | None:
        return None if self.bos_token is None else self.backend.token_to_id(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return None if self.eos_token is None else self.backend.token_to_id(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return None if self.pad_token is None else self.backend.token_to_id(self.pad_token)

    @property
    def mask_id(self) -> int | None:
        """The ``[MASK]`` / ``<mask>`` token masked-LM training replaces tokens with, if the vocabulary has one."""
        return None if self.mask_token is None else self.backend.token_to_id(self.mask_token)

    @property
    def eos_ids(self) -> list[int]:
        """Every token that ends generation: EOS, the config's stop ids, and end-of-turn tokens."""
        ids = ([self.eos_id] if self.eos_id is not None else []) + self._extra_eos
        special = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
        for tok in END_OF_TURN_TOKENS:
            i = self.backend.token_to_id(tok)
            if i is not None and tok in special:
                ids.append(i)
        return list(dict.fromkeys(ids))

    @property
    def special_ids(self) -> set[int]:
        return {i for i, t in self.backend.get_added_tokens_decoder().items() if t.special}

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # --- text <-> ids -----------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def __call__(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.encode(text, add_special_tokens)

    # --- chat -------------------------------------------------------------------------------
    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs: Any) -> str | list[int]:
        """Render a conversation with the model's template (as transformers renders it).

        ``tokenize=True`` returns ids, encoded without adding BOS again (the template writes it).
        Extra keyword arguments become template variables (e.g. ``tools``, ``enable_thinking``).
        """
        if not self.chat_template:
            raise TokenizerError(f"{self.name}: this tokenizer has no chat template (a base model?); "
                                 f"pass plain text prompts, or set Tokenizer.chat_template")
        for m in messages:
            if not isinstance(m, dict) or "role" not in m:
                raise TokenizerError(f"chat messages must be dicts with 'role' and 'content', got {m!r}")
        variables = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                       ("unk_token", self.unk_token), ("pad_token", self.pad_token)) if v is not None}
        variables.update(kwargs)
        variables.setdefault("tools", None)
        variables.setdefault("documents", None)
        text = _compile_template(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    # --- constructors -----------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs: Any) -> "Tokenizer":
        """A ``tokenizer.json``; special tokens and template come from ``kwargs``."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: no such tokenizer.json file")
        kwargs.setdefault("name", str(path))
        return _built(cls, path, _backend_from_file(path), kwargs)

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """A Hugging Face model folder: tokenizer.json + tokenizer_config.json (+ chat template)."""
        d = Path(path)
        if not (d / "tokenizer.json").is_file():
            raise TokenizerError(f"{d}: no tokenizer.json (only fast-tokenizer folders are supported)")
        cfg_path = d / "tokenizer_config.json"
        cfg = _read_json(cfg_path) if cfg_path.is_file() else {}
        special_map = _read_json(d / "special_tokens_map.json") if (d / "special_tokens_map.json").is_file() else {}

        def tok(key: str, role: str | None = None) -> str | None:
            value = _token_str(cfg.get(key, special_map.get(key)))
            if value is None and role is not None:  # BERT's [CLS] / [SEP] open and close a text
                value = _token_str(cfg.get(role, special_map.get(role)))
            if value is not None and not isinstance(value, str):
                raise TokenizerError(f"{cfg_path}: {key} is {short(value)}; expected a token string")
            return value

        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: use "default"
            if not all(isinstance(t, dict) for t in template):
                raise TokenizerError(f"{cfg_path}: chat_template is {short(template)}; expected a string or a "
                                     f"list of {{name, template}} objects")
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if (d / "chat_template.jinja").is_file():
            template = (d / "chat_template.jinja").read_text(encoding="utf-8", errors="replace")
        elif (d / "chat_template.json").is_file():
            template = _read_json(d / "chat_template.json").get("chat_template", template)
        if template is not None and not isinstance(template, str):
            raise TokenizerError(f"{d}: chat_template is {short(template)}; expected a string")
        stop: list[int] = []
        if (d / "generation_config.json").is_file():
            eos = _read_json(d / "generation_config.json").get("eos_token_id")
            stop = [eos] if isinstance(eos, int) else list(eos) if isinstance(eos, list) else []
            if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in stop):
                raise TokenizerError(f"{d / 'generation_config.json'}: eos_token_id is {short(eos)}; expected a "
                                     f"token id or a list of them")
        flags = {k: cfg[k] for k in ("add_bos_token", "add_eos_token") if k in cfg}
        if not all(isinstance(v, bool) for v in flags.values()):
            raise TokenizerError(f"{cfg_path}: {short(flags)}; add_bos_token / add_eos_token must be true or false")
        backend = _backend_from_file(d / "tokenizer.json")
        return _built(cls, d, backend, dict(
            bos_token=tok("bos_token", "cls_token"), eos_token=tok("eos_token", "sep_token"),
            unk_token=tok("unk_token"), pad_token=tok("pad_token"), mask_token=tok("mask_token"),
            add_bos=flags.get("add_bos_token", False) if flags else None,
            add_eos=flags.get("add_eos_token", False) if flags else None,
            chat_template=template, eos_token_ids=stop, name=str(d)))

    # --- saving -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write tokenizer.json + tokenizer_config.json (with the chat template), loadable by
        ``transformers.AutoTokenizer.from_pretrained(path)`` and by ``Tokenizer.from_hf_dir``."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(d / "tokenizer.json"))
        cfg: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token, "eos_token": self.eos_token,
            "unk_token": self.unk_token, "pad_token": self.pad_token, "mask_token": self.mask_token,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1_000_000_000,
        }
        if self.template_is_ours:
            cfg.update(add_bos_token=self.add_bos, add_eos_token=self.add_eos)
        if self.chat_template:
            cfg["chat_template"] = self.chat_template
        (d / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")
        return d

    def __repr__(self) -> str:
        return (f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, add_bos={self.add_bos}, chat_template={self.chat_template is not None})")


def _read_json(path: Path) -> dict:
    return read_json(path, TokenizerError)


def _backend_from_file(path: Path) -> _Backend:
    """The ``tokenizers`` object for a tokenizer.json, or a TokenizerError naming the file (the
    library raises bare ``Exception``s, and Rust panics, for a damaged file).

    Padding and truncation stored in the file are switched off, as transformers switches them off
    for a call without ``padding=`` / ``truncation=``: sentence-transformers' MiniLM ships
    ``"padding": {"Fixed": 128}`` and ``"truncation": 128``, which would otherwise pad every text
    to 128 ids and cut longer ones. Batches are padded by the caller; lengths are its choice."""
    try:
        backend = _Backend.from_file(str(path))
    except BaseException as e:
        if not is_library_error(e):
            raise
        raise TokenizerError(f"{path}: not a valid tokenizers JSON file ({first_line(e)})") from None
    backend.no_padding()
    backend.no_truncation()
    return backend


def _built(cls, source: Path, backend: _Backend, kwargs: dict[str, Any]) -> "Tokenizer":
    """``cls(backend, **kwargs)``: a vocabulary that loads but cannot encode fails here, naming the file."""
    try:
        return cls(backend, **kwargs)
    except TokenizerError as e:
        raise TokenizerError(str(e) if str(source) in str(e) else f"{source}: {e}") from None
    except BaseException as e:
        if not is_library_error(e):
            raise
        raise TokenizerError(f"{source}: the tokenizer does not work ({type(e).__name__}: {first_line(e)})") from None


# ----------------------------------------------------------------------------------------------
# chat templates
# ----------------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _compile_template(source: str):
    """Compile a chat template in the environment transformers renders templates in, each render
    under a budget of time, loop steps and characters (a template comes with the model files:
    see ``evolm.chat_template``)."""
    from evolm.chat_template import compile_template

    return compile_template(source)


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def _is_file(p: Any) -> bool:
    if not isinstance(p, (str, os.PathLike)) or (isinstance(p, str) and ("\n" in p or len(p) > 4096)):
        return False
    try:
        return Path(p).is_file()
    except OSError:  # a text too long to be a path
        return False


def train_bpe(files_or_iterator: str | os.PathLike | Iterable[str], vocab_size: int,
              special_tokens: Sequence[str] = ("<|endoftext|>",), min_frequency: int = 2,
              chat_template: str | None = None) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE (Sennrich et al. 2016, arXiv:1508.07909; GPT-2's byte
    alphabet so any text encodes without <unk>).

    ``files_or_iterator``: a path, a list of paths, or an iterable of text strings. The first
    special token serves as BOS and EOS (GPT-2's ``<|endoftext|>`` convention).
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + len(special_tokens):
        raise TokenizerError(f"train_bpe: vocab_size={vocab_size} is smaller than the 256-symbol byte "
                             f"alphabet plus {len(special_tokens)} special tokens")
    backend = _Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(special_tokens), initial_alphabet=alphabet,
                                  show_progress=False)
    _train(backend, (trainer, lambda: None), files_or_iterator)
    first = special_tokens[0] if special_tokens else None
    return Tokenizer(backend, bos_token=first, eos_token=first, add_bos=False, add_eos=False,
                     chat_template=chat_template, name="bpe")


# the tokenizer models ``train_tokenizer`` trains, each with the special tokens of the family that made it known
TOKENIZER_MODELS = {
    "bpe": ("<|endoftext|>",),                                    # GPT-2: one token for BOS, EOS and padding
    "wordpiece": ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),  # BERT
    "unigram": ("<pad>", "</s>", "<unk>"),                        # T5 (ids 0, 1, 2 as in T5's vocabulary)
}


def train_tokenizer(files_or_iterator: str | os.PathLike | Iterable[str], vocab_size: int, model: str = "bpe",
                    special_tokens: Sequence[str] | None = None, min_frequency: int = 2,
                    lowercase: bool = False) -> Tokenizer:
    """Train a ``model`` tokenizer (``bpe``, ``wordpiece`` or ``unigram``) on text.

    ``special_tokens=None`` takes the family's (``TOKENIZER_MODELS``); given ones must keep the roles
    in that order (WordPiece: pad, unk, cls, sep, mask; unigram: pad, eos, unk). ``lowercase``:
    an uncased WordPiece (bert-base-uncased); the other models keep case.
    """
    if model not in TOKENIZER_MODELS:
        raise TokenizerError(f"model {model!r}: expected one of {', '.join(TOKENIZER_MODELS)}")
    specials = tuple(special_tokens) if special_tokens else TOKENIZER_MODELS[model]
    if len(specials) < len(TOKENIZER_MODELS[model]):
        raise TokenizerError(f"special_tokens {list(specials)}: a {model} tokenizer needs "
                             f"{len(TOKENIZER_MODELS[model])} ({', '.join(TOKENIZER_MODELS[model])} by role)")
    if lowercase and model != "wordpiece":
        raise TokenizerError(f"lowercase: only a wordpiece tokenizer is trained uncased, not {model}")
    if model == "bpe":
        return train_bpe(files_or_iterator, vocab_size, specials, min_frequency)
    if vocab_size <= len(specials):
        raise TokenizerError(f"vocab_size={vocab_size}: must exceed the {len(specials)} special tokens")
    build = _wordpiece if model == "wordpiece" else _unigram
    backend, trainer, roles = build(vocab_size, specials, min_frequency, lowercase)
    _train(backend, trainer, files_or_iterator)
    return Tokenizer(backend, **roles, name=model)


def _wordpiece(vocab_size: int, specials: Sequence[str], min_frequency: int, lowercase: bool):
    """BERT's WordPiece (Wu et al. 2016, arXiv:1609.08144; Devlin et al. 2019): BERT's normalizer and
    whitespace/punctuation pre-split, ``##`` continuations, ``[CLS] A [SEP] B [SEP]`` with segment ids."""
    pad, unk, cls, sep, mask = specials[:5]
    backend = _Backend(models.WordPiece(unk_token=unk, continuing_subword_prefix="##"))
    backend.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                                    strip_accents=None, lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                        special_tokens=list(specials), continuing_subword_prefix="##",
                                        show_progress=False)

    def finish() -> None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls}:0 $A:0 {sep}:0", pair=f"{cls}:0 $A:0 {sep}:0 $B:1 {sep}:1",
            special_tokens=[(cls, backend.token_to_id(cls)), (sep, backend.token_to_id(sep))])

    return backend, (trainer, finish), dict(bos_token=cls, eos_token=sep, unk_token=unk, pad_token=pad,
                                            mask_token=mask)


def _unigram(vocab_size: int, specials: Sequence[str], min_frequency: int, lowercase: bool):
    """T5's SentencePiece unigram LM (Kudo 2018, arXiv:1804.10959; Kudo & Richardson 2018): NFKC, runs
    of spaces folded, words marked with ``▁`` (so decoding restores the spaces), EOS after each text."""
    pad, eos, unk = specials[:3]
    backend = _Backend(models.Unigram())
    backend.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=list(specials), unk_token=unk,
                                      show_progress=False)

    def finish() -> None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"$A:0 {eos}:0", pair=f"$A:0 {eos}:0 $B:1 {eos}:1", special_tokens=[(eos, backend.token_to_id(eos))])

    return backend, (trainer, finish), dict(eos_token=eos, unk_token=unk, pad_token=pad)


def _train(backend: _Backend, trainer_and_finish, files_or_iterator) -> None:
    """Run the trainer on files (read by the Rust side) or an iterable of texts, then set the
    post-processor (it needs the trained ids of the special tokens)."""
    trainer, finish = trainer_and_finish
    if isinstance(files_or_iterator, (str, os.PathLike)):
        files_or_iterator = [files_or_iterator]
    items = list(files_or_iterator) if isinstance(files_or_iterator, (list, tuple)) else files_or_iterator
    if isinstance(items, list) and items and all(_is_file(p) for p in items):
        backend.train([str(p) for p in items], trainer)
    else:
        backend.train_from_iterator(items, trainer)
    finish()


__all__ = ["Tokenizer", "TokenizerError", "train_bpe", "train_tokenizer", "TOKENIZER_MODELS", "byte_alphabet"]
