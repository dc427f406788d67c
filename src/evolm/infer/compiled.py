"""The compiled decode step and prompt pass: ``torch.compile``, a static cache, no dynamo per token.

gpt-fast's recipe: decode from a ``StaticKVCache`` through one ``torch.compile``-d step, so the
thousand small kernels of a step become a few fused loops. This module holds everything that
makes that step fast and nothing of the decoding loop itself (:mod:`evolm.infer.decode`):

- :func:`compiled_step` / :func:`compiled_prefill`: one compiled function per device type (its
  options, e.g. inductor's C++ wrapper, are fixed per compilation), shared by every model.
- :class:`_DecodeLinear`: inside the CPU step, few-row ``F.linear`` calls go to the kernels
  measured fastest for them; which ones is the :class:`~evolm.quant.policy.KernelPolicy`'s choice,
  baked into the mode class handed to the step (dynamo guards on it; nothing global changes).
- Calling the step's graph without dynamo once a generate call is steady (below), and replaying
  it as one CUDA graph on a GPU (:func:`_cuda_graphed`).

Calling the graph directly.

Every call of a ``torch.compile``'d function goes through dynamo: it checks the guards of its
cached entries (for a SmolLM2 step: ~370 tensors reached through ~200 modules, 0.3-0.45 ms
measured), then runs bytecode that fetches each of those tensors from the module tree again
(~0.3 ms), before the compiled graph itself runs. A decode step of a 135M model is ~13 ms, so
that is several percent of every token, spent on a question whose answer cannot change within
one generate call: the model, the cache object and every shape stay the same, only tensor
values change (the premise of ``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, which
on this graph still evaluates nearly every guard, because they all feed the tensor-aliasing check).

So the step is compiled with a backend that is inductor plus a note of where each graph input
comes from (dynamo's own source expression for it, e.g. ``L['model']._modules['norm']
._parameters['weight']``, kept on the placeholder node). After a step has run through dynamo
(every guard checked), :func:`bind_last_graph` resolves the inputs that belong to the model once and returns
a function that gathers the rest (token, position, cache tensors) and calls the graph. Only
graphs whose single output is the step's result are bound: a graph with more outputs has Python
side effects dynamo would replay, and those keep the dynamo path.
"""

from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from evolm import kernels
from evolm.cache import PrefillKV
from evolm.nn.attention import Attention
from evolm.nn.mla import MultiHeadLatentAttention
from evolm.quant.policy import DEFAULT_POLICY, KernelPolicy


# ------------------------------------------------------------------------------------------
# the graph of the last compiled call, called without dynamo
# ------------------------------------------------------------------------------------------
_last: list = [None]  # the bindable entry of the compiled graph that ran last (None: not bindable)
# graphs run since forget_last_graph: a step that dynamo broke into several graphs (the later ones
# read the resumed frame's stack) cannot be replaced by its last graph alone
_runs: list = [0]


class _Entry:
    __slots__ = ("fn", "fixed", "varying", "n")

    def __init__(self, fn, fixed, varying, n):
        self.fn, self.fixed, self.varying, self.n = fn, fixed, varying, n


def _entry(gm: torch.fx.GraphModule, fn) -> _Entry | None:
    """The graph's inputs as getters of dynamo's frame locals ``L``, or None if it is not bindable."""
    output = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if not isinstance(output, (tuple, list)) or len(output) != 1:
        return None
    fixed, varying = [], []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, node in enumerate(placeholders):
        arg = node.meta.get("grapharg")
        source = getattr(arg, "source", None)
        if source is None:
            return None
        expr = source.name() if callable(source.name) else source.name
        if not expr.startswith("L[") or expr.startswith("L['___"):
            return None  # a global, a constant, or dynamo's own temporary after a graph break: not a frame local
        getter = eval(f"lambda L: {expr}")  # noqa: S307 - dynamo's own source expression
        (fixed if expr.startswith("L['model']") else varying).append((i, getter))
    return _Entry(fn, fixed, varying, len(placeholders))


