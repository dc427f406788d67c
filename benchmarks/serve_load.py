"""Load test for ``evolm serve``: N concurrent streaming clients against a localhost server.

For each concurrency N (default 1, 8, 32) N clients each send streaming chat requests back to
back until ``--requests`` requests are done or ``--seconds`` have passed (both bounded), and we
report requests/s, generated tokens/s, p50/p95 time to first token and request latency, each
stream's decode rate (tokens after the first over the time from the first to the last; ``dec/s``:
the median stream's rate times N, the rate the server decodes at while N streams run) and the
error count (target: 0). Requests are greedy with ``ignore_eos`` so each one generates exactly
``--max-tokens`` tokens and the levels are comparable.

``--generate`` measures ``evolm.infer.generate``'s decode rate on the same model (with ``--url``:
``--model``, default the SmolLM2 asset), prepared as the server prepares it by default, in this process with the server idle, before and after each level at batch
N (the same chat prompt, N copies): the ``gen dec/s`` column and the ratio ``dec/s / gen`` are the
server's decode speed against the library's own loop on the same host in the same minute.

By default the script starts its own server (SmolLM2-135M-Instruct, ``--max-batch 32``) on a free
127.0.0.1 port; ``--url`` points it at a running one instead, which must be on this machine
(loopback only: this is a load generator, it refuses other hosts). ``--sequential`` also runs the
N=8 level against a second server with ``--max-batch 1`` -- the same requests served one at a
time -- to show what continuous batching buys.

    python benchmarks/serve_load.py [--model PATH] [--levels 1,8,32] [--requests R] [--seconds 120]
                                    [--max-tokens 64] [--max-batch 32] [--sequential] [--generate]
                                    [--json OUT]
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PROMPTS = ["Explain how a rainbow forms.", "Write a short story about a robot learning to paint.",
           "What are the benefits of regular exercise?", "Describe the water cycle.",
           "Give me three tips for learning a new language.", "Why is the sky blue?",
           "Summarize the plot of Romeo and Juliet.", "How does a refrigerator work?",
           "Write a poem about autumn leaves.", "What is machine learning?",
           "Plan a one-day trip to Paris.", "Explain photosynthesis to a child.",
           "What makes a good team leader?", "Describe your ideal weekend.",
           "How do airplanes stay in the air?", "List some healthy breakfast ideas."]


def _loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


class Server:
    """``run_server`` in a child process on a free loopback port."""

    def __init__(self, model: str, max_batch: int, log: Path, min_decode_rows: int | None = None,
                 threads: int | None = None):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        code = (f"from evolm.serve import run_server; run_server({model!r}, port={self.port}, "
                f"max_batch={max_batch}, min_decode_rows={min_decode_rows}, threads={threads}, log_level='warning')")
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: see {log}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.stop()
        raise TimeoutError(f"server not ready: see {log}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      key: str | None) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    t0 = time.perf_counter()
    ttft, last, tokens, error = None, None, 0, None
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                return {"error": f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"}
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    error = chunk["error"]["message"]
                    break
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    last = time.perf_counter() - t0
                    ttft = last if ttft is None else ttft
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        error = f"{type(e).__name__}: {e}"
    if error is None and tokens != max_tokens:
        error = f"expected {max_tokens} tokens, got {tokens}"
    # tokens after the first over the time between the first and the last text: the stream's decode
    # rate (a token whose text is held back arrives with a later one: counted, not timed apart)
    rate = (tokens - 1) / (last - ttft) if ttft is not None and last > ttft else None
    return {"error": error, "ttft": ttft, "latency": time.perf_counter() - t0, "tokens": tokens, "rate": rate}


async def level(url: str, model: str, n: int, total: int, seconds: float, max_tokens: int, key: str | None) -> dict:
    """N clients, back-to-back requests, until ``total`` are done or ``seconds`` have passed."""
    results: list[dict] = []
    counter = iter(range(total))
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(seconds + 60), limits=limits) as client:
        async def worker() -> None:
            for i in counter:
                if time.perf_counter() > deadline:
                    return
                results.append(await one_request(client, url, model, PROMPTS[i % len(PROMPTS)], max_tokens, key))

        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(n))), seconds + 120)
        wall = time.perf_counter() - t0
    ok = [r for r in results if not r["error"]]
    errors = [r["error"] for r in results if r["error"]]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    lat = [r["latency"] for r in ok]
    rates = [r["rate"] for r in ok if r["rate"] is not None]
    return {"concurrency": n, "requests": len(results), "errors": len(errors), "wall_s": wall,
            "requests_per_s": len(ok) / wall, "tokens_per_s": sum(r["tokens"] for r in ok) / wall,
            "ttft_p50_s": _pct(ttft, 0.5), "ttft_p95_s": _pct(ttft, 0.95),
            "latency_p50_s": _pct(lat, 0.5), "latency_p95_s": _pct(lat, 0.95),
            "stream_rate_p50": _pct(rates, 0.5), "decode_tokens_per_s": n * _pct(rates, 0.5),
            "first_errors": errors[:3]}


def _engine_stats(url: str, headers: dict) -> dict:
    """The engine's counters (``GET /health``: seconds and tokens in prompts and in decode steps)."""
    return httpx.get(url + "/health", headers=headers, timeout=10).json()


