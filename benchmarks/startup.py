"""What a user gets: `evolm generate` with no flags, from the shell, next to forced paths and peers.

Every engine runs as its own process, as a user would start it, on the same GGUF file and prompt,
greedy, generating exactly ``--new`` tokens (end-of-sequence ignored). For each run it records:

- **first token**: seconds from starting the process to the first generated text on stdout
  (interpreter start, imports, loading the file, preparing the model, prefill, one step);
- **decode**: tokens per second after the first one, ``(new - 1) / (last text - first token)``
  (the last text's arrival, not the process exit: interpreter teardown is not decoding).

Engines: ``evolm`` (the defaults), ``evolm --no-fast`` (the plain eager model),
``evolm --compile`` (compiled decoding, paid at every start), ``transformers`` (the same file
dequantized, same dtype) and ``llama.cpp`` (llama-cpp-python on the file itself, when installed:
``make bench-deps``). Runs are interleaved (engine order rotates every round) and repeated; the
table gives the median and half the spread. The page cache is warmed, the sources' bytecode compiled and
each engine run once untimed before timing (see ``warm_up``).

``--phases``: where the first token's time goes in ``evolm generate`` (the defaults), each phase
exclusive of the ones inside it, summing to the first token (also given: the process's CPU
seconds to it, which a busy machine sways less than wall time): interpreter start and the imports of
the generate path, reading the file into the model, building the tokenizer, loading the C++
kernels, preparing the model (fusing, the block step), prefill and the first step, and the rest
(argument parsing, choosing the path). ``--baseline SRC``: also time the evolm engines from another
checkout's ``src`` folder (``evolm@base``), interleaved with this one, to measure a change.

    python benchmarks/startup.py [--model smollm2|gemma3|PATH.gguf] [--new 64] [--repeat 3]
                                 [--threads 2] [--engines evolm,evolm-no-fast,evolm-compile,transformers,llama.cpp]
                                 [--phases] [--baseline OTHER/src]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

from stats import median_spread  # noqa: E402  (benchmarks/stats.py)

PROMPT = "The history of the printing press begins in the 15th century, when"
ROOT = Path(__file__).resolve().parent.parent

HF_SCRIPT = r'''
import sys, torch, transformers
path, prompt, new, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
torch.set_num_threads(threads)
p = __import__("pathlib").Path(path)
tok = transformers.AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
model = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
class Out(transformers.TextStreamer):
    def on_finalized_text(self, text, stream_end=False):
        sys.stdout.write(text or " "); sys.stdout.flush()
ids = tok(prompt, return_tensors="pt").input_ids
with torch.inference_mode():
    model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, streamer=Out(tok, skip_prompt=True))
'''

LLAMACPP_SCRIPT = r'''
import sys, llama_cpp
path, prompt, new, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_threads=threads, n_batch=512, verbose=False)
bias = {llm.token_eos(): -1e9}
for part in llm.create_completion(prompt, max_tokens=new, temperature=0.0, stream=True, logit_bias=bias):
    sys.stdout.write(part["choices"][0]["text"] or " "); sys.stdout.flush()
'''


# ``evolm generate`` with its phases timed: the modules of the generate path are imported first (they
# are the "imports" phase), then the functions that make up a start are wrapped, nested phases
# subtracted from the ones around them, and the table printed to stderr as one PHASES line at exit.
PHASES_SCRIPT = r'''
import atexit, json, os, sys, time
T0 = float(os.environ["EVOLM_T0"])  # the parent's clock when it started this process
import evolm.cli, evolm.infer.prepare, evolm.infer.text, evolm.interop.gguf, evolm.kernels
spent, stack, marks = {}, [], {"imports": time.time() - T0}

def timed(module, attr, phase):
    fn = getattr(module, attr)
    def wrapper(*a, **k):
        start, inner = time.time(), sum(spent.values())
        stack.append(phase)
        try:
            return fn(*a, **k)
        finally:
            stack.pop()
            spent[phase] = spent.get(phase, 0.0) + (time.time() - start) - (sum(spent.values()) - inner)
            marks.setdefault(phase + " end", time.time() - T0)
    setattr(module, attr, wrapper)

timed(evolm.interop.gguf, "load_gguf", "load")
timed(evolm.interop.gguf, "tokenizer_from_gguf_metadata", "tokenizer")
timed(evolm.kernels, "available", "kernels")
timed(evolm.infer.prepare, "prepare", "prepare")
write = sys.stdout.write
def first_write(text):
    if text.strip() and "first token" not in marks:
        marks["first token"], marks["cpu"] = time.time() - T0, time.process_time()
    return write(text)
sys.stdout.write = first_write

@atexit.register
def report():
    first = marks.get("first token", 0.0)
    phases = {"imports": marks["imports"], **spent,
              "prefill+first step": first - marks.get("prepare end", first)}
    phases["other"] = first - sum(phases.values())
    # CPU seconds of this process (all its threads) to the first token: less swayed by a busy machine
    sys.stderr.write("PHASES " + json.dumps({"first token": first, "first token, CPU s": marks.get("cpu", 0.0),
                                             **phases}) + "\n")

sys.argv = ["evolm", *sys.argv[1:]]
sys.exit(evolm.cli.main())
'''


def commands(path: str, new: int, threads: int) -> dict[str, list[str]]:
    py, evolm = sys.executable, [sys.executable, "-m", "evolm.cli", "generate"]
    common = ["--model", path, "--prompt", PROMPT, "--max-new-tokens", str(new), "--ignore-eos",
              "--threads", str(threads)]
    return {
        "evolm": evolm + common,
        "evolm-phases": [py, "-c", PHASES_SCRIPT, "generate"] + common,
        "evolm-no-fast": evolm + common + ["--no-fast"],
        "evolm-no-block-step": evolm + common + ["--no-block-step"],
        "evolm-compile": evolm + common + ["--compile"],
        "transformers": [py, "-c", HF_SCRIPT, path, PROMPT, str(new), str(threads)],
        "llama.cpp": [py, "-c", LLAMACPP_SCRIPT, path, PROMPT, str(new), str(threads)],
    }


def run_once(cmd: list[str], new: int, threads: int, src: Path = ROOT / "src") -> tuple[float, float, dict]:
    """(seconds to the first generated text, decode tokens/s after it, the PHASES line's figures if
    the process printed one) for one process running evolm from ``src``."""
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads),
           "TOKENIZERS_PARALLELISM": "false", "EVOLM_T0": repr(time.time())}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    fd = proc.stdout.fileno()
    first = os.read(fd, 1)
    t_first = time.perf_counter() - t0
    t_end = t_first
    # the time of the last text, not of the exit: interpreter teardown (a second or so for torch)
    # is not decoding, and a closing newline flushed at exit is not text
    while chunk := os.read(fd, 65536):
        if chunk.strip():
            t_end = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace")
    if proc.wait() != 0 or not first:
        raise RuntimeError(f"{cmd[:4]} failed:\n{err[-2000:]}")
    phases = [json.loads(line[len("PHASES "):]) for line in err.splitlines() if line.startswith("PHASES ")]
    return t_first, (new - 1) / max(t_end - t_first, 1e-9), phases[-1] if phases else {}


def available(name: str) -> str | None:
    """Why an engine cannot run here, or None."""
    import importlib.util

    module = {"transformers": "transformers", "llama.cpp": "llama_cpp"}.get(name)
    if module and importlib.util.find_spec(module) is None:
        return f"{module} not installed" + (" (make bench-deps)" if module == "llama_cpp" else "")
    return None


def warm_up(engines: dict, new: int, threads: int) -> None:
    """What only a machine's first run pays stays out of the figures: Python's bytecode of the evolm
    sources (written on a user's first run, unless PYTHONDONTWRITEBYTECODE is set, as in some
    containers: then every start would compile ~100 ms of sources), and one untimed run of each
    engine (the kernels' build, the vocabulary and block-verdict records in the asset cache)."""
    import compileall

    for src in {src for _, src in engines.values()}:
        compileall.compile_dir(str(src / "evolm"), quiet=1)
    for cmd, src in engines.values():
        run_once(cmd, new, threads, src)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="smollm2, gemma3 or a .gguf path")
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--engines", default="evolm,evolm-no-fast,evolm-compile,transformers,llama.cpp")
    ap.add_argument("--phases", action="store_true", help="evolm (the defaults) with its first token's phases timed")
    ap.add_argument("--baseline", type=Path, default=None, metavar="SRC",
                    help="another checkout's src folder: its evolm engines run too, as NAME@base")
    args = ap.parse_args()
    from evolm.interop.gguf import find_asset

    path = str(find_asset(args.model)) if not args.model.endswith(".gguf") else args.model
    Path(path).read_bytes()  # into the page cache: the file's first read is not what is measured
    cmds = commands(path, args.new, args.threads)
    engines = {}  # name -> (command, src folder)
    for name in args.engines.split(","):
        why = available(name)
        if why:
            print(f"skipping {name}: {why}")
            continue
        cmd = cmds["evolm-phases" if args.phases and name == "evolm" else name]
        engines[name] = (cmd, ROOT / "src")
        if args.baseline and name.startswith("evolm"):
            engines[f"{name}@base"] = (cmd, args.baseline.resolve())
    names = list(engines)
    warm_up(engines, args.new, args.threads)
    results: dict[str, list[tuple[float, float, dict]]] = {n: [] for n in names}
    for r in range(args.repeat):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            cmd, src = engines[name]
            results[name].append(run_once(cmd, args.new, args.threads, src))
            print(f"  round {r + 1} {name}: first token {results[name][-1][0]:.2f} s, "
                  f"decode {results[name][-1][1]:.1f} tok/s", flush=True)
    print(f"\n{Path(path).name}, {args.new} new tokens, {args.threads} threads, {args.repeat} interleaved runs")
    print(f"| engine | first token (s) | decode tok/s | decode vs transformers |\n|---|---|---|---|")
    ref = median_spread([d for _, d, _ in results["transformers"]])[0] if "transformers" in results else None
    for name in names:
        f_med, f_sp = median_spread([f for f, _, _ in results[name]])
        d_med, d_sp = median_spread([d for _, d, _ in results[name]])
        ratio = f"{d_med / ref:.2f}x" if ref else ""
        print(f"| {name} | {f_med:.2f} ±{100 * f_sp:.0f}% | {d_med:.1f} ±{100 * d_sp:.0f}% | {ratio} |")
    timed = [n for n in names if results[n][0][2]]
    if timed:
        print_phases({n: [p for _, _, p in results[n]] for n in timed})


def print_phases(runs: dict[str, list[dict]]) -> None:
    """Median seconds per phase of the first token, one column per engine (as the child measured them:
    from its own start, so the first row can differ a little from the table above)."""
    phases = list(next(iter(runs.values()))[0])
    print(f"\n| phase (s, median) | {' | '.join(runs)} |\n|---|{'---|' * len(runs)}")
    for phase in phases:
        cells = [f"{median_spread([p.get(phase, 0.0) for p in rs])[0]:.2f}" for rs in runs.values()]
        print(f"| {phase} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