def graph_backend(options: dict | None) -> Callable:
    """A ``torch.compile`` backend: inductor with ``options``, and a record of each graph's inputs."""

    def compile_(gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        fn = compile_fx(gm, example_inputs, config_patches=options or {})
        entry = _entry(gm, fn)

        def run(*args):
            _last[0] = entry
            _runs[0] += 1
            return fn(*args)

        return run

    return compile_


def forget_last_graph() -> None:
    """Forget which graph ran last (call before the dynamo step that :func:`bind_last_graph` will follow)."""
    _last[0] = None
    _runs[0] = 0


def bind_last_graph(**frame_locals) -> Callable | None:
    """The graph that ran last, bound to these frame locals (the compiled function's arguments):
    a function of the same arguments that calls the graph without dynamo. None if that graph is
    not bindable. Only valid while the model and every shape stay those of the dynamo step."""
    entry = _last[0]
    if entry is None or _runs[0] != 1:
        return None
    template = [None] * entry.n
    for i, get in entry.fixed:
        template[i] = get(frame_locals)
    varying, fn = entry.varying, entry.fn

    def call(**now):
        args = list(template)
        for i, get in varying:
            args[i] = get(now)
        return fn(*args)[0]

    return call


# ------------------------------------------------------------------------------------------
# the compiled decode step (gpt-fast style): static cache, one graph per (model, batch, dtype)
# ------------------------------------------------------------------------------------------
class _DecodeLinear(TorchFunctionMode):
    """Inside the compiled CPU step: ``F.linear`` over a few rows runs a kernel built for it.

    Decoding multiplies one row per sequence by every weight matrix, so a step is bound by how fast
    the weights stream from memory. The BLAS kernels ``F.linear`` reaches are tuned for many rows:
    at 1-16 rows they stream fp32 and bf16 weights at a third to a half of the read bandwidth. One
    fp32 row becomes, on AVX-512 CPUs, the multiply-reduce ``(x * W).sum(-1)``, which inductor
    turns into a vectorised loop reading each thread's share of W as one sequential stream (2-3x the
    BLAS GEMV; end to end level with evolm's kernel there); one bf16 row, and one fp32 row on
    AVX2-only CPUs, go to the kernel (``KernelPolicy.row1_kernel``, docs/performance.md). 2-16 rows
    go, where evolm's kernels build, to ``evolm_f::skinny_linear`` (each weight vector loaded once
    and multiplied into every row; evolm/kernels/skinny_gemm.cpp; 2-3x ``F.linear`` end to end at
    batch 8 in fp32), else keep ``F.linear``. The choices are class attributes: :func:`_decode_linear`
    makes one subclass per choice.
    """

    skinny = False  # 2..SKINNY_ROWS rows (and one row of the dtypes in row_kernel) to skinny_linear
    row_kernel: dict = {}  # weight dtype -> whether one row goes to skinny_linear too

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x, w = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            rows = x.numel() // max(x.shape[-1], 1)
            if x.device.type == "cpu" and rows <= kernels.SKINNY_ROWS:
                kernel = (self.skinny and x.dtype == w.dtype and w.dtype in (torch.float32, torch.bfloat16)
                          and (rows > 1 or self.row_kernel[w.dtype]))
                if kernel:
                    y = torch.ops.evolm_f.skinny_linear(x.reshape(rows, -1), w.contiguous())
                elif rows == 1:
                    y = (x.reshape(1, -1).float() * w.float()).sum(-1).to(x.dtype)
                else:
                    return func(*args, **kwargs)
                y = y.reshape(*x.shape[:-1], w.shape[0])
                return y if bias is None else y + bias
        return func(*args, **kwargs)


@functools.cache
def _decode_linear(skinny: bool, row_f32: bool, row_bf16: bool) -> type[_DecodeLinear]:
    """The :class:`_DecodeLinear` of these choices: one class per choice, so that the compiled step
    (which enters the class it is given) is traced once per choice and guarded on it."""
    return type("_DecodeLinear", (_DecodeLinear,),
                {"skinny": skinny, "row_kernel": {torch.float32: row_f32, torch.bfloat16: row_bf16}})


def decode_linear_mode(device_type: str, policy: KernelPolicy) -> type[_DecodeLinear]:
    """The policy's few-row products for a step on ``device_type`` (builds the CPU kernels on first
    use: never inside the trace, and never for a GPU step)."""
    skinny = policy.uses_skinny(device_type)
    rows = [skinny and policy.row1_kernel(dt) == "skinny" for dt in (torch.float32, torch.bfloat16)]
    return _decode_linear(skinny, *rows)


def use_attention_policy(model, policy: KernelPolicy, device_type: str) -> None:
    """Set the policy's decode-attention choices on the model's attention layers, before anything
    is compiled (every compiled graph of the model is guarded on them, so the prompt pass and the
    step see the same values from the first call on): ``evolm_f::decode_attention`` where the
    few-row kernels are used and the policy wants it, and multiply-reduce loops (``attn_loops``)."""
    decode_kernel = policy.decode_attention and policy.uses_skinny(device_type)
    for m in model.modules():
        if isinstance(m, (Attention, MultiHeadLatentAttention)):
            m.decode_kernel, m.attn_loops = decode_kernel, policy.attn_loops


def _step(model, tok: torch.Tensor, pos: torch.Tensor, cache, mode: type[_DecodeLinear]) -> torch.Tensor:
    with mode():
        return model(tok, position_ids=pos, cache=cache, last_only=True)[:, -1]


def _step_cpu(model, tok, pos, cache, mode):
    return _step(model, tok, pos, cache, mode)


def _step_other(model, tok, pos, cache, mode):
    return _step(model, tok, pos, cache, mode)


_compiled_steps: dict = {}  # device type -> the compiled step (a memo: compiled once per process)


def _cpp_wrapper(device_type: str, policy: KernelPolicy) -> bool:
    """Whether the compiled step calls its kernels from C++: on CPU, unless the policy says no."""
    return device_type == "cpu" and policy.cpp_wrapper


def compiled_step(device_type: str = "cpu", policy: KernelPolicy = DEFAULT_POLICY) -> Callable:
    """``torch.compile`` of one decode step over a ``StaticKVCache`` in static mode.

    Decoding a small model on a CPU spends much of each step in Python and in launching a
    thousand small kernels (30 layers x ~40 ops); compiling the whole step into one graph runs
    the element-wise work as fused C++ loops and calls the matmuls directly. Positions live in
    tensors, the cache length is a dynamic dimension and every other shape is fixed, so the
    graph is built once per (model structure, batch, dtype) and reused at every step and every
    later call, whatever the prompt length (check with ``torch._dynamo.utils.counters``).
    Parameters are graph inputs, so two models of the same configuration share the graph.

    On CPU the graph's driver is C++ too (inductor's ``cpp_wrapper``): the Python wrapper that
    calls the ~400 kernels of a SmolLM2 step one by one cost ~4 ms of a ~18 ms step (profiled,
    int4 weights, 2 threads); in C++ the step decodes 10-18% more tokens per second
    (docs/performance.md), for ~40 s more compilation the first time (inductor caches it).

    Returns ``step(model, tok, pos, cache) -> logits`` with the ``policy``'s kernels: the few-row
    products (:class:`_DecodeLinear`) and decode attention (set on the model's layers).
    """
    mode = decode_linear_mode(device_type, policy)
    if device_type not in _compiled_steps:
        # each (structure, batch, dtype) is one more entry on the same code object: allow many
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        opts = {"cpp_wrapper": True} if _cpp_wrapper(device_type, policy) else None
        # distinct code objects: dynamo keeps compiled code per code object, options per compile
        step = _step_cpu if device_type == "cpu" else _step_other
        _compiled_steps[device_type] = torch.compile(step, dynamic=False, backend=graph_backend(opts))
    compiled = _compiled_steps[device_type]

    def step(model, tok: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
        use_attention_policy(model, policy, device_type)
        return compiled(model, tok, pos, cache, mode)

    return step



def _prefill_graph(model, ids: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None,
                   kv: PrefillKV) -> torch.Tensor:
    return model(ids, position_ids=pos, attention_mask=mask, cache=kv, last_only=True)[:, -1]


def _prefill_cpu(model, ids, pos, mask, kv):
    return _prefill_graph(model, ids, pos, mask, kv)


def _prefill_other(model, ids, pos, mask, kv):
    return _prefill_graph(model, ids, pos, mask, kv)


_compiled_prefills: dict = {}  # device type -> the compiled prefill (a memo, as _compiled_steps)


def compiled_prefill(device_type: str = "cpu"):
    """``torch.compile`` of a prompt's forward pass from an empty cache (see :class:`evolm.cache.PrefillKV`).

    A prompt's time is the matrix products (80% of it on a CPU, the same oneDNN/BLAS calls as any
    engine's) plus ~15 element-wise passes per layer over (B, T, d) activations: norms, rotary,
    activation times gate, residual adds. Compiled, those become a few fused loops: a 256-token
    prompt ran 8-13% faster in bf16 and 0-6% in fp32 than the eager forward on 2 Zen 4 cores
    (docs/performance.md). The prompt length is a dynamic dimension: one graph per (model
    structure, batch, dtype) serves prompts of every length (of more than one token).
    """
    if device_type not in _compiled_prefills:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        # distinct code objects per device type, as for the compiled step
        fn = _prefill_cpu if device_type == "cpu" else _prefill_other
        _compiled_prefills[device_type] = torch.compile(fn, dynamic=None)
    return _compiled_prefills[device_type]


def _cuda_graphed(direct: Callable) -> Callable:
    """The bound compiled step (``direct``) replayed as one CUDA graph.

    On a GPU a decode step of a small model is a few hundred short kernels, and launching them
    from the CPU (a few microseconds each) takes longer than running them: the GPU waits on
    Python and the driver. A CUDA graph records the step's launches once and replays them with a
    single call (what gpt-fast and inductor's "reduce-overhead" mode do). Every input of the step
    is a fixed tensor here: the weights, the static cache (written in place at ``cache.pos``,
    which the step itself advances), and the token and position, which are copied into two
    buffers the graph reads. The first call runs the step for real on a side stream (lazy
    initialisations must not happen during capture), the second captures and replays it, later
    ones only replay. The logits returned live in the graph's memory and are overwritten by the
    next replay, so they are used before it (as the decoding loop does). ``KernelPolicy.cuda_graph``
    off turns it off.
    """
    state: dict = {}

    def call(model, tok, pos, cache):
        if "graph" in state:
            state["tok"].copy_(tok)
            state["pos"].copy_(pos)
            state["graph"].replay()
            return state["out"]
        if "tok" not in state:  # first call: a real step, on a side stream of the model's GPU
            state["tok"], state["pos"] = tok.clone(), pos.clone()
            with torch.cuda.device(tok.device):
                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    out = direct(model=model, tok=state["tok"], pos=state["pos"], cache=cache)
                torch.cuda.current_stream().wait_stream(side)
            return out
        if state.get("failed"):
            return direct(model=model, tok=tok, pos=pos, cache=cache)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.device(tok.device), torch.cuda.graph(graph):
                state["out"] = direct(model=model, tok=state["tok"], pos=state["pos"], cache=cache)
        except Exception as e:  # nothing ran during the capture: decode on without the graph
            warnings.warn(f"evolm: the decode step could not be captured as a CUDA graph, running it "
                          f"uncaptured ({type(e).__name__}: {e})")
            state["failed"] = True
            return call(model, tok, pos, cache)
        state["graph"] = graph
        return call(model, tok, pos, cache)

    call.state = state  # for tests: "graph" in it once captured
    return call


def first_step(step_fn, model, tok, pos, cache, policy: KernelPolicy = DEFAULT_POLICY,
               ) -> tuple[torch.Tensor, Callable | None]:
    """One compiled decode step through dynamo (every guard checked), and the same graph bound for
    the next steps of this call without dynamo (:func:`bind_last_graph`; None where it cannot be
    bound or the policy has ``direct_step`` off), replayed as a CUDA graph on a GPU."""
    forget_last_graph()
    logits = step_fn(model, tok, pos, cache)
    direct = bind_last_graph(model=model, tok=tok, pos=pos, cache=cache) if policy.direct_step else None
    if direct is not None and tok.device.type == "cuda" and policy.cuda_graph:
        direct = _cuda_graphed(direct)
    return logits, direct
