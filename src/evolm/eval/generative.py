"""Generative benchmarks: GSM8K (chain-of-thought, exact match) and HumanEval / MBPP (pass@k).

Prompts, stop strings, answer extraction and metrics are lm-evaluation-harness' task YAMLs
(``lm_eval/tasks/gsm8k``, ``humaneval``, ``mbpp``), rewritten:

- **gsm8k_cot** (Wei et al. 2022, "Chain-of-thought prompting elicits reasoning"): the 8 fixed
  exemplars of the paper, ``"Q: ...\\nA: <reasoning>. The answer is N."``; stop at ``"Q:"``;
  *strict-match* takes ``The answer is (\\-?[0-9\\.\\,]+).``, *flexible-extract* the last number;
  ``exact_match`` after removing ``,`` ``$`` and a trailing ``.`` and lower-casing (lm-eval's
  ``regexes_to_ignore``).
- **gsm8k**: 5-shot ``"Question: ...\\nAnswer: <solution> #### N"``, strict ``#### N``. lm-eval
  draws the shots from the *train* split, which the offline data lacks: we draw them from the
  test split with a fixed seed, never the scored problem (the results' config says so).
- **humaneval** (Chen et al. 2021, "Evaluating LLMs trained on code"): the prompt is the function
  signature + docstring; generation stops at a new top-level ``class``/``def``/``#``/``if``/
  ``print``; ``prompt + completion`` runs in the sandbox (``sandbox.py``, 3 s) and passes if
  ``test + check(entry_point)``, run apart by the sandbox against it, finishes. ``humaneval_64``:
  64 samples at T=0.2, top-p 0.95, pass@{1,2,8,16,32,64}.
- **mbpp** (Austin et al. 2021): lm-eval's 3-shot ``[BEGIN] ... [DONE]`` prompt; the completion
  plus the three asserts must run.

pass@k is the unbiased estimator of Chen et al. (2021, eq. 1): with ``n`` samples of which ``c``
pass, ``pass@k = 1 - C(n-c, k) / C(n, k)``, averaged over problems.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from . import data as D

# ---- GSM8K ------------------------------------------------------------------------------------
# The 8 chain-of-thought exemplars (Wei et al. 2022, table 20), as lm-eval's gsm8k-cot.yaml has them.
GSM8K_COT_SHOTS = [
    ("There are 15 trees in the grove. Grove workers will plant trees in the grove today. After they are "
     "done, there will be 21 trees. How many trees did the grove workers plant today?",
     "There are 15 trees originally. Then there were 21 trees after some more were planted. So there must "
     "have been 21 - 15 = 6. The answer is 6."),
    ("If there are 3 cars in the parking lot and 2 more cars arrive, how many cars are in the parking lot?",
     "There are originally 3 cars. 2 more cars arrive. 3 + 2 = 5. The answer is 5."),
    ("Leah had 32 chocolates and her sister had 42. If they ate 35, how many pieces do they have left in "
     "total?",
     "Originally, Leah had 32 chocolates. Her sister had 42. So in total they had 32 + 42 = 74. After "
     "eating 35, they had 74 - 35 = 39. The answer is 39."),
    ("Jason had 20 lollipops. He gave Denny some lollipops. Now Jason has 12 lollipops. How many lollipops "
     "did Jason give to Denny?",
     "Jason started with 20 lollipops. Then he had 12 after giving some to Denny. So he gave Denny "
     "20 - 12 = 8. The answer is 8."),
    ("Shawn has five toys. For Christmas, he got two toys each from his mom and dad. How many toys does he "
     "have now?",
     "Shawn started with 5 toys. If he got 2 toys each from his mom and dad, then that is 4 more toys. "
     "5 + 4 = 9. The answer is 9."),
    ("There were nine computers in the server room. Five more computers were installed each day, from "
     "monday to thursday. How many computers are now in the server room?",
     "There were originally 9 computers. For each of 4 days, 5 more computers were added. So 5 * 4 = 20 "
     "computers were added. 9 + 20 is 29. The answer is 29."),
    ("Michael had 58 golf balls. On tuesday, he lost 23 golf balls. On wednesday, he lost 2 more. How many "
     "golf balls did he have at the end of wednesday?",
     "Michael started with 58 golf balls. After losing 23 on tuesday, he had 58 - 23 = 35. After losing 2 "
     "more, he had 35 - 2 = 33 golf balls. The answer is 33."),
    ("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
     "Olivia had 23 dollars. 5 bagels for 3 dollars each will be 5 x 3 = 15 dollars. So she has 23 - 15 "
     "dollars left. 23 - 15 is 8. The answer is 8."),
]
GSM8K_IGNORE = [",", "\\$", "(?s).*#### ", "\\.$"]
FLEXIBLE = r"(-?[$0-9.,]{2,})|(-?[0-9]+)"


def regex_extract(text: str, pattern: str, group_select: int = 0, fallback: str = "[invalid]") -> str:
    """lm-eval's ``regex`` filter: the ``group_select``-th match; of a multi-group match the first
    non-empty group; stripped; ``fallback`` when nothing matches."""
    matches = re.findall(pattern, text)
    if not matches:
        return fallback
    m = matches[group_select]
    if isinstance(m, tuple):
        m = next((g for g in m if g), fallback)
    return m.strip()


def exact_match(pred: str, ref: str, ignore: list[str] = GSM8K_IGNORE, ignore_case: bool = True) -> float:
    """lm-eval's ``exact_match`` (HF ``evaluate`` semantics): strip ``ignore`` regexes from both sides."""
    for r in ignore:
        pred, ref = re.sub(r, "", pred), re.sub(r, "", ref)
    if ignore_case:
        pred, ref = pred.lower(), ref.lower()
    return float(pred == ref)


