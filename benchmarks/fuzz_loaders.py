"""Fuzz every model-file loader: mutated GGUF files, safetensors weights, Hugging Face and evolm
config.json files, tokenizer.json folders, pretraining recipes and data specs.

Each kind starts from a small *valid* file (a tiny GGUF written with the ``gguf`` package's writer,
a Hugging Face folder from transformers' config + safetensors, a ``tokenizers`` BPE, the recipes in
``recipes/``) and mutates it: byte flips, truncations, inserted junk, and field replacements with
extreme values or wrong types (in the JSON/YAML tree, in a GGUF's metadata through the writer, and in
a GGUF header's binary fields: counts, lengths, dims, offsets, types). Every case must either load
or raise the kind's error type (``EXPECTED``) whose message names the file; anything else (another
exception, a hang, memory beyond the bound) is a failure.

Cases run in a worker process with an address-space limit (RLIMIT_AS) and a per-case time limit, so
a case that hangs or allocates without bound is counted, killed, and the run goes on.

    python benchmarks/fuzz_loaders.py 500                 # 500 cases per kind, the table
    python benchmarks/fuzz_loaders.py 200 --kinds gguf --seed 3 --show 5

``tests/test_fuzz_loaders.py`` runs a short, seeded version of the same cases in the suite.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("gguf", "safetensors", "hf-config", "checkpoint-config", "tokenizer", "recipe", "data-spec")
# the error type each kind of input may raise (module.class). A config.json that parses but no longer
# matches the weights beside it (a changed width, a bias switched on) is found when the weights are
# checked against it: the weights' error names both.
EXPECTED = {
    "gguf": ("evolm.interop.gguf.GGUFError",),
    "safetensors": ("evolm.interop.empty.WeightsError",),
    "hf-config": ("evolm.config.ConfigError", "evolm.interop.empty.WeightsError"),
    "checkpoint-config": ("evolm.config.ConfigError", "evolm.checkpoint.CheckpointError",
                          "evolm.interop.empty.WeightsError"),
    "tokenizer": ("evolm.tokenizer.TokenizerError",),
    "recipe": ("evolm.train.recipe.RecipeError",),
    "data-spec": ("evolm.data.sources.DataError",),
}
OUTCOMES = ("loaded", "clear error", "unnamed", "other exception", "hang", "memory")

# values that replace a field: extremes of every kind, and the wrong types
EXTREMES = [0, -1, 1, 3, 2**31, 2**62, 10**9, 10**30, float("inf"), float("nan"), 1e-300, -1e308, 0.5,
            "x", "", "9" * 400, [], {}, None, True, False, [1, "x"], {"a": 1}, [[[]]], [0] * 50]
GGUF_U64 = [0, 1, 2**31, 2**32 - 1, 2**40, 2**63, 2**64 - 1]


# ----------------------------------------------------------------------------------------------
# the valid starting files
# ----------------------------------------------------------------------------------------------
TINY = dict(vocab=258, d=32, heads=2, kv=1, ff=64, layers=2, ctx=64)
GGUF_META = {"context_length": TINY["ctx"], "embedding_length": TINY["d"], "block_count": TINY["layers"],
             "feed_forward_length": TINY["ff"], "attention.head_count": TINY["heads"],
             "attention.head_count_kv": TINY["kv"], "attention.layer_norm_rms_epsilon": 1e-5,
             "rope.freq_base": 10000.0, "rope.dimension_count": TINY["d"] // TINY["heads"]}


def _gguf_tensors(rng):
    """name -> (float32 array, ggml type) for the tiny llama GGUF."""
    import gguf
    import numpy as np

    Q = gguf.GGMLQuantizationType
    d, ff, hd = TINY["d"], TINY["ff"], TINY["d"] // TINY["heads"]
    g = np.random.default_rng(rng.randrange(2**32))
    out = {"token_embd.weight": ((TINY["vocab"], d), Q.Q8_0), "output_norm.weight": ((d,), Q.F32),
           "output.weight": ((TINY["vocab"], d), Q.F16)}
    for i in range(TINY["layers"]):
        out.update({f"blk.{i}.attn_norm.weight": ((d,), Q.F32), f"blk.{i}.ffn_norm.weight": ((d,), Q.F32),
                    f"blk.{i}.attn_q.weight": ((d, d), Q.Q4_0),
                    f"blk.{i}.attn_k.weight": ((TINY["kv"] * hd, d), Q.Q8_0),
                    f"blk.{i}.attn_v.weight": ((TINY["kv"] * hd, d), Q.BF16),
                    f"blk.{i}.attn_output.weight": ((d, d), Q.Q5_1), f"blk.{i}.ffn_gate.weight": ((ff, d), Q.Q4_1),
                    f"blk.{i}.ffn_up.weight": ((ff, d), Q.F16), f"blk.{i}.ffn_down.weight": ((d, ff), Q.Q8_0)})
    return {k: (g.standard_normal(shape).astype(np.float32) * 0.1, t) for k, (shape, t) in out.items()}


def write_gguf(path: Path, tensors, meta_override: tuple[str, str, object] | None = None) -> None:
    """The tiny llama GGUF; ``meta_override`` = (key, gguf value kind, value) replaces or adds one key."""
    import gguf

    from evolm.tokenizer import byte_alphabet

    w = gguf.GGUFWriter(str(path), "llama")
    meta = {f"llama.{k}": v for k, v in GGUF_META.items()}
    meta.update({"general.name": "fuzz", "tokenizer.ggml.model": "gpt2",
                 "tokenizer.ggml.tokens": [byte_alphabet()[b] for b in range(256)] + ["Ġt", "he"],
                 "tokenizer.ggml.token_type": [1] * TINY["vocab"], "tokenizer.ggml.merges": ["Ġ t", "h e"],
                 "tokenizer.ggml.bos_token_id": 0, "tokenizer.ggml.eos_token_id": 1})
    kinds = {}
    if meta_override is not None:
        key, kind, value = meta_override
        if kind == "delete":
            meta.pop(key, None)
        else:
            meta[key], kinds[key] = value, kind
    for key, value in meta.items():
        _add_value(w, key, value, kinds.get(key))
    import gguf.quants

    for name, (a, qt) in tensors.items():
        if qt in (gguf.GGMLQuantizationType.F32,):
            w.add_tensor(name, a)
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _add_value(w, key, value, kind) -> None:
    import gguf

    T = gguf.GGUFValueType
    if kind is None:  # the natural type of a valid value
        kind = ("bool" if isinstance(value, bool) else "u32" if isinstance(value, int) else
                "f32" if isinstance(value, float) else "str" if isinstance(value, str) else "array")
    if kind == "array":
        w.add_array(key, value)
    else:
        w.add_key_value(key, value, {"bool": T.BOOL, "u32": T.UINT32, "u64": T.UINT64, "i32": T.INT32,
                                     "i64": T.INT64, "f32": T.FLOAT32, "f64": T.FLOAT64, "str": T.STRING}[kind])


def make_seeds(folder: Path, rng: random.Random) -> dict[str, Path]:
    """The valid file(s) every kind starts from; returns kind -> the file that gets mutated."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    import transformers
    from evolm import checkpoint
    from evolm.config import ModelConfig
    from evolm.interop.hf import state_dict_to_hf
    from evolm.model import build

    folder.mkdir(parents=True, exist_ok=True)
    seeds: dict[str, Path] = {}
    gg = folder / "tiny.gguf"
    write_gguf(gg, _gguf_tensors(rng))
    seeds["gguf"] = gg

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    text = ["the quick brown fox jumps over the lazy dog " * 3, "def f(x): return x + 1", "to be or not to be"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "<s>", "</s>"]))
    hf_cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=TINY["d"],
                                      intermediate_size=TINY["ff"], num_hidden_layers=TINY["layers"],
                                      num_attention_heads=TINY["heads"], num_key_value_heads=TINY["kv"],
                                      max_position_embeddings=TINY["ctx"], tie_word_embeddings=False)
    hf_dir = folder / "hf"
    hf_dir.mkdir()
    hf_cfg.to_json_file(str(hf_dir / "config.json"))
    from evolm.interop.hf import config_from_hf

    torch.manual_seed(rng.randrange(2**31))
    model = build(config_from_hf(json.loads((hf_dir / "config.json").read_text())))
    save_file({k: v.contiguous() for k, v in state_dict_to_hf(model.state_dict(), model.config, "llama").items()},
              str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    seeds["hf-config"], seeds["safetensors"], seeds["tokenizer"] = (hf_dir / "config.json",
                                                                   hf_dir / "model.safetensors",
                                                                   hf_dir / "tokenizer.json")
    ck = folder / "ckpt"
    checkpoint.save_checkpoint(build(ModelConfig(vocab_size=64, d_model=16, n_layers=2, n_heads=2, max_seq_len=32,
                                                 pos_emb="rope", norm="rmsnorm", mlp="glu", activation="silu")),
                               str(ck))
    seeds["checkpoint-config"] = ck / "config.json"
    for name in ("demo", "three-stage", "gpt2-124m", "lab-base"):
        if (ROOT / "recipes" / f"{name}.yaml").is_file():
            shutil.copy(ROOT / "recipes" / f"{name}.yaml", folder / f"recipe-{name}.yaml")
    seeds["recipe"] = folder / "recipe-demo.yaml"
    (folder / "docs.jsonl").write_text(json.dumps({"text": "hello world"}) + "\n")
    spec = {"sources": [{"name": "mine", "path": str(folder / "docs.jsonl"), "weight": 1.0, "filters": "none"},
                        "shakespeare"], "val_fraction": 0.1, "seed": 1, "near_dedup": False}
    (folder / "spec.json").write_text(json.dumps(spec))
    seeds["data-spec"] = folder / "spec.json"
    return seeds


# ----------------------------------------------------------------------------------------------
# mutations
# ----------------------------------------------------------------------------------------------
def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """Byte flips (mostly in the header), a truncation, inserted junk or a zeroed run."""
    b = bytearray(data)
    op = rng.choice(("flip", "flip", "truncate", "insert", "zero"))
    head = min(len(b), 4096)
    if op == "flip" and b:
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(head) if rng.random() < 0.8 else rng.randrange(len(b))
            b[i] = rng.randrange(256)
    elif op == "truncate":
        del b[rng.randrange(len(b) + 1):]
    elif op == "insert":
        i = rng.randrange(len(b) + 1)
        b[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    elif b:
        i = rng.randrange(len(b))
        b[i:i + rng.randint(1, 256)] = bytes(min(256, len(b) - i))
    return bytes(b)


def _paths(tree, prefix=()):
    """Every (path, value) in a JSON/YAML tree (lists of over 40 items: a few samples)."""
    yield prefix, tree
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(tree, list):
        idx = range(len(tree)) if len(tree) <= 40 else random.Random(len(tree)).sample(range(len(tree)), 8)
        for i in idx:
            yield from _paths(tree[i], prefix + (i,))


def mutate_tree(tree, rng: random.Random):
    """Replace, delete or add one field of a JSON/YAML tree (or the whole tree)."""
    import copy

    tree = copy.deepcopy(tree)
    paths = [p for p, _ in _paths(tree)]
    path = rng.choice(paths)
    value = rng.choice(EXTREMES)
    if rng.random() < 0.3 and isinstance(value, (int, float)) and not isinstance(value, bool):
        value = -value if rng.random() < 0.5 else value
    if not path:
        return value
    parent = tree
    for k in path[:-1]:
        parent = parent[k]
    op = rng.random()
    if op < 0.12 and isinstance(parent, dict):
        del parent[path[-1]]
    elif op < 0.2 and isinstance(parent, dict):
        parent[rng.choice(("zzz", "num_layers", "n_layer", "extra"))] = value
    else:
        parent[path[-1]] = value
    return tree


def _gguf_fields(data: bytes) -> list[tuple[int, str]]:
    """(offset, struct format) of every count, length, type, dim and offset in a GGUF header."""
    fields, pos = [], 8
    u32 = lambda p: struct.unpack_from("<I", data, p)[0]  # noqa: E731
    u64 = lambda p: struct.unpack_from("<Q", data, p)[0]  # noqa: E731
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    fields += [(8, "<Q"), (16, "<Q")]
    n_tensors, n_kv = u64(8), u64(16)
    pos = 24
    for _ in range(n_kv):
        fields.append((pos, "<Q"))
        pos += 8 + u64(pos)
        vt = u32(pos)
        fields.append((pos, "<I"))
        pos += 4
        if vt == 8:
            fields.append((pos, "<Q"))
            pos += 8 + u64(pos)
        elif vt == 9:
            it, n = u32(pos), u64(pos + 4)
            fields += [(pos, "<I"), (pos + 4, "<Q")]
            pos += 12
            for j in range(n):
                if it == 8:
                    if j < 4:
                        fields.append((pos, "<Q"))
                    pos += 8 + u64(pos)
                else:
                    pos += sizes[it]
        else:
            fields.append((pos, {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[sizes[vt]]))
            pos += sizes[vt]
    for _ in range(n_tensors):
        pos += 8 + u64(pos)
        nd = u32(pos)
        fields.append((pos, "<I"))
        pos += 4
        fields += [(pos + 8 * j, "<Q") for j in range(nd)]
        pos += 8 * nd
        fields += [(pos, "<I"), (pos + 4, "<Q")]
        pos += 12
    return fields


def mutate_gguf(seed: Path, out: Path, rng: random.Random, tensors) -> None:
    op = rng.random()
    if op < 0.35:  # one metadata key replaced through the writer: extreme values, wrong types
        key = rng.choice([f"llama.{k}" for k in GGUF_META] + ["general.alignment", "general.architecture",
                          "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.bos_token_id",
                          "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "llama.rope.scaling.type",
                          "llama.attention.key_length", "llama.expert_count", "tokenizer.chat_template"])
        kind, value = rng.choice([("u32", 0), ("u32", 2**32 - 1), ("u64", 10**9), ("u64", 2**63), ("i32", -1),
                                  ("i64", -2**62), ("f32", float("inf")), ("f32", float("nan")), ("f64", 1e300),
                                  ("f32", 0.0), ("str", "x"), ("str", ""), ("bool", True), ("array", [1, 2]),
                                  ("array", ["a", "b"]), ("array", []), ("delete", None), ("u32", 3), ("u32", 7)])
        write_gguf(out, tensors, (key, kind, value))
        return
    data = seed.read_bytes()
    if op < 0.7:  # one binary header field (count, length, type, dim, offset) set to an extreme
        b = bytearray(data)
        pos, fmt = rng.choice(_gguf_fields(data))
        top = 2 ** (8 * struct.calcsize(fmt)) - 1
        value = rng.choice([v for v in GGUF_U64 if v <= top] + [rng.randrange(top + 1)])
        struct.pack_into(fmt, b, pos, value)
        out.write_bytes(bytes(b))
        return
    out.write_bytes(mutate_bytes(data, rng))


def _mutate_text_tree(seed: Path, out: Path, rng: random.Random, load, dump) -> None:
    """A JSON/YAML file: mostly one field replaced, sometimes the text itself damaged."""
    if rng.random() < 0.75:
        out.write_text(dump(mutate_tree(load(seed.read_text()), rng)))
    else:
        out.write_bytes(mutate_bytes(seed.read_bytes(), rng))


def _json_dump(tree) -> str:
    return json.dumps(tree)


def _yaml_load(text):
    import yaml

    return yaml.safe_load(text)


def _yaml_dump(tree) -> str:
    import yaml

    return yaml.safe_dump(tree, sort_keys=False)


def make_case(kind: str, seeds: dict[str, Path], work: Path, rng: random.Random, tensors) -> Path:
    """Write one mutated input of ``kind`` under ``work``; returns what the loader is given."""
    if work.exists():
        shutil.rmtree(work)
    seed = seeds[kind]
    if kind == "gguf":
        work.mkdir(parents=True)
        mutate_gguf(seed, work / "m.gguf", rng, tensors)
        return work / "m.gguf"
    if kind in ("safetensors", "hf-config", "checkpoint-config", "tokenizer"):
        shutil.copytree(seed.parent, work)
        target = work / seed.name
        if kind == "tokenizer" and rng.random() < 0.25:
            target = work / "tokenizer_config.json"
            seed = seed.parent / "tokenizer_config.json"
        if kind == "safetensors" and rng.random() < 0.5:  # the JSON header, field by field
            data = seed.read_bytes()
            n = struct.unpack_from("<Q", data)[0]
            header = json.dumps(mutate_tree(json.loads(data[8:8 + n]), rng)).encode()
            target.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n:])
        elif kind == "safetensors":
            target.write_bytes(mutate_bytes(seed.read_bytes(), rng))
        else:
            _mutate_text_tree(seed, target, rng, json.loads, _json_dump)
        return work
    work.mkdir(parents=True)
    if kind == "recipe":
        seed = rng.choice(sorted(seed.parent.glob("recipe-*.yaml")))
        _mutate_text_tree(seed, work / seed.name, rng, _yaml_load, _yaml_dump)
        return work / seed.name
    _mutate_text_tree(seed, work / "spec.json", rng, json.loads, _json_dump)
    return work / "spec.json"


# ----------------------------------------------------------------------------------------------
# the worker: loads one case at a time under a memory limit
# ----------------------------------------------------------------------------------------------
def load_case(kind: str, path: str) -> None:
    """What "loading" means for each kind (the public entry points the CLI uses)."""
    if kind in ("gguf", "safetensors", "hf-config", "checkpoint-config"):
        from evolm.loading import load

        model, tok = load(path)
        if tok is not None:
            tok.decode(tok.encode("hello world"))
    elif kind == "tokenizer":
        from evolm.tokenizer import Tokenizer

        tok = Tokenizer.from_hf_dir(path)
        tok.decode(tok.encode("hello world"))
    elif kind == "recipe":
        from evolm.train.recipe import load_recipe

        load_recipe(path)
    elif kind == "data-spec":
        from evolm.data.prepare import load_options, load_spec

        _, options = load_spec(path)
        load_options(options, source=path)


def worker(mem_mb: int) -> None:
    """Read ``kind<TAB>path`` lines, answer one JSON line per case."""
    import importlib
    import warnings

    warnings.simplefilter("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch  # noqa: F401  (imported before the limit: its mappings are not the case's memory)

    import evolm.loading  # noqa: F401
    import evolm.train.recipe  # noqa: F401
    import evolm.data.prepare  # noqa: F401

    torch.set_num_threads(1)
    vm = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmSize:"))) * 1024
    limit = vm + mem_mb * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    errors = {k: tuple(getattr(importlib.import_module(n.rsplit(".", 1)[0]), n.rsplit(".", 1)[1]) for n in names)
              for k, names in EXPECTED.items()}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        kind, path = line.rstrip("\n").split("\t")
        try:
            load_case(kind, path)
            out = {"outcome": "loaded"}
        except MemoryError as e:
            out = {"outcome": "memory", "detail": f"MemoryError: {e}"[:300]}
        except BaseException as e:  # noqa: BLE001  (classifying every exception, Rust panics too, is the point)
            msg = str(e)
            named = Path(path).name in msg or str(Path(path).parent) in msg
            if isinstance(e, errors[kind]):
                out = {"outcome": "clear error" if named else "unnamed", "detail": f"{type(e).__name__}: {msg}"[:300]}
            else:
                import traceback

                where = traceback.extract_tb(e.__traceback__)[-1]
                out = {"outcome": "other exception",
                       "detail": f"{type(e).__name__}: {msg[:200]} at {Path(where.filename).name}:{where.lineno}"}
        print(json.dumps(out), flush=True)


class Runner:
    """The parent side: one worker process, restarted after a hang or a crash."""

    def __init__(self, mem_mb: int, timeout: float):
        self.mem_mb, self.timeout, self.proc = mem_mb, timeout, None

    def _start(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT / "src")}
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", str(self.mem_mb)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        first = self.proc.stdout.readline()
        if not first:
            raise RuntimeError("fuzz worker failed to start")

    def run(self, kind: str, path: Path) -> dict:
        import select

        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self.proc.stdin.write(f"{kind}\t{path}\n")
        self.proc.stdin.flush()
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout)
        line = self.proc.stdout.readline() if ready else ""
        if line:
            return json.loads(line)
        hang = not ready
        self.close()
        return {"outcome": "hang" if hang else "memory",
                "detail": f"no answer in {self.timeout} s" if hang else "worker died (killed or out of memory)"}

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def fuzz(n_per_kind: int, seed: int = 0, kinds=KINDS, mem_mb: int = 4096, timeout: float = 20.0,
         work: Path | None = None) -> dict:
    """Run ``n_per_kind`` cases of each kind; returns {kind: Counter of outcomes}, examples, seconds."""
    rng = random.Random(seed)
    own = work is None
    work = Path(tempfile.mkdtemp(prefix="evolm-fuzz-")) if own else work
    try:
        seeds = make_seeds(work / "seeds", random.Random(seed))
        tensors = _gguf_tensors(random.Random(seed))
        runner = Runner(mem_mb, timeout)
        counts = {k: collections.Counter() for k in kinds}
        bad: dict[str, list] = {k: [] for k in kinds}
        seconds = {}
        for kind in kinds:
            t0 = time.perf_counter()
            for i in range(n_per_kind):
                case_rng = random.Random(f"{seed}-{kind}-{i}")
                path = make_case(kind, seeds, work / "case", case_rng, tensors)
                res = runner.run(kind, path)
                counts[kind][res["outcome"]] += 1
                if res["outcome"] not in ("loaded", "clear error"):
                    bad[kind].append((i, res.get("detail", "")))
            seconds[kind] = time.perf_counter() - t0
        runner.close()
        return {"counts": counts, "bad": bad, "seconds": seconds}
    finally:
        if own:
            shutil.rmtree(work, ignore_errors=True)