def _engine_split(before: dict, after: dict, wall: float) -> dict:
    """Where the server spent a level's wall time: its decode steps' rate (what ``generate``'s
    decode rate compares with), the prompts' share, and the time with nothing to run."""
    if "decode_seconds" not in after:  # a server without the counters
        return {}
    d = {k: after[k] - before[k] for k in ("prefill_seconds", "prefill_tokens", "decode_seconds",
                                            "decode_tokens", "steps", "requests")}
    prompts = max(d["requests"], 1)
    return {"engine_decode_tokens_per_s": d["decode_tokens"] / max(d["decode_seconds"], 1e-9),
            "engine_rows_per_step": d["decode_tokens"] / max(d["steps"], 1),
            "engine_prefill_share": d["prefill_seconds"] / wall,
            "engine_prefill_ms": 1e3 * d["prefill_seconds"] / prompts,
            "engine_idle_share": max(0.0, 1 - (d["prefill_seconds"] + d["decode_seconds"]) / wall)}


def _row(r: dict, label: str = "") -> str:
    gen = r.get("generate_tokens_per_s")
    vs = f" {gen:>8.1f} {r['decode_tokens_per_s'] / gen:>6.2f}" if gen else ""
    return (f"{label:>11} {r['concurrency']:>4} {r['requests']:>5} {r['errors']:>4} {r['requests_per_s']:>7.2f} "
            f"{r['tokens_per_s']:>8.1f} {r['ttft_p50_s']:>7.2f} {r['ttft_p95_s']:>7.2f} "
            f"{r['latency_p50_s']:>7.2f} {r['latency_p95_s']:>7.2f} {r['decode_tokens_per_s']:>8.1f}{vs}")


