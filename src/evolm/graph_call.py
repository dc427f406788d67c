"""Calling a compiled decode step's graph directly, without dynamo, once a generate call is steady.

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
(every guard checked), :func:`bind` resolves the inputs that belong to the model once and returns
a function that gathers the rest (token, position, cache tensors) and calls the graph. Only
graphs whose single output is the step's result are bound: a graph with more outputs has Python
side effects dynamo would replay, and those keep the dynamo path.
"""

from __future__ import annotations

from typing import Callable

import torch

_last: list = [None]  # the bindable entry of the compiled graph that ran last (None: not bindable)


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
        if not expr.startswith("L["):
            return None  # a global or a constant: not a frame local
        getter = eval(f"lambda L: {expr}")  # noqa: S307 - dynamo's own source expression
        (fixed if expr.startswith("L['model']") else varying).append((i, getter))
    return _Entry(fn, fixed, varying, len(placeholders))


def backend(options: dict | None) -> Callable:
    """A ``torch.compile`` backend: inductor with ``options``, and a record of each graph's inputs."""

    def compile_(gm: torch.fx.GraphModule, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        fn = compile_fx(gm, example_inputs, config_patches=options or {})
        entry = _entry(gm, fn)

        def run(*args):
            _last[0] = entry
            return fn(*args)

        return run

    return compile_


def reset() -> None:
    """Forget which graph ran last (call before the dynamo step that :func:`bind` will follow)."""
    _last[0] = None


def bind(**frame_locals) -> Callable | None:
    """The graph that ran last, bound to these frame locals (the compiled function's arguments):
    a function of the same arguments that calls the graph without dynamo. None if that graph is
    not bindable. Only valid while the model and every shape stay those of the dynamo step."""
    entry = _last[0]
    if entry is None:
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