# ---- pass@k -------------------------------------------------------------------------------------
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct (Chen et al. 2021, eq. 1).

    ``1 - C(n-c, k) / C(n, k)`` written as a product so it never forms huge binomials:
    ``C(n-c, k)/C(n, k) = prod_{i=n-c+1}^{n} (1 - k/i)``.
    """
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


# ---- task definitions ---------------------------------------------------------------------------
@dataclass
class GenTask:
    """One generate-until benchmark: prompt construction, generation settings and scoring."""

    name: str
    dataset: str
    split: str
    doc_to_text: Callable[[dict], str]
    score: Callable[["GenTask", list[dict], list[list[str]]], dict]
    gen_kwargs: dict
    num_fewshot: int = 0
    shots: list[dict] | None = None  # fixed exemplars (lm-eval's first_n samples)
    shot_text: Callable[[dict], str] | None = None  # exemplar -> prompt + target
    fewshot_delimiter: str = "\n\n"
    repeats: int = 1
    ks: tuple[int, ...] = (1,)
    timeout: float = 3.0
    note: str = ""
    output_type: str = "generate_until"
    extra: dict = field(default_factory=dict)

    def docs(self, data_dir=None) -> list[dict]:
        return D.load(self.dataset, self.split, data_dir)

    def contexts(self, docs: list[dict], shots: int | None, seed: int, data_dir=None) -> list[str]:
        """Few-shot prefix + prompt per document (fixed exemplars, or a seeded draw from the split)."""
        k = self.num_fewshot if shots is None else shots
        if k <= 0:
            return [self.doc_to_text(d) for d in docs]
        if self.shots is not None:
            if k > len(self.shots):
                raise ValueError(f"{self.name}: {k} shots asked, only {len(self.shots)} exemplars defined")
            prefix = "".join(self.shot_text(s) + self.fewshot_delimiter for s in self.shots[:k])
            return [prefix + self.doc_to_text(d) for d in docs]
        rng = random.Random(seed)
        pool = self.docs(data_dir)
        out = []
        for d in docs:
            ex = [e for e in rng.sample(pool, min(len(pool), k + 1)) if e != d][:k]
            out.append("".join(self.shot_text(e) + self.fewshot_delimiter for e in ex) + self.doc_to_text(d))
        return out


def _score_gsm8k(strict: str, target: Callable[[dict], str]):
    def score(task: GenTask, docs: list[dict], resps: list[list[str]]) -> dict:
        out: dict = {}
        for fname, pat, group in (("strict-match", strict, 0), ("flexible-extract", FLEXIBLE, -1)):
            em = [exact_match(regex_extract(r[0], pat, group), target(d)) for d, r in zip(docs, resps)]
            out[f"exact_match,{fname}"] = float(np.mean(em))
            out[f"exact_match_stderr,{fname}"] = _stderr(em)
        return out
    return score


def humaneval_parts(doc: dict, completion: str) -> tuple[str, str]:
    """The program (prompt + completion) and its tests (the test code, then ``check(entry_point)``):
    the sandbox runs the tests apart from the program, so the program cannot forge the verdict."""
    return doc["prompt"] + completion, doc["test"] + "\n" + f"check({doc['entry_point']})"


def mbpp_parts(doc: dict, completion: str) -> tuple[str, str]:
    return completion, "\n".join(doc["test_list"][:3])


def humaneval_program(doc: dict, completion: str) -> str:
    """What lm-eval's code_eval runs, as one program: prompt + completion, tests, ``check(entry_point)``."""
    return "\n".join(humaneval_parts(doc, completion))


