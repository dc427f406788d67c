"""Memory of one fine-tuning step: full fine-tuning vs LoRA vs QLoRA, on SmolLM2-135M and a 1B preset.

Each (model, mode) runs in a fresh process (so one run's freed memory cannot hide another's) with
glibc's mmap threshold fixed, so freed tensors go back to the OS and the resident set tracks live
tensors. The step is forward + backward + AdamW on one random sequence. Reported:

- trainable / total parameters (an NF4 weight counts as the parameters it stands for);
- bytes of the model's tensors (parameters + buffers: NF4 codes and constants included);
- bytes of gradients + AdamW state after the step;
- bytes of the activations autograd saved for backward (unique storages other than the model's own
  tensors, via saved_tensors_hooks);
- the process's resident memory after imports (Python + torch, the floor under every row) and its peak
  during the step (Linux VmHWM, reset just before the step), and the step time (indicative only: it
  includes first-call warm-up).

Modes: ``full`` (float32, everything trains), ``lora`` (float32 base frozen, LoRA r=16 alpha=32 on
q/v, the LoRA paper's setting), ``lora-bf16`` (the same on a bf16 base), ``qlora`` (NF4 base,
bf16 compute, bf16 adapters and embeddings: QLoRA). A mode whose estimated need exceeds the
available memory is not run; its row shows the estimate (weights + gradients + AdamW = 16 bytes per
trained float32 parameter) instead.

    python benchmarks/finetune_memory.py [--models smollm2,llama-3.2-1b] [--modes full,lora,lora-bf16,qlora]
                                         [--seq 64] [--targets q_proj,v_proj] [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

MODES = ("full", "lora", "lora-bf16", "qlora")


# --- measurements ----------------------------------------------------------------------------
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    """Reset VmHWM (peak RSS) to the current RSS (Linux >= 4.0: write 5 to clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def tensor_bytes(tensors, exclude: set | None = None) -> int:
    """Bytes of the distinct storages behind ``tensors`` (skipping storages whose data_ptr is in ``exclude``)."""
    seen, total = set(exclude or ()), 0
    for t in tensors:
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen and key[0] not in seen:
            seen.add(key)
            total += key[1]
    return total


# --- one run (in its own process) ------------------------------------------------------------
def build_model(name: str, dtype):
    import torch

    if name == "smollm2":
        from evolm.interop.gguf import find_asset
        from evolm.loading import load

        model, _ = load(find_asset("smollm2"), dtype=dtype)
        return model.train()
    from evolm.model import build

    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the target dtype: no float32 copy of 1B weights
    try:
        model = build(name)
    finally:
        torch.set_default_dtype(before)
    return model.train()


def run_one(name: str, mode: str, seq: int, targets: str) -> dict:
    import torch

    from evolm.post.lora import LoRAConfig, apply_lora, trainable_parameters
    from evolm.quant.nf4 import quantize_base_nf4

    torch.manual_seed(0)
    rss_start = _status("VmRSS")
    dtype = torch.float32 if mode in ("full", "lora") else torch.bfloat16
    model = build_model(name, dtype)
    if mode != "full":
        apply_lora(model, LoRAConfig(r=16, alpha=32, targets=targets))
    if mode == "qlora":
        quantize_base_nf4(model)
    _trim()
    trainable, total = trainable_parameters(model)
    weights = tensor_bytes(list(model.parameters()) + list(model.buffers()))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (1, seq + 1))

    saved: list = []

    def pack(t):
        saved.append(t)
        return t

    _trim()
    rss_before = _status("VmRSS")
    _reset_peak()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids[:, :-1], targets=ids[:, 1:])
    act = tensor_bytes(saved, exclude={t.untyped_storage().data_ptr()
                                      for t in list(model.parameters()) + list(model.buffers())})
    saved.clear()
    loss.backward()
    opt.step()
    dt = time.perf_counter() - t0
    peak = _status("VmHWM")
    state = tensor_bytes([p.grad for p in params if p.grad is not None] +
                         [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.ndim])
    return {"model": name, "mode": mode, "trainable": trainable, "total": total, "weight_bytes": weights,
            "grad_optim_bytes": state, "activation_bytes": act, "rss_start": rss_start, "rss_before_step": rss_before,
            "peak_rss_step": peak, "step_s": round(dt, 2), "loss": round(loss.item(), 4), "measured": True}


# --- driver ----------------------------------------------------------------------------------
def estimate(name: str, mode: str, targets: str) -> dict:
    """Bytes a mode needs without running it: tensors of the model + gradients + AdamW state."""
    from evolm.model import build
    from evolm.post.lora import LoRAConfig, apply_lora, trainable_parameters

    cfg_name = "smollm2-135m" if name == "smollm2" else name
    model = build(cfg_name, device="meta")
    total = model.num_params()
    if mode == "full":
        return {"model": name, "mode": mode, "trainable": total, "total": total, "weight_bytes": 4 * total,
                "grad_optim_bytes": 12 * total, "measured": False}
    apply_lora(model, LoRAConfig(r=16, alpha=32, targets=targets))
    trainable, _ = trainable_parameters(model)
    return {"model": name, "mode": mode, "trainable": trainable, "total": total, "measured": False,
            "weight_bytes": (4 if mode == "lora" else 2) * total, "grad_optim_bytes": 12 * trainable}


def gb(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def table(rows: list[dict]) -> str:
    head = ("model", "mode", "trainable", "% of total", "weights GiB", "grads+AdamW GiB", "saved act. GiB",
            "RSS after imports GiB", "peak RSS in step GiB", "step s")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        pct = 100 * r["trainable"] / r["total"]
        peak = gb(r.get("peak_rss_step")) if r["measured"] else "not run (needs ~" + \
            gb(r["weight_bytes"] + r["grad_optim_bytes"]) + " GiB)"
        lines.append("| " + " | ".join([r["model"], r["mode"], f"{r['trainable']:,}", f"{pct:.3f}%",
                                         gb(r["weight_bytes"]), gb(r["grad_optim_bytes"]),
                                         gb(r.get("activation_bytes")), gb(r.get("rss_start")), peak,
                                         str(r.get("step_s", "-"))]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="smollm2,llama-3.2-1b")
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--targets", default="q_proj,v_proj")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.seq, args.targets)))
        return
    rows = []
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072", MALLOC_TRIM_THRESHOLD_="131072")
    for name in args.models.split(","):
        for mode in args.modes.split(","):
            if mode not in MODES:
                raise SystemExit(f"unknown mode {mode!r}; expected one of {MODES}")
            est = estimate(name, mode, args.targets)
            need = est["weight_bytes"] + est["grad_optim_bytes"]
            if need * 1.2 > _available():
                print(f"{name} {mode}: skipped, needs ~{gb(need)} GiB, {gb(_available())} GiB available",
                      file=sys.stderr)
                rows.append(est)
                continue
            out = subprocess.run([sys.executable, __file__, "--one", name, mode, "--seq", str(args.seq),
                                  "--targets", args.targets], capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{name} {mode}: failed")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{name} {mode}: peak {gb(row['peak_rss_step'])} GiB, step {row['step_s']} s", file=sys.stderr)
            rows.append(row)
    print(json.dumps(rows, indent=2) if args.json else table(rows))


if __name__ == "__main__":
    main()
