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
    "natural_instructions": "SFT: BIG-bench natural_instructions (instruction + input -> target), chat rows",
    "hhh_alignment": "DPO: BIG-bench hhh_alignment, 221 human preference pairs (prompt/chosen/rejected)",
    "openai_evals": "SFT: chat samples from the OpenAI evals registry (input messages -> ideal answer)",
}


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
    """A JSONL path, or a built-in set's split file (``natural_instructions`` -> .../train.jsonl)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    name = str(name_or_path)
    if name in BUILTIN:
        f = Path(data_dir or default_data_dir()) / name / f"{split}.jsonl"
        if not f.is_file():
            raise DataError(f"built-in data set {name!r} is not installed ({f} missing); run "
                            f"`python scripts/install_post_data.py` (or `make post-data`)")
        return f
    if p.is_dir():
        raise DataError(f"{p}: is a folder; pass a .jsonl file or a built-in name ({', '.join(BUILTIN)})")
    raise DataError(f"{name}: no such data file, and not a built-in set (built-in: {', '.join(BUILTIN)})")


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
    """Read and validate preference rows from a JSONL file or a built-in set (hhh_alignment)."""
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
BIGBENCH_REQ = "bigbench==1.0.0"
BIGBENCH_SDIST = "bigbench-1.0.0.tar.gz"
NI_PER_TASK = (50, 4)  # natural_instructions: (train, val) examples per subtask
NI_MAX_CHARS = 2500  # prompt + answer; keeps rows within ~700 tokens
HHH_VAL_EVERY = 4  # about 1 prompt in 4 is held out (split by prompt, not by pair)
INSTALL_VERSION = 1
EVALS_REQ = "evals==3.0.1.post1"
EVALS_WHEEL = "evals-3.0.1.post1-py3-none-any.whl"
EVALS_PER_FILE = (5, 1)  # openai_evals: (train, val) samples per registry data file
EVALS_SCAN = 40  # candidate lines read from the top of each file


def _key(*parts: str) -> str:
    import hashlib

    return hashlib.sha1("\x1f".join(parts).encode("utf-8")).hexdigest()


def hhh_rows(task: dict, subset: str) -> list[dict]:
    """BIG-bench hhh_alignment examples -> prompt/chosen/rejected rows.

    Each example is a prompt with two responses scored 1 (better) and 0 (worse). Inputs that hold
    a dialogue (``...\\n\\nAssistant: ...\\n\\nHuman: ...``) become message lists.
    """
    import re

    rows = []
    for ex in task["examples"]:
        scores = ex["target_scores"]
        good = [t for t, s in scores.items() if s == 1]
        bad = [t for t, s in scores.items() if s == 0]
        if len(good) != 1 or len(bad) != 1:
            raise DataError(f"hhh_alignment/{subset}: expected one response scored 1 and one scored 0, got {scores}")
        parts = re.split(r"\n+\s*(Human|Assistant):\s*", ex["input"].strip())
        if len(parts) == 1:
            prompt: Any = parts[0].strip()
        else:
            prompt = [{"role": "user", "content": parts[0].strip()}]
            for who, text in zip(parts[1::2], parts[2::2]):
                prompt.append({"role": "user" if who == "Human" else "assistant", "content": text.strip()})
        rows.append({"prompt": prompt, "chosen": good[0].strip(), "rejected": bad[0].strip(), "subset": subset})
    return rows


def natural_instruction_rows(task: dict, name: str) -> list[dict]:
    """One BIG-bench natural_instructions subtask -> chat rows (definition + input -> first target)."""
    prefix = (task.get("task_prefix") or task.get("description") or "").strip()
    rows = []
    for ex in task["examples"]:
        target = ex.get("target")
        if isinstance(target, list):
            target = next((t for t in target if isinstance(t, str) and t.strip()), None)
        inp = ex.get("input")
        if not isinstance(target, str) or not target.strip() or not isinstance(inp, str) or not inp.strip():
            continue
        user = f"{prefix}\n\n{inp.strip()}" if prefix else inp.strip()
        if len(user) + len(target) > NI_MAX_CHARS:
            continue
        rows.append({"messages": [{"role": "user", "content": user},
                                  {"role": "assistant", "content": target.strip()}], "task": name})
    return rows


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
        if msgs[-1]["role"] == "assistant" or sum(len(m["content"]) for m in msgs) + len(ideal) > NI_MAX_CHARS:
            continue
        rows.append({"messages": msgs + [{"role": "assistant", "content": ideal.strip()}], "eval": name})
    return rows


def find_evals_wheel(download_dir: Path) -> tuple[Path, bool]:
    """(path, downloaded_here): ``$EVOLM_EVALS_WHEEL``, else ``pip download --no-deps`` the wheel."""
    import subprocess
    import sys

    env = os.environ.get("EVOLM_EVALS_WHEEL")
    if env:
        return Path(env), False
    path = download_dir / EVALS_WHEEL
    if not path.is_file():
        download_dir.mkdir(parents=True, exist_ok=True)
        subprocess.check_call([sys.executable, "-m", "pip", "download", "-q", "--no-deps", EVALS_REQ,
                               "-d", str(download_dir)])
    return path, True


def install_openai_evals(data_dir: Path, wheel: str | os.PathLike | None = None, keep: bool = False,
                         log=print) -> dict:
    """``openai_evals/{train,val}.jsonl``: a fixed sample of the chat samples in the evals wheel
    (read with ``zipfile``; the package is never installed)."""
    import tempfile
    import zipfile

    downloaded = False
    if wheel is None:
        wheel, downloaded = find_evals_wheel(Path(tempfile.gettempdir()) / "evolm-evals")
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
    if downloaded and not keep:
        wheel.unlink(missing_ok=True)
    return {"train": len(train), "val": len(val)}


def _split_natural_instructions(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """A fixed subset: per subtask, order rows by a content hash; the first few are held out."""
    n_train, n_val = NI_PER_TASK
    rows = sorted(rows, key=lambda r: _key(r["messages"][0]["content"], r["messages"][1]["content"]))
    seen, uniq = set(), []
    for r in rows:  # duplicate prompts would leak between the splits
        k = r["messages"][0]["content"]
        if k not in seen:
            seen.add(k)
            uniq.append(r)
    return uniq[n_val:n_val + n_train], uniq[:n_val]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def find_bigbench_sdist(download_dir: Path) -> tuple[Path, bool]:
    """(path, downloaded_here): ``$EVOLM_BIGBENCH_SDIST``, else ``pip download --no-deps`` the sdist
    (never installed: only its task files are read)."""
    import subprocess
    import sys

    env = os.environ.get("EVOLM_BIGBENCH_SDIST")
    if env:
        return Path(env), False
    path = download_dir / BIGBENCH_SDIST
    if not path.is_file():
        download_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               BIGBENCH_REQ, "-d", str(download_dir)]
        subprocess.check_call(cmd)
    return path, True


def install_post_data(data_dir: str | os.PathLike | None = None, sdist: str | os.PathLike | None = None,
                      force: bool = False, keep_sdist: bool = False, log=print, evals: bool = True,
                      evals_wheel: str | os.PathLike | None = None) -> Path:
    """Write ``natural_instructions/``, ``hhh_alignment/`` (and ``openai_evals/``) ``{train,val}.jsonl``.

    The BIG-bench sdist (358 MB) is read as a stream (``tarfile`` mode ``r|gz``): only the
    ``hhh_alignment`` and ``natural_instructions`` task files are parsed, nothing is unpacked to
    disk. Idempotent: a stamp per source (``.bigbench.done``, ``.openai_evals.done``) makes a
    second call return at once.
    """
    import tarfile
    import tempfile

    data_dir = Path(data_dir or default_data_dir())

    def done(stamp: Path) -> bool:
        return not force and stamp.is_file() and json.loads(stamp.read_text()).get("version") == INSTALL_VERSION

    bb_stamp, ev_stamp = data_dir / ".bigbench.done", data_dir / ".openai_evals.done"
    if not done(bb_stamp):
        downloaded = False
        if sdist is None:
            sdist, downloaded = find_bigbench_sdist(Path(tempfile.gettempdir()) / "evolm-bigbench")
        sdist = Path(sdist)
        if not sdist.is_file():
            raise DataError(f"{sdist}: no such BIG-bench sdist")
        log(f"reading BIG-bench task files from {sdist} ({sdist.stat().st_size / 1e6:.0f} MB, streamed)")
        hhh: list[dict] = []
        ni_train: list[dict] = []
        ni_val: list[dict] = []
        n_tasks = 0
        with tarfile.open(sdist, mode="r|gz") as tar:
            for m in tar:
                parts = m.name.split("/")
                if not m.isfile() or parts[-1] != "task.json" or "benchmark_tasks" not in parts:
                    continue
                i = parts.index("benchmark_tasks")
                rel = parts[i + 1:-1]
                if len(rel) != 2 or rel[0] not in ("hhh_alignment", "natural_instructions"):
                    continue
                task = json.load(tar.extractfile(m))
                if rel[0] == "hhh_alignment":
                    hhh += hhh_rows(task, rel[1])
                else:
                    tr, va = _split_natural_instructions(natural_instruction_rows(task, rel[1]))
                    ni_train += tr
                    ni_val += va
                    n_tasks += 1
        if not hhh or not ni_train:
            raise DataError(f"{sdist}: no hhh_alignment / natural_instructions task files; is it bigbench-1.0.0?")
        order = lambda rows: sorted(rows, key=lambda r: (r["task"], _key(json.dumps(r["messages"]))))  # noqa: E731
        _write_jsonl(data_dir / "natural_instructions" / "train.jsonl", order(ni_train))
        _write_jsonl(data_dir / "natural_instructions" / "val.jsonl", order(ni_val))
        held = lambda r: int(_key(json.dumps(r["prompt"]))[:8], 16) % HHH_VAL_EVERY == 0  # noqa: E731
        train, val = [r for r in hhh if not held(r)], [r for r in hhh if held(r)]
        _write_jsonl(data_dir / "hhh_alignment" / "train.jsonl", train)
        _write_jsonl(data_dir / "hhh_alignment" / "val.jsonl", val)
        counts = {"natural_instructions": {"train": len(ni_train), "val": len(ni_val), "subtasks": n_tasks},
                  "hhh_alignment": {"train": len(train), "val": len(val), "pairs": len(hhh)}}
        bb_stamp.write_text(json.dumps({"version": INSTALL_VERSION, "source": BIGBENCH_REQ, "counts": counts},
                                       indent=2))
        if downloaded and not keep_sdist:
            sdist.unlink(missing_ok=True)
        log(f"BIG-bench sets in {data_dir}: {json.dumps(counts)}")
    if evals and not done(ev_stamp):
        counts = install_openai_evals(data_dir, evals_wheel, keep_sdist, log)
        ev_stamp.write_text(json.dumps({"version": INSTALL_VERSION, "source": EVALS_REQ,
                                        "counts": {"openai_evals": counts}}, indent=2))
        log(f"openai_evals in {data_dir}: {json.dumps(counts)}")
    return data_dir