class GenerateBaseline:
    """``generate``'s decode rate on the server's model, prepared as ``evolm serve`` prepares it
    (``evolm.serve._default_inference``), loaded in this process."""

    def __init__(self, model: str, max_tokens: int):
        from evolm.infer.prepare import load_for_inference
        from evolm.infer.text import chat_prompt_ids
        from evolm.serve import _default_inference

        self.model, tok = load_for_inference(model, _default_inference())
        self.prompt = chat_prompt_ids(tok, [{"role": "user", "content": PROMPTS[0]}])
        self.max_tokens = max_tokens

    def rate(self, batch: int) -> float:
        """Tokens per second over the decode steps (the prefill and first token excluded)."""
        import torch

        from evolm.infer import SamplingParams
        from evolm.infer.decode import decode_steps

        ids = torch.tensor([self.prompt] * batch)
        params = SamplingParams(max_new_tokens=self.max_tokens, temperature=0, ignore_eos=True)
        times = []
        with torch.inference_mode():
            for _ in decode_steps(self.model, ids, None, params, []):
                times.append(time.perf_counter())
        return batch * (len(times) - 1) / (times[-1] - times[0])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="model path (default: the SmolLM2-135M-Instruct GGUF asset)")
    ap.add_argument("--url", default=None, help="a running server on this machine (default: start one)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--levels", default="1,8,32")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests per level (default: 2N, at least 8; never fewer than N)")
    ap.add_argument("--seconds", type=float, default=120, help="time limit per level")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=32, help="slots of the server this script starts")
    ap.add_argument("--min-decode-rows", type=int, default=None,
                    help="of the server this script starts (default: the server's)")
    ap.add_argument("--sequential", action="store_true", help="also run N=8 against a --max-batch 1 server")
    ap.add_argument("--generate", action="store_true",
                    help="also measure generate's decode rate at batch N in this process, around each level")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads of the server this script starts and of the --generate baseline "
                         "(default: torch's; on a shared host 1 keeps OpenMP teams from stalling each other)")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    if args.url and not _loopback(args.url):
        ap.error(f"--url {args.url}: only loopback servers (127.0.0.1, ::1, localhost) may be load-tested")
    model = args.model
    if model is None and (args.url is None or args.generate):
        from evolm.interop.gguf import find_asset

        model = str(find_asset("smollm2"))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    servers = []
    try:
        if args.url:
            url = args.url.rstrip("/")
        else:
            servers.append(Server(model, args.max_batch, Path("/tmp") / f"serve_load_{os.getpid()}.log",
                                  args.min_decode_rows, args.threads))
            url = servers[0].url
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model_id = httpx.get(url + "/v1/models", headers=headers, timeout=10).json()["data"][0]["id"]
        print(f"server {url}  model {model_id}  max_tokens {args.max_tokens}  "
              f"(greedy, ignore_eos)  {os.cpu_count()} cpus, torch threads {args.threads or 'default'}")
        baseline = GenerateBaseline(model, args.max_tokens) if args.generate else None
        print(f"{'':>11} {'N':>4} {'reqs':>5} {'err':>4} {'req/s':>7} {'tok/s':>8} {'ttft50':>7} {'ttft95':>7} "
              f"{'lat50':>7} {'lat95':>7} {'dec/s':>8}" + (f" {'gen dec/s':>8} {'/ gen':>6}" if baseline else ""))
        asyncio.run(level(url, model_id, 1, 1, 60, 4, args.api_key))  # warm-up
        results = []
        for n in levels:
            count = max(args.requests or max(8, 2 * n), n)
            gen = [baseline.rate(n)] if baseline else []
            before = _engine_stats(url, headers)
            r = level(url, model_id, n, count, args.seconds, args.max_tokens, args.api_key)
            r = asyncio.run(r)
            r.update(_engine_split(before, _engine_stats(url, headers), r["wall_s"]))
            r["server"] = "batched"
            if baseline:  # before and after the level: the host's load drifts
                gen.append(baseline.rate(n))
                r["generate_tokens_per_s"] = sum(gen) / 2
                r["generate_runs"] = gen
            results.append(r)
            print(_row(r, "batched"), flush=True)
        if args.sequential and not args.url:
            servers.append(Server(model, 1, Path("/tmp") / f"serve_load_seq_{os.getpid()}.log"))
            seq_url = servers[-1].url
            asyncio.run(level(seq_url, model_id, 1, 1, 60, 4, None))
            count = max(args.requests or 16, 8)
            r = asyncio.run(level(seq_url, model_id, 8, count, args.seconds, args.max_tokens, None))
            r["server"] = "max_batch=1"
            results.append(r)
            print(_row(r, "max_batch=1"), flush=True)
        for r in results:
            if "engine_decode_tokens_per_s" in r:
                print(f"N={r['concurrency']}: the engine's decode steps {r['engine_decode_tokens_per_s']:.1f} tok/s "
                      f"(rows per step {r['engine_rows_per_step']:.1f}); prompts, each prefilled alone: "
                      f"{100 * r['engine_prefill_share']:.0f}% of the wall time "
                      f"({r['engine_prefill_ms']:.1f} ms each); waiting for requests: "
                      f"{100 * r['engine_idle_share']:.0f}%")
            if r["first_errors"]:
                print(f"errors at N={r['concurrency']}: {r['first_errors']}")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
    finally:
        for s in servers:
            s.stop()


if __name__ == "__main__":
    main()
