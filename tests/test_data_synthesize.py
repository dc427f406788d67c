"""``evolm data synthesize``: reproducible generation, batch independence, resume, cleaning, output as a source.

A tiny random Llama with a small BPE tokenizer (saved as an evolm folder) is the model; its
logits are sharpened so that greedy choices are far from ties. The references are independent of
the code under test: ``evolm.infer.generate_text`` one prompt at a time (the decoding loop the
parity tests hold equal to transformers), texts built by hand whose fate is known (an exact copy,
a copy with one word changed, a text too short for Gopher's word count), and ``data prepare`` /
``MixtureLoader`` reading the output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evolm.data.synthesize import SynthesisConfig, SynthesisError, clean, synthesize

TOPICS = ["the moon", "rivers", "bread", "kings", "stars"]
TEMPLATE = "A lesson about {topic}:"
WORDS = ("the king and the queen walk over the river to see the light of the moon with the "
         "children of the town that have bread").split()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    """An evolm folder with a tiny Llama (sharpened logits) and its BPE tokenizer; a topics file."""
    from evolm.loading import save
    from evolm.model import build
    from evolm.presets import get_preset
    from evolm.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("synth")
    text = [" ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(60)) for i in range(40)] + TOPICS
    tok = train_bpe(text, vocab_size=300, special_tokens=["<|endoftext|>"])
    torch.manual_seed(0)
    model = build(get_preset("tiny-llama").replace(vocab_size=len(tok)))
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # logits 20x apart: greedy choices far from ties
    save(model, root / "model", tokenizer=tok)
    (root / "topics.txt").write_text("\n".join(TOPICS) + "\n")
    return root


def _config(tiny: Path, out: Path, **kw) -> SynthesisConfig:
    base = dict(model=str(tiny / "model"), out=str(out), topics=str(tiny / "topics.txt"), template=TEMPLATE,
                n=2, max_new_tokens=12, temperature=1.0, top_p=0.9, seed=3, batch=3, filters="none")
    return SynthesisConfig(**{**base, **kw})


def _run(config: SynthesisConfig) -> dict:
    return synthesize(config, log=None)


def _generated(out: Path) -> dict:
    return {(r["i"], r["j"]): r["text"] for r in map(json.loads, (out / "generated.jsonl").read_text().splitlines())}


def test_same_seed_same_bytes_at_any_batch_size(tiny, tmp_path):
    """Sampled texts: the same seed gives the same bytes with --batch 1 and --batch 4 (each text
    has its own generator); another seed gives other texts."""
    a = _run(_config(tiny, tmp_path / "a", batch=1))
    _run(_config(tiny, tmp_path / "b", batch=4))
    _run(_config(tiny, tmp_path / "c", batch=4, seed=4))
    assert a["generated"]["texts"] == len(TOPICS) * 2 and a["generated"]["tokens"] > 0
    assert (tmp_path / "a/texts.jsonl").read_bytes() == (tmp_path / "b/texts.jsonl").read_bytes()
    assert _generated(tmp_path / "a") == _generated(tmp_path / "b")
    assert _generated(tmp_path / "a") != _generated(tmp_path / "c")
    assert a["tokens_per_s"] > 0 and a["sessions"][0]["batch"] == 1


def test_greedy_batched_equals_one_by_one_generation(tiny, tmp_path):
    """Greedy --batch 4 (continuous batching) = evolm's decoding loop run on each prompt alone."""
    from evolm.infer import SamplingParams, generate_text
    from evolm.infer.prepare import InferenceOptions, load_for_inference

    _run(_config(tiny, tmp_path / "g", batch=4, n=1, temperature=0.0, max_new_tokens=16))
    model, tok = load_for_inference(str(tiny / "model"), InferenceOptions(device="cpu", dtype="float32"))
    want = {(i, 0): generate_text(model, tok, TEMPLATE.format(topic=t), SamplingParams(max_new_tokens=16,
                                                                                       temperature=0))
            for i, t in enumerate(TOPICS)}
    assert _generated(tmp_path / "g") == want
    assert len(set(want.values())) > 1  # the prompts lead to different texts


def test_an_interrupted_run_continues_to_the_same_output(tiny, tmp_path):
    """generated.jsonl cut after two texts and in the middle of a third (a crash): the next run
    generates only the missing ones and ends with the bytes of an uninterrupted run."""
    full = tmp_path / "full"
    _run(_config(tiny, full))
    part = tmp_path / "part"
    _run(_config(tiny, part))
    lines = (part / "generated.jsonl").read_text().splitlines(keepends=True)
    (part / "generated.jsonl").write_text("".join(lines[:2]) + lines[2][:15])
    m = _run(_config(tiny, part, batch=2))
    assert m["sessions"][-1]["texts"] == len(TOPICS) * 2 - 2
    assert (part / "texts.jsonl").read_bytes() == (full / "texts.jsonl").read_bytes()
    # other generation settings in the same folder are refused, not mixed in
    with pytest.raises(SynthesisError, match="temperature"):
        _run(_config(tiny, part, temperature=0.5))


ESSAY = ("The river runs from the hills to the sea, and the people of the valley have built their homes along "
         "its banks for a thousand years. In spring the water rises with the melting snow, and the farmers watch "
         "it closely, because a flood can carry away a whole season of work. In summer the river is slow and warm, "
         "and children swim in the shallow pools while their parents mend the nets. The town keeps a record of "
         "every flood on a stone by the bridge, so that each generation can see how high the water came before "
         "them and learn to build a little higher than their grandparents did.")
