"""Hostile and damaged model files, configs, tokenizers, recipes and data specs: each loader either
loads or raises its kind's error naming the file; never another exception, a hang or unbounded memory.

The fuzz cases come from ``benchmarks/fuzz_loaders.py`` (a seeded, shorter run here: every case in a
worker process under an address-space limit and a time limit); the targeted tests replay the
attacks reported in issue 34, each of which used to end in a traceback, a hang or gigabytes.
"""

from __future__ import annotations

import importlib.util
import json
import random
import struct
import time
from pathlib import Path

import pytest

pytest.importorskip("gguf")
pytest.importorskip("transformers")

from evolm.config import ConfigError  # noqa: E402
from evolm.data.prepare import load_spec  # noqa: E402
from evolm.data.sources import DataError  # noqa: E402
from evolm.interop.empty import WeightsError, allow_large_models  # noqa: E402
from evolm.interop.gguf import GGUFError, load_gguf  # noqa: E402
from evolm.loading import load  # noqa: E402
from evolm.tokenizer import Tokenizer, TokenizerError  # noqa: E402
from evolm.train.recipe import RecipeError, load_recipe  # noqa: E402

_ENGINE = Path(__file__).parents[1] / "benchmarks" / "fuzz_loaders.py"  # one set of cases for both
_spec = importlib.util.spec_from_file_location("fuzz_loaders", _ENGINE)
fuzz_loaders = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz_loaders)

CASES_PER_KIND = 100  # 700 cases, ~8 s on one core (worker start and seed files included)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz-seeds")
    return fuzz_loaders.make_seeds(folder, random.Random(0)), folder


def test_fuzzed_inputs_load_or_raise_their_error(tmp_path):
    t0 = time.perf_counter()
    result = fuzz_loaders.fuzz(CASES_PER_KIND, seed=34, mem_mb=2048, timeout=30.0, work=tmp_path)
    print(f"\n{fuzz_loaders.table(result)}\n({time.perf_counter() - t0:.1f} s)")
    bad = {k: v[:3] for k, v in result["bad"].items() if v}
    assert not bad, f"cases that neither loaded nor raised their kind's error naming the file: {bad}"
    for kind, counts in result["counts"].items():
        assert counts["clear error"] > CASES_PER_KIND // 4, f"{kind}: the mutations hardly ever broke the file"


def test_valid_seed_files_load(seeds):
    files, _ = seeds
    for kind in fuzz_loaders.KINDS:
        target = files[kind] if kind in ("gguf", "recipe", "data-spec") else files[kind].parent
        fuzz_loaders.load_case(kind, str(target))  # unmutated: loads


# ----------------------------------------------------------------------------------------------
# GGUF: the header's counts, lengths and sizes are checked before they are trusted
# ----------------------------------------------------------------------------------------------
def _gguf_with(tmp_path, key, kind, value):
    path = tmp_path / "m.gguf"
    fuzz_loaders.write_gguf(path, fuzz_loaders._gguf_tensors(random.Random(0)), (key, kind, value))
    return path


@pytest.mark.parametrize("key,kind,value,says", [
    ("llama.block_count", "u64", 10**9, "n_layers"),
    ("llama.block_count", "u32", 3, "asks for 3 layers but the weights hold 2"),
    ("llama.attention.head_count", "u32", 0, "'llama.attention.head_count' is 0; expected a positive integer"),
    ("llama.feed_forward_length", "str", "x", "'llama.feed_forward_length' is 'x'"),
    ("llama.attention.layer_norm_rms_epsilon", "f32", float("nan"), "layer_norm_rms_epsilon"),
    ("general.alignment", "str", "", "'general.alignment' is ''"),
    ("tokenizer.ggml.tokens", "array", [1, 2], "'tokenizer.ggml.tokens' is \\[1, 2\\]"),
    ("tokenizer.ggml.bos_token_id", "u32", 2**32 - 1, "bos_token_id"),
])
def test_gguf_metadata_values_are_checked(tmp_path, key, kind, value, says):
    path = _gguf_with(tmp_path, key, kind, value)
    t0 = time.perf_counter()
    with pytest.raises(GGUFError, match=says) as e:
        load_gguf(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)
    assert time.perf_counter() - t0 < 10