def mbpp_program(doc: dict, completion: str) -> str:
    return "\n".join(mbpp_parts(doc, completion))


def _score_code(program: Callable[[dict, str], tuple[str, str]]):
    def score(task: GenTask, docs: list[dict], resps: list[list[str]], workers: int = 4) -> dict:
        from .sandbox import run_programs

        codes = [program(d, r) for d, rs in zip(docs, resps) for r in rs]
        results = run_programs(codes, timeout=task.timeout, workers=workers)
        out: dict = {}
        n = len(resps[0]) if resps else 0
        correct, pos = [], 0
        for rs in resps:
            correct.append(sum(r.passed for r in results[pos:pos + len(rs)]))
            pos += len(rs)
        for k in task.ks:
            if k <= n:
                vals = [pass_at_k(n, c, k) for c in correct]
                out[f"pass@{k}"] = float(np.mean(vals))
                out[f"pass@{k}_stderr"] = _stderr(vals)
        out["n_samples_per_problem"] = n
        out["_details"] = [{"correct": c, "n": n} for c in correct]
        return out
    return score


def _stderr(xs) -> float:
    n = len(xs)
    return float(np.std(np.asarray(xs, dtype=float), ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


def _mbpp_text(d: dict) -> str:
    t = d["test_list"]
    return (f"You are an expert Python programmer, and here is your task: {d['text']} Your code should pass "
            f"these tests:\n\n{t[0]}\n{t[1]}\n{t[2]}\n[BEGIN]\n")


# lm-eval's mbpp few-shot samples (task ids 2, 3, 4 of the MBPP prompt split)
MBPP_SHOTS = [
    {"text": "Write a function to find the similar elements from the given two tuple lists.",
     "code": "def similar_elements(test_tup1, test_tup2):\r\n  res = tuple(set(test_tup1) & set(test_tup2))\r\n"
             "  return (res) ",
     "test_list": ["assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)",
                   "assert similar_elements((1, 2, 3, 4),(5, 4, 3, 7)) == (3, 4)",
                   "assert similar_elements((11, 12, 14, 13),(17, 15, 14, 13)) == (13, 14)"]},
    {"text": "Write a python function to identify non-prime numbers.",
     "code": "import math\r\ndef is_not_prime(n):\r\n    result = False\r\n    for i in range(2,int(math.sqrt(n)) + 1):"
             "\r\n        if n % i == 0:\r\n            result = True\r\n    return result",
     "test_list": ["assert is_not_prime(2) == False", "assert is_not_prime(10) == True",
                   "assert is_not_prime(35) == True"]},
    {"text": "Write a function to find the largest integers from a given list of numbers using heap queue algorithm.",
     "code": "import heapq as hq\r\ndef heap_queue_largest(nums,n):\r\n  largest_nums = hq.nlargest(n, nums)\r\n"
             "  return largest_nums",
     "test_list": ["assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],3)==[85, 75, 65] ",
                   "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],2)==[85, 75] ",
                   "assert heap_queue_largest( [25, 35, 22, 85, 14, 65, 75, 22, 58],5)==[85, 75, 65, 58, 35]"]},
]

HUMANEVAL_STOP = ["\nclass", "\ndef", "\n#", "\nif", "\nprint"]

GEN_TASKS: dict[str, GenTask] = {
    "gsm8k_cot": GenTask(
        "gsm8k_cot", "gsm8k", "test", doc_to_text=lambda d: f"Q: {d['question']}\nA:",
        score=_score_gsm8k(r"The answer is (\-?[0-9\.\,]+).", lambda d: d["answer"].split("####")[-1].strip()),
        gen_kwargs={"until": ["Q:", "</s>", "<|im_end|>"], "do_sample": False},
        num_fewshot=8, shots=[{"question": q, "target": a} for q, a in GSM8K_COT_SHOTS],
        shot_text=lambda s: f"Q: {s['question']}\nA: {s['target']}"),
    "gsm8k": GenTask(
        "gsm8k", "gsm8k", "test", doc_to_text=lambda d: f"Question: {d['question']}\nAnswer:",
        score=_score_gsm8k(r"#### (\-?[0-9\.\,]+)", lambda d: d["answer"]),
        gen_kwargs={"until": ["Question:", "</s>", "<|im_end|>"], "do_sample": False, "temperature": 0.0},
        num_fewshot=5, shot_text=lambda s: f"Question: {s['question']}\nAnswer: {s['answer']}",
        note="few-shot examples drawn from the test split (seeded, never the scored problem): "
             "the offline data has no train split"),
    "humaneval": GenTask(
        "humaneval", "humaneval", "test", doc_to_text=lambda d: d["prompt"], score=_score_code(humaneval_parts),
        gen_kwargs={"until": HUMANEVAL_STOP, "max_gen_toks": 1024, "do_sample": False}),
    "humaneval_64": GenTask(
        "humaneval_64", "humaneval", "test", doc_to_text=lambda d: d["prompt"],
        score=_score_code(humaneval_parts), repeats=64, ks=(1, 2, 8, 16, 32, 64),
        gen_kwargs={"until": HUMANEVAL_STOP, "max_gen_toks": 1024, "do_sample": True, "temperature": 0.2,
                    "top_p": 0.95}),
    "mbpp": GenTask(
        "mbpp", "mbpp", "test", doc_to_text=_mbpp_text, score=_score_code(mbpp_parts),
        gen_kwargs={"until": ["[DONE]"], "do_sample": False}, num_fewshot=3, shots=MBPP_SHOTS,
        shot_text=lambda s: _mbpp_text(s) + s["code"] + "\n[DONE]"),
}


def with_samples(task: GenTask, n: int, temperature: float = 0.8, top_p: float = 0.95) -> GenTask:
    """A code task drawing ``n`` samples per problem (pass@k for every k <= n among 1, 10, 100)."""
    import dataclasses

    kw = {**task.gen_kwargs, "do_sample": True, "temperature": temperature, "top_p": top_p}
    ks = tuple(sorted({k for k in (1, 10, 100, *task.ks) if k <= n}))
    return dataclasses.replace(task, name=f"{task.name}@{n}", repeats=n, ks=ks, gen_kwargs=kw)
