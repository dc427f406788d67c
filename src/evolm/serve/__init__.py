"""Serving: an OpenAI-compatible HTTP server with continuous batching and a web chat page.

``evolm serve --model PATH`` (or :func:`run_server`) loads any model ``evolm.load`` reads -- a
Hugging Face folder, a GGUF file, an evolm checkpoint -- and serves it on 127.0.0.1:8000:

- ``evolm.serve.scheduler``: the :class:`Engine`, which batches the decode steps of concurrent
  requests (continuous batching) over a slot KV cache;
- ``evolm.serve.app``: the FastAPI app (``/v1/models``, ``/v1/completions``,
  ``/v1/chat/completions``, ``/health``) and OpenAI-style errors;
- ``static/index.html``: the chat page served at ``/`` (plain HTML and JavaScript, no build step).

This module imports nothing heavy, so the CLI can build its parser without FastAPI installed;
the ``serve`` extra (``pip install 'evolm[serve]'``) brings fastapi and uvicorn.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from evolm.infer.prepare import InferenceOptions


def model_id(model_path: str | os.PathLike) -> str:
    """The name clients use for the model: the file's stem or the folder's name."""
    p = Path(model_path)
    return p.stem if p.is_file() else (p.resolve().name or str(p))


def _default_inference():
    """What serving uses without options: float32 on the CPU, the fast path chosen for the model
    (:func:`evolm.infer.prepare.choose_path`: a GGUF file's blocks kept, projections fused)."""
    from evolm.infer.prepare import InferenceOptions

    return InferenceOptions(device="cpu", dtype="float32")


def in_own_thread(fn):
    """``fn()`` run in a thread of its own, which ends before this returns (its result, or its error).

    Why: the model is loaded and prepared in one thread and decoded in the engine's. With GNU OpenMP
    (PyTorch's CPU builds) a thread that ran a parallel region keeps a pool of worker threads; once a
    process holds more of them than it has cores, libgomp's workers stop spinning almost at once and
    every parallel region waits for them to wake. Loaded on the main thread, a server on 2 cores decoded
    at half the speed of ``evolm generate`` (SmolLM2 Q4_1: ~33 against ~15 ms a token, measured); a
    loading thread's pool ends with the thread, so the engine's thread holds the only workers.
    """
    import threading

    out: dict = {}

    def run():
        try:
            out["value"] = fn()
        except BaseException as e:  # handed to the caller's thread
            out["error"] = e

    t = threading.Thread(target=run, name="evolm-load")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]


def build_app(model_path: str | os.PathLike, inference: InferenceOptions | None = None, api_key: str | None = None,
              max_batch: int = 8, max_model_len: int | None = None, served_model_name: str | None = None,
              min_decode_rows: int | None = None, max_body_bytes: int | None = None):
    """Load the model and return ``(app, engine)``; the app starts the engine when it starts.
    ``inference``: an :class:`evolm.infer.prepare.InferenceOptions` (device, dtype, fused
    projections, int8/int4 linears, a GGUF file's quantized blocks kept), the same preparation
    ``evolm generate`` makes; default: float32 on the CPU, fast path chosen for the model. ``max_body_bytes``: larger request
    bodies get a 413 (default ``evolm.serve.app.MAX_BODY_BYTES``, 8 MiB)."""
    try:
        from evolm.infer.prepare import load_for_inference
        from evolm.serve.app import create_app
        from evolm.serve.scheduler import Engine
    except ImportError as e:
        raise ImportError(f"evolm serve needs fastapi and uvicorn: pip install 'evolm[serve]' ({e})") from None
    def load():
        model, tokenizer = load_for_inference(model_path, inference or _default_inference())
        return Engine(model, tokenizer, max_batch=max_batch, max_len=max_model_len, min_decode_rows=min_decode_rows)

    engine = in_own_thread(load)
    limits = {} if max_body_bytes is None else {"max_body_bytes": max_body_bytes}
    app = create_app(engine, served_model_name or model_id(model_path), api_key=api_key, **limits)
    return app, engine


def run_server(model_path: str | os.PathLike, inference: InferenceOptions | None = None, host: str = "127.0.0.1",
               port: int = 8000, api_key: str | None = None, max_batch: int = 8, max_model_len: int | None = None,
               served_model_name: str | None = None, min_decode_rows: int | None = None, log_level: str = "info",
               threads: int | None = None, max_body_bytes: int | None = None) -> None:
    """Serve ``model_path`` until interrupted (what ``evolm serve`` runs), prepared as
    ``inference`` (:class:`evolm.infer.prepare.InferenceOptions`) asks; see :func:`build_app`.

    Binds ``host`` (loopback by default: pass ``0.0.0.0`` to expose it, ideally with an
    ``api_key``). ``max_batch`` requests decode together; more wait in line. ``max_model_len``
    caps prompt + completion tokens (the model's context length by default); the KV cache grows
    to at most ``max_batch * max_model_len`` tokens.
    """
    import torch
    import uvicorn

    if threads:
        torch.set_num_threads(threads)
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log = logging.getLogger("evolm.serve")
    if api_key is None:
        api_key = os.environ.get("EVOLM_API_KEY") or None
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        log.warning("binding %s without --api-key: anyone who can reach this port can use the model", host)
    app, engine = build_app(model_path, inference, api_key=api_key, max_batch=max_batch,
                            max_model_len=max_model_len, served_model_name=served_model_name,
                            min_decode_rows=min_decode_rows, max_body_bytes=max_body_bytes)
    c = engine.model.config
    dtype = str(engine.model.dtype).removeprefix("torch.")
    log.info("serving %s (%s on %s, %d layers, context %d) on http://%s:%d with max_batch=%d",
             served_model_name or model_id(model_path), dtype, engine.device, c.n_layers, engine.max_len, host,
             port, max_batch)
    uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=log_level == "debug")


def add_arguments(parser) -> None:
    """The ``evolm serve`` options of serving itself (argparse), kept here next to what they
    configure; the loading and preparation flags are generate's (``evolm.cli``)."""
    parser.add_argument("--model", required=True, help="HF folder, .gguf file or evolm checkpoint")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer KEY' on /v1 (default: $EVOLM_API_KEY, else none)")
    parser.add_argument("--max-batch", type=int, default=8, help="requests decoded together (slots)")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="cap on prompt + completion tokens (default: the model's context length)")
    parser.add_argument("--served-model-name", default=None, help="model id clients send (default: file/folder name)")
    parser.add_argument("--min-decode-rows", type=int, default=None,
                        help="pad decode steps to this many rows so greedy output is the same alone or "
                             "batched (default: 1 where the model decodes through row kernels -- a GGUF "
                             "file's blocks with the CPU block step -- else 4; 1: faster single streams, "
                             "exactness then not guaranteed for dense models)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--max-body-bytes", type=int, default=None,
                        help="refuse larger request bodies with 413 (default: 8 MiB)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


__all__ = ["run_server", "build_app", "add_arguments", "model_id", "in_own_thread"]