def test_gguf_string_array_length_past_the_file_end(seeds, tmp_path):
    """``_Cursor._strings`` used to unpack without bounds checks: struct.error / OverflowError."""
    data = bytearray(seeds[0]["gguf"].read_bytes())
    token_list = data.find(b"tokenizer.ggml.tokens")
    # after the key: value type (4 bytes, ARRAY), item type (4), count (8), then the first string's length
    first_len = token_list + len(b"tokenizer.ggml.tokens") + 16
    for value in (2**63, 2**64 - 1, len(data)):
        struct.pack_into("<Q", data, first_len, value)
        bad = tmp_path / "strings.gguf"
        bad.write_bytes(bytes(data))
        with pytest.raises(GGUFError, match="truncated inside a string array"):
            load_gguf(bad)
        with pytest.raises(GGUFError, match="truncated inside a string array"):
            load_gguf(bad, tokenizer=False)  # skipped, still bounds-checked


def test_gguf_counts_and_tensor_info_are_bounded(seeds, tmp_path):
    data = seeds[0]["gguf"].read_bytes()
    bad = tmp_path / "b.gguf"
    for offset, value, says in ((8, 2**40, "tensor count is"), (16, 2**63, "metadata key count is")):
        b = bytearray(data)
        struct.pack_into("<Q", b, offset, value)
        bad.write_bytes(bytes(b))
        with pytest.raises(GGUFError, match=says):
            load_gguf(bad)
    # the dims of a tensor: absurd sizes must fit in the file, the dimension count is at most 4
    fields = fuzz_loaders._gguf_fields(data)
    n_dims_at = [pos for pos, fmt in fields if fmt == "<I" and struct.unpack_from("<I", data, pos)[0] == 2
                 and data[pos - 6:pos] == b"weight"]
    for patch, says in (((n_dims_at[0] + 4, "<Q", 2**62), "runs past the end of the file|row length"),
                        ((n_dims_at[0], "<I", 200), "200 dimensions")):
        b = bytearray(data)
        struct.pack_into(patch[1], b, patch[0], patch[2])
        bad.write_bytes(bytes(b))
        with pytest.raises(GGUFError, match=says):
            load_gguf(bad)


# ----------------------------------------------------------------------------------------------
# config.json: types and sizes checked, the parameter count compared with memory before building
# ----------------------------------------------------------------------------------------------
def _hf_folder_with(seeds, tmp_path, **changes):
    import shutil

    folder = tmp_path / "hf"
    shutil.copytree(seeds[0]["hf-config"].parent, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("changes,says", [
    ({"num_hidden_layers": 2**62}, "num_hidden_layers is 4611686018427387904; expected an integer from 1 to 4096"),
    ({"num_attention_heads": 0}, "num_attention_heads is 0"),
    ({"hidden_size": "64"}, "hidden_size is '64'"),
    ({"rms_norm_eps": None}, "rms_norm_eps"),
    ({"rope_scaling": [1, "x"]}, "rope_scaling is \\[1, 'x'\\]; expected an object"),
    ({"model_type": ["llama"]}, "model_type is \\['llama'\\]"),
])
def test_hf_config_values_are_checked(seeds, tmp_path, changes, says):
    folder = _hf_folder_with(seeds, tmp_path, **changes)
    with pytest.raises(ConfigError, match=says) as e:
        load(folder)
    assert str(folder / "config.json") in str(e.value)


def test_implied_size_is_compared_with_memory_and_the_cap_lifts(seeds, tmp_path):
    folder = _hf_folder_with(seeds, tmp_path, intermediate_size=10**9)  # ~0.2 T parameters, ~768 GB
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="more than this machine's .* GiB.*allow_large=True"):
        load(folder)
    assert time.perf_counter() - t0 < 10
    # lifted (a real model this large): the size is trusted, and the weights, which do not match, say so
    with pytest.raises(WeightsError, match="do not fit the config|do not match"):
        load(folder, allow_large=True)
    allow_large_models(True)  # what `evolm --allow-large` / EVOLM_ALLOW_LARGE=1 set
    try:
        with pytest.raises(WeightsError):
            load(folder)
    finally:
        allow_large_models(False)


@pytest.mark.parametrize("text", ["[]", "1e999", '"x"', "null", "[" * 100_000, "\xff\xfe"])
def test_config_json_that_is_not_an_object(seeds, tmp_path, text):
    from evolm import checkpoint

    for seed in (seeds[0]["hf-config"], seeds[0]["checkpoint-config"]):
        import shutil

        folder = tmp_path / seed.parent.name
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(seed.parent, folder)
        (folder / "config.json").write_text(text, encoding="latin-1")
        assert checkpoint.is_checkpoint(str(folder)) is False
        with pytest.raises(ConfigError, match=f"{folder / 'config.json'}: (expected a JSON object|not valid JSON)"):
            load(folder)