OTHER = ("Bread is one of the oldest foods that people make. A baker mixes flour with water and salt, adds a "
         "little yeast, and leaves the dough to rise in a warm place. The yeast eats the sugars in the flour and "
         "gives off gas, which fills the dough with small bubbles. When the loaf goes into a hot oven, the bubbles "
         "grow and the crust turns brown. Good bread needs patience: a dough that has risen slowly has more flavour "
         "than one that was hurried, and bakers have known this for as long as there have been ovens to bake in.")


def _shingles(text: str, n: int = 5) -> set:
    words = " ".join(text.lower().split()).split(" ")
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def test_duplicates_filtered_and_truncated_texts_are_dropped_with_counts():
    """Gopher's rules, exact and near duplicates (the first of each kept), truncation: each dropped
    text is counted under its reason and the kept ones keep their order."""
    near = ESSAY.replace("thousand", "hundred")
    a, b = _shingles(ESSAY), _shingles(near)
    assert len(a & b) / len(a | b) > 0.85  # Jaccard of the 5-gram shingle sets: well past 0.8
    texts = [ESSAY, "  " + ESSAY.upper().replace(" ", "   "), near, "Too short to teach anything.", OTHER,
             OTHER + " And more."]
    records = [{"i": k, "j": 0, "text": t, "tokens": 10, "finish": "stop"} for k, t in enumerate(texts)]
    records[5]["finish"] = "length"
    config = SynthesisConfig(model="m", out="o", prompts="p", filters="gopher", drop_truncated=True)
    kept, dropped = clean(records, config)
    assert [r["i"] for _, r in kept] == [0, 4]
    assert kept[0][0].text == ESSAY + "\n"  # cleaned as every prepared document is
    assert dropped == {"truncated": 1, "filter:word_count": 1, "exact_duplicate": 1, "near_duplicate": 1}
    kept, dropped = clean(records, SynthesisConfig(model="m", out="o", prompts="p", filters="none",
                                                   exact_dedup=False, near_dedup=False))
    assert len(kept) == len(texts) and dropped == {}


def test_the_output_is_a_source_for_prepare_and_a_mixture(tiny, tmp_path):
    from evolm.data.mixture import MixtureLoader
    from evolm.data.prepare import prepare
    from evolm.tokenizer import Tokenizer

    m = _run(_config(tiny, tmp_path / "s", n=4, max_new_tokens=24))
    tok = Tokenizer.from_hf_dir(str(tiny / "model"))
    (tmp_path / "other.txt").write_text(" ".join(WORDS * 20))
    spec = {"sources": [{"name": "other", "path": str(tmp_path / "other.txt"), "filters": "none"},
                        {**m["source"], "filters": "none", "weight": 0.5}], "val_fraction": 0.2}
    man = prepare(spec, tok, tmp_path / "prepared", log=None, workers=1)
    src = man["sources"][m["source"]["name"]]
    assert src["docs"] == m["kept"]["texts"] == len(TOPICS) * 4 - m["dropped"]["exact_duplicate"] \
        - m["dropped"]["near_duplicate"]
    assert src["splits"]["train"]["tokens"] > 0
    x, y = MixtureLoader(tmp_path / "prepared", seq_len=8, batch_size=4, weights={"synthetic": 1.0}).next_batch()
    assert x.shape == (4, 8) and torch.equal(x[:, 1:], y[:, :-1])


def _cli(capsys, *argv) -> str:
    from evolm.cli import main

    with pytest.raises(SystemExit) as e:
        main(["data", "synthesize", *argv])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_clear_errors(tiny, tmp_path, capsys):
    model, out = str(tiny / "model"), str(tmp_path / "out")
    topics = tmp_path / "topics.jsonl"
    topics.write_text('{"topic": "rivers", "audience": "children"}\n{"topic": "stars"}\n')
    err = _cli(capsys, "--model", model, "--out", out, "--topics", str(topics), "--template",
               "Teach {audience} about {topic}.")
    assert f"{topics}:2" in err and "{audience}" in err
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    assert "no prompts" in _cli(capsys, "--model", model, "--out", out, "--prompts", str(empty))
    prompts = tmp_path / "p.txt"
    prompts.write_text("Tell a story.\n")
    assert "--top-p must be in (0, 1]" in _cli(capsys, "--model", model, "--out", out, "--prompts", str(prompts),
                                               "--top-p", "1.5")
    assert "--temperature must be a finite number >= 0" in _cli(capsys, "--model", model, "--out", out, "--prompts",
                                                                str(prompts), "--temperature", "-1")
    assert "--n must be an integer >= 1" in _cli(capsys, "--model", model, "--out", out, "--prompts", str(prompts),
                                                 "--n", "0")
    assert "names no field" in _cli(capsys, "--model", model, "--out", out, "--topics", str(topics),
                                    "--template", "Always the same.")
    assert "/nonexistent/model.gguf" in _cli(capsys, "--model", "/nonexistent/model.gguf", "--out", out,
                                             "--prompts", str(prompts))
    assert "no chat template" in _cli(capsys, "--model", model, "--out", out, "--prompts", str(prompts), "--chat")
    assert not (tmp_path / "out" / "generated.jsonl").exists()
