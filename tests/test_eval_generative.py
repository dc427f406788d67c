"""Generative evaluation: generate_until equal to lm-eval's HFLM on the same weights, GSM8K prompts
and answer extraction equal to lm-eval's own task code, and the lm-eval adapter end to end on a
generate_until task.

The reference model is a seeded tiny transformers Llama; evolm loads the very same weights from
its ``save_pretrained`` folder, and both sides share one BPE tokenizer (HF's fast tokenizer over
the same ``tokenizers`` object), so any difference is in the generation/eval code.
"""

from __future__ import annotations

import pytest
import torch

from evolm.eval import data as D
from evolm.eval.generation import generate_until, normalize_gen_kwargs, postprocess
from evolm.eval.generative import FLEXIBLE, GEN_TASKS, GSM8K_COT_SHOTS, MBPP_SHOTS, exact_match, regex_extract

transformers = pytest.importorskip("transformers")

needs_data = pytest.mark.skipif(not (D.default_data_dir() / ".done").is_file(),
                                reason="missing asset benchmark data (required; install: make eval-data)")
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_pair(folder, vocab: int = 320, layers: int = 2):
    """(evolm model, evolm tokenizer, HF model, HF tokenizer) with identical weights and vocabulary."""
    import evolm
    from evolm.tokenizer import train_bpe

    texts = [q + "\n" + a for q, a in GSM8K_COT_SHOTS] + [s["text"] + "\n" + s["code"] for s in MBPP_SHOTS]
    tok = train_bpe(texts * 4, vocab)
    eos = tok.eos_id
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=4096, initializer_range=0.1, bos_token_id=eos,
                                   eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.generation_config.pad_token_id = eos
    hf.save_pretrained(folder)
    tok.save(folder)
    model, etok = evolm.load(folder, dtype=torch.float32)
    hft = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"),
                                               bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                               pad_token="<|endoftext|>")
    return model, etok, hf, hft


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_pair(tmp_path_factory.mktemp("tiny"))


def _hflm(hf, hft, batch_size=4, max_length=None):
    pytest.importorskip("lm_eval")
    from lm_eval.models.huggingface import HFLM

    kw = {"max_length": max_length} if max_length else {}
    return HFLM(pretrained=hf, tokenizer=hft, batch_size=batch_size, **kw)


def _instances(reqs):
    from lm_eval.api.instance import Instance

    return [Instance(request_type="generate_until", doc={}, arguments=(c, kw), idx=i) for i, (c, kw) in enumerate(reqs)]