# ----------------------------------------------------------------------------------------------
# tokenizer.json, recipes, data specs
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mutate", [
    lambda t: t.replace('"merges"', '"merges_"'),
    lambda t: t.replace('"type": "BPE"', '"type": "Nope"'),
    lambda t: t[: len(t) // 2],
    lambda t: t.replace('"vocab": {', '"vocab": {"zzz": "b", '),
])
def test_tokenizer_json_garbage_is_a_tokenizer_error(seeds, tmp_path, mutate):
    import shutil

    folder = tmp_path / "tok"
    shutil.copytree(seeds[0]["tokenizer"].parent, folder)
    path = folder / "tokenizer.json"
    path.write_text(mutate(path.read_text()))
    with pytest.raises(TokenizerError, match=str(folder)):
        Tokenizer.from_hf_dir(folder)
    with pytest.raises(TokenizerError, match=str(path)):
        Tokenizer.from_file(path)


@pytest.mark.parametrize("section,key,value,says", [
    ("stages", "seq_len", [1, "x"], r"seq_len must be int, got \[1, 'x'\]"),
    ("train", "micro_batch", [], r"micro_batch must be int, got \[\]"),
    (None, "data", True, "data must be dict"),
    ("optim", "lr", float("inf"), "lr must be float, got inf"),
    (None, "stages", {"a": 1}, "stages must be a non-empty list"),
])
def test_recipe_wrong_types_are_recipe_errors(tmp_path, section, key, value, says):
    import yaml

    d = yaml.safe_load((Path(__file__).parents[1] / "recipes" / "demo.yaml").read_text())
    if section == "stages":
        d["stages"][0][key] = value
    elif section:
        d[section][key] = value
    else:
        d[key] = value
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(RecipeError, match=says):
        load_recipe(str(path))
    path.write_bytes(b"name: \xff\xfe\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(str(path))


@pytest.mark.parametrize("spec,says", [
    ({"sources": 5}, "sources must be a list"),
    ({"sources": [{"name": "a", "path": "x.jsonl", "weight": "1"}]}, "weight must be float, got '1'"),
    ({"sources": [{"name": "a", "path": ["x"]}]}, "path must be str | None"),
    ({"sources": ["shakespeare"], "val_fraction": 1e999}, "val_fraction must be float, got inf"),
    ({"sources": ["shakespeare"], "num_perm": 10**12}, "num_perm must be in \\[1, 4096\\]"),
    ([{"name": 3}], "non-empty 'name'"),
])
def test_data_spec_errors_name_the_file(tmp_path, spec, says):
    from evolm.data.prepare import load_options

    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(DataError, match=says) as e:
        _, options = load_spec(path)
        load_options(options, source=str(path))
    assert str(path) in str(e.value)


# ----------------------------------------------------------------------------------------------
# the CLI turns each into one line
# ----------------------------------------------------------------------------------------------
def test_cli_prints_one_line(seeds, tmp_path, capsys):
    from evolm.cli import main

    folder = _hf_folder_with(seeds, tmp_path, intermediate_size=10**9)
    deep = tmp_path / "deep.json"
    deep.write_text(json.dumps({**json.loads((folder / "config.json").read_text()), "num_hidden_layers": 2**62}))
    bad_gguf = _gguf_with(tmp_path, "llama.attention.head_count", "u32", 0)
    out = str(tmp_path / "o")
    try:
        for argv, says in ((["convert", "--model", str(folder), "--out", out], "allow_large=True"),
                           (["convert", "--model", str(bad_gguf), "--out", out], "head_count' is 0"),
                           (["arch", "show", str(deep)], "num_hidden_layers is 4611686018427387904"),
                           (["--allow-large", "convert", "--model", str(folder), "--out", out],
                            "do not fit the config")):
            with pytest.raises(SystemExit) as e:
                main(argv)
            err = capsys.readouterr().err.strip()
            assert e.value.code == 2 and says in err and "\n" not in err and "Traceback" not in err, err
    finally:
        allow_large_models(False)  # --allow-large set the process default