def table(result: dict) -> str:
    rows = [f"| {'input kind':<18} | cases | loaded | clear error | other | seconds |",
            f"|{'-' * 20}|------:|-------:|------------:|------:|--------:|"]
    for kind, c in result["counts"].items():
        other = sum(v for k, v in c.items() if k not in ("loaded", "clear error"))
        rows.append(f"| {kind:<18} | {sum(c.values()):>5} | {c['loaded']:>6} | {c['clear error']:>11} | "
                    f"{other:>5} | {result['seconds'][kind]:>7.1f} |")
    return "\n".join(rows)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(int(sys.argv[2]))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("n", type=int, nargs="?", default=300, help="cases per input kind")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kinds", default=",".join(KINDS))
    p.add_argument("--mem-mb", type=int, default=4096, help="address space a case may add (RLIMIT_AS)")
    p.add_argument("--timeout", type=float, default=20.0, help="seconds a case may take")
    p.add_argument("--show", type=int, default=3, help="failures to print per kind")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    result = fuzz(args.n, args.seed, tuple(args.kinds.split(",")), args.mem_mb, args.timeout)
    print(table(result))
    for kind, cases in result["bad"].items():
        for i, detail in cases[:args.show]:
            print(f"{kind} case {i}: {detail}")
    if any(result["bad"].values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