def test_generate_until_equals_hflm_with_stop_strings(tiny):
    """Batched greedy generation, left truncation, stop strings (which do fire) and EOS: same text."""
    model, tok, hf, hft = tiny
    lm = _hflm(hf, hft, batch_size=3, max_length=96)
    prompts = ["Q: There are 15 trees in the grove.\nA:", "Leah had 32 chocolates", "def f(x):\n    return",
               "Olivia has $23. She bought five bagels for $3 each. How much money does she have left? " * 4]
    free = generate_until(model, tok, [(p, {"until": [], "max_gen_toks": 24}) for p in prompts], batch_size=3,
                          max_length=96)
    reqs = [(p, {"until": [], "max_gen_toks": 24, "do_sample": False}) for p in prompts]
    # stop strings cut from the model's own free output, so they certainly occur
    reqs += [(p, {"until": [f[len(f) // 2:len(f) // 2 + 3], "zzz"], "max_gen_toks": 24}) for p, f in zip(prompts, free)
             if len(f) > 8]
    reqs += [(p, {"until": ["\n", f[-4:]], "max_gen_toks": 16}) for p, f in zip(prompts, free) if len(f) > 8]
    ref = lm.generate_until(_instances(reqs), disable_tqdm=True)
    ours = generate_until(model, tok, reqs, batch_size=3, max_length=96)
    assert ours == ref
    assert any(len(o) < len(f) for o, f in zip(ours[len(prompts):], free)), "no stop string fired"


def test_normalize_and_postprocess_follow_lm_eval():
    from lm_eval.models.utils import normalize_gen_kwargs as ref_norm
    from lm_eval.models.utils import postprocess_generated_text

    for kw in ({"until": ["Q:"], "do_sample": False}, {"until": "x", "max_gen_toks": 7, "temperature": 0.0},
               {"until": [], "do_sample": True, "temperature": 0.2, "top_p": 0.95, "max_gen_toks": 9}):
        ours, ref = normalize_gen_kwargs(kw), ref_norm(kw, 256)
        assert ours["max_gen_toks"] == ref["max_gen_toks"] and ours["until"] == ref["until"]
        assert ours["do_sample"] == bool(ref["do_sample"])
        assert ours["temperature"] == pytest.approx(ref.get("temperature", 0.0))
    for text in ("abc Q: def", "no stop", "x</s>yQ:z"):
        assert postprocess(text, ["Q:", "</s>"]) == postprocess_generated_text(text, ["Q:", "</s>"], None)


def test_gsm8k_answer_extraction_and_exact_match_equal_lm_eval_filters():
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    strict_cot = r"The answer is (\-?[0-9\.\,]+)."
    strict = r"#### (\-?[0-9\.\,]+)"
    resps = ["So she has 23 - 15 dollars left. The answer is 8.", "The answer is 1,234.\n", "#### 72", "I think $5.",
             "The answer is -3.5 apples", "no number here", "It is 12 or 13, maybe 14.", "#### 1,000.00",
             "costs $18 then 9 then The answer is $9."]
    for pat, group in ((strict_cot, 0), (strict, 0), (FLEXIBLE, -1)):
        ref = RegexFilter(regex_pattern=pat, group_select=group).apply([[r] for r in resps], [{}] * len(resps))
        assert [regex_extract(r, pat, group) for r in resps] == [x[0] for x in ref]
    ignore = [",", "\\$", "(?s).*#### ", "\\.$"]
    for pred, gold in (("8", "8"), ("1,234", "1234"), ("$9", "9"), ("5.", "5"), ("72", "Janet ... #### 72"),
                       ("[invalid]", "3"), ("A", "a")):
        want = exact_match_hf_evaluate([pred], [gold], regexes_to_ignore=ignore, ignore_case=True)["exact_match"]
        assert exact_match(pred, gold) == want


@needs_data
@pytest.mark.slow  # lm-eval's TaskManager indexes every task YAML first
def test_gsm8k_prompts_equal_lm_evals_task(tmp_path):
    """lm-eval's own gsm8k-cot / gsm8k tasks on the local rows build the same contexts and stops."""
    pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager, get_task_dict

    from evolm.eval.lm_eval_adapter import local_task_dir

    names = local_task_dir(tmp_path, tasks=["gsm8k_cot", "gsm8k"])
    tdict = get_task_dict(names, TaskManager(include_path=str(tmp_path)))
    for ours_name, lname, shots in (("gsm8k_cot", "local_gsm8k_cot", 8), ("gsm8k", "local_gsm8k", 0)):
        lt = tdict[lname]
        lt.set_config("num_fewshot", shots)
        task = GEN_TASKS[ours_name]
        docs = task.docs()[:5]
        ctxs = task.contexts(docs, shots, seed=1234)
        for d_ref, ctx in zip(list(lt.eval_docs)[:5], ctxs):
            req = lt.construct_requests(doc=d_ref, ctx=lt.fewshot_context(d_ref, shots), metadata=(lname, 0, 1))
            req = req[0] if isinstance(req, list) else req
            assert req.args[0] == ctx
            assert list(req.args[1]["until"]) == task.gen_kwargs["until"]


def test_mbpp_and_humaneval_prompts_follow_lm_evals_yaml():
    """The prompt templates of lm-eval's mbpp.yaml (rendered with jinja2 as lm-eval does) and humaneval.yaml."""
    import jinja2
    import lm_eval
    import yaml

    root = __import__("pathlib").Path(lm_eval.__file__).parent / "tasks"

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: None)
    cfg = yaml.load((root / "mbpp/mbpp.yaml").read_text(), Loader=Loader)
    env = jinja2.Environment(keep_trailing_newline=True)  # as lm_eval.utils renders templates
    doc = {"text": "Write a function to add.", "test_list": ["assert f(1)==2", "assert f(2)==3", "assert f(0)==1"]}
    task = GEN_TASKS["mbpp"]
    assert task.doc_to_text(doc) == env.from_string(cfg["doc_to_text"]).render(**doc)
    shot = {**MBPP_SHOTS[0], "is_fewshot": True}
    want = env.from_string(cfg["doc_to_text"]).render(**shot) + cfg["target_delimiter"] + \
        env.from_string(cfg["doc_to_target"]).render(**shot)
    assert task.shot_text(MBPP_SHOTS[0]) == want
    assert task.gen_kwargs["until"] == cfg["generation_kwargs"]["until"] and task.num_fewshot == cfg["num_fewshot"]
    he = yaml.load((root / "humaneval/humaneval.yaml").read_text(), Loader=Loader)
    assert GEN_TASKS["humaneval"].gen_kwargs["until"] == he["generation_kwargs"]["until"]
    assert GEN_TASKS["humaneval"].gen_kwargs["max_gen_toks"] == he["generation_kwargs"]["max_gen_toks"]


@needs_data
@pytest.mark.slow
def test_lm_eval_adapter_runs_gsm8k_cot_end_to_end_like_hflm(tiny, tmp_path):
    """`lm_eval` with model "evolm" on a generate_until task (gsm8k_cot, 3 docs) = lm-eval with HFLM,
    and our own harness gives the same generations and exact-match scores."""
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from evolm.eval.harness import evaluate
    from evolm.eval.lm_eval_adapter import EvolmLM, local_task_dir

    model, tok, hf, hft = tiny
    folder = tmp_path / "m"
    hf.save_pretrained(folder)
    tok.save(folder)
    names = local_task_dir(tmp_path / "tasks", tasks=["gsm8k_cot"])
    tm = TaskManager(include_path=str(tmp_path / "tasks"))
    gen = {"max_gen_toks": 24}
    runs = {}
    for label, lm in (("evolm", EvolmLM(path=str(folder), batch_size=2)), ("hf", _hflm(hf, hft, batch_size=2))):
        runs[label] = simple_evaluate(lm, tasks=names, limit=3, task_manager=tm, log_samples=True,
                                      gen_kwargs=gen, bootstrap_iters=0)
    # one sample record per (doc, filter): keep the first of each doc
    resp = {k: list({s["doc_id"]: s["resps"][0][0] for s in r["samples"]["local_gsm8k_cot"]}.values())
            for k, r in runs.items()}
    assert resp["evolm"] == resp["hf"] and len(resp["hf"]) == 3
    for m in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert runs["evolm"]["results"]["local_gsm8k_cot"][m] == runs["hf"]["results"]["local_gsm8k_cot"][m]
    # our harness with the task's gen kwargs overridden the same way
    import dataclasses

    task = GEN_TASKS["gsm8k_cot"]
    task = dataclasses.replace(task, gen_kwargs={**task.gen_kwargs, **gen})
    ours = evaluate(model, tok, [task], limit=3, batch_size=2, progress=False, out=tmp_path / "r.json")
    samples = [__import__("json").loads(line) for line in open(tmp_path / "r.json.gsm8k_cot.samples.jsonl")]
    by_doc = {s["doc_id"]: s["resps"][0][0] for s in runs["hf"]["samples"]["local_gsm8k_cot"]}
    assert [s["responses"][0] for s in samples] == [by_doc[i] for i in range(3)]
    for m in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert ours["results"]["gsm8k_cot"][m] == runs["hf"]["results"]["local_gsm8k_cot"][m]
