"""Chat templates rendered in a sandbox with a budget of time, loop iterations and characters.

A chat template is a Jinja2 program that comes with the model files, so a server that loads a
model runs code written by whoever made the file. Jinja's ``ImmutableSandboxedEnvironment``
(what transformers uses) stops attribute escapes and mutation, but not work: two nested
``range(100000)`` loops run for hours, and ``'x' * 10**10`` or a string doubled in a loop fills
the memory. Each render here carries a :class:`RenderBudget`:

- time: a deadline, checked on every loop step, call, filter, operator and output;
- loop iterations: every ``{% for %}`` is wrapped (by rewriting the parsed template) in a counter;
- characters: a ceiling on any single value and on the total output, and a (larger) ceiling on
  the characters all operations produce together. Operations that can grow a value by a factor
  (``*``, ``+``, ``~``, ``%``, ``**``, ``join``, ``replace``, ``center``, ``indent``, ``format``,
  ``str.ljust`` ...) are checked *before* they run, so no single step allocates past the ceiling.

A template that exceeds it raises :class:`TemplateBudgetError` (a ``TokenizerError``) naming the
template and the limit. Everything else is the environment transformers renders in
(``trim_blocks``/``lstrip_blocks``, ``loopcontrols``, ``raise_exception``, ``strftime_now``, a
non-escaping ``tojson``, ``{% generation %}``), so real templates render byte for byte as there;
only ``pprint`` (unbounded growth with nesting, used by no chat template) is left out.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable

import jinja2
import jinja2.ext
from jinja2 import nodes, pass_context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from evolm.tokenizer import TokenizerError


@dataclass(frozen=True)
class RenderBudget:
    """What one render of a chat template may spend. The defaults are far above what real
    templates need (a 100-turn conversation renders in milliseconds, a few thousand loop steps,
    output the size of the messages) and far below what hurts a server."""

    seconds: float = 2.0           # wall-clock time of one render
    iterations: int = 200_000      # {% for %} steps, all loops together
    chars: int = 4_000_000         # longest single value (string or list), and the whole output
    work_chars: int = 32_000_000   # characters produced by all operations together
    int_bits: int = 100_000        # largest integer an operator may produce


DEFAULT_BUDGET = RenderBudget()


class TemplateBudgetError(TokenizerError):
    """A chat template that needs more than its :class:`RenderBudget` (or nests too deep)."""


_ITER, _OUT, _CONCAT = "evolm_budget_iter", "evolm_budget_output", "evolm_budget_concat"
_ACTIVE: contextvars.ContextVar["_Meter | None"] = contextvars.ContextVar("evolm_template_meter", default=None)


class _Meter:
    """The spending of one render against its budget."""

    def __init__(self, budget: RenderBudget, label: str):
        self.budget, self.label = budget, label
        self.deadline = time.monotonic() + budget.seconds
        self.iterations = self.output = self.work = 0

    def fail(self, what: str, field: str | None = None) -> None:
        limit = f" (RenderBudget.{field}={getattr(self.budget, field)})" if field else ""
        raise TemplateBudgetError(f"{self.label} exceeds its rendering budget: {what}{limit}")

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            self.fail(f"rendering took more than {self.budget.seconds:g} s", "seconds")

    def step(self) -> None:
        self.iterations += 1
        if self.iterations > self.budget.iterations:
            self.fail(f"more than {self.budget.iterations} loop iterations", "iterations")
        self.tick()

    def expect(self, size: int, what: str = "a value") -> None:
        """Refuse, before computing it, a value of ``size`` characters (or items)."""
        if size > self.budget.chars:
            self.fail(f"{what} of {size} characters/items", "chars")

    def produced(self, value: Any) -> Any:
        """Charge a computed value to the work total; returns it."""
        size = _size(value)
        if size:
            self.expect(size)
            self.work += size
            if self.work > self.budget.work_chars:
                self.fail(f"operations produced more than {self.budget.work_chars} characters", "work_chars")
        self.tick()
        return value

    def emit(self, value: Any) -> None:
        self.output += len(value) if isinstance(value, str) else len(str(value))
        if self.output > self.budget.chars:
            self.fail(f"output longer than {self.budget.chars} characters", "chars")
        self.tick()

    def int_result(self, bits: float) -> None:
        if bits > self.budget.int_bits:
            self.fail(f"an integer of about {int(bits)} bits", "int_bits")


def _meter() -> _Meter:
    m = _ACTIVE.get()
    return m if m is not None else _Meter(DEFAULT_BUDGET, "chat template")  # outside render(): limits still hold


def _size(x: Any) -> int:
    return len(x) if isinstance(x, (str, bytes, list, tuple, dict)) else 0


def _text_len(x: Any) -> int:
    return len(x) if isinstance(x, (str, bytes)) else len(str(x))


# ------------------------------------------------------------------------------------------
# size estimates made before an operation runs
# ------------------------------------------------------------------------------------------
_FORMAT_NUMBER = re.compile(r"\d+")
_NESTED_FIELD = re.compile(r"\{[^{}]*\{")


def _check_format(m: _Meter, fmt: Any, args: tuple, kwargs: dict) -> None:
    """``'%0999999999d' % 1``, ``'{:>999999999}'.format(1)``: widths in the format string, or taken
    from the arguments (``%*d``, ``{:{w}}``), may not exceed the value ceiling."""
    fmt = fmt if isinstance(fmt, str) else str(fmt)
    limit = m.budget.chars
    digits = len(str(limit))
    for run in _FORMAT_NUMBER.findall(fmt):
        if len(run) > digits or int(run) > limit:
            m.fail(f"a format width of {run[:20]}", "chars")
    if "*" in fmt or _NESTED_FIELD.search(fmt):
        flat = list(args) + list(kwargs.values())
        for a in list(flat):
            if isinstance(a, (tuple, list)):
                flat.extend(a)
            elif isinstance(a, dict):
                flat.extend(a.values())
        for a in flat:
            if isinstance(a, int) and abs(a) > limit:
                m.fail(f"a format width of {a}", "chars")


def _replace_size(s: Any, old: Any, new: Any, count: Any = -1) -> int:
    s, old, new = (x if isinstance(x, (str, bytes)) else str(x) for x in (s, old, new))
    hits = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return len(s) + hits * max(0, len(new) - len(old))


def _join_size(items: list, sep: Any) -> int:
    return sum(_text_len(x) for x in items) + _text_len(sep) * max(0, len(items) - 1)


def _width(value: Any, width: Any) -> int:
    return max(_text_len(value), width if isinstance(width, int) else 0)


def _indent_size(s: Any, width: Any = 4, *_: Any, **__: Any) -> int:
    s = s if isinstance(s, str) else str(s)
    per_line = width if isinstance(width, int) else _text_len(width)
    return len(s) + (s.count("\n") + 1) * max(0, per_line)


def _wordwrap_size(s: Any, width: Any = 79, break_long_words: Any = True, wrapstring: Any = None,
                   *_: Any, **__: Any) -> int:
    s = s if isinstance(s, str) else str(s)
    breaks = len(s) // max(1, width if isinstance(width, int) else 1) + s.count("\n") + 1
    return len(s) + breaks * (_text_len(wrapstring) if wrapstring is not None else 1)


def _urlize_size(s: Any, trim_url_limit: Any = None, nofollow: Any = False, target: Any = None,
                 rel: Any = None, *_: Any, **__: Any) -> int:
    n = _text_len(s)
    extra = sum(_text_len(x) for x in (target, rel) if x is not None) + 64
    return 3 * n + (n // 4 + 1) * extra  # each link (4+ characters) is written twice, plus attributes


def _sequence_size(value: Any, count: Any = 0, *_: Any, **__: Any) -> int:
    return _size(value) + (count if isinstance(count, int) else 0)


def _sum_size(items: list, attribute: Any = None, start: Any = 0) -> int:
    return _size(start) + sum(_size(x) for x in items)


def _lipsum_size(n: Any = 5, html: Any = True, min: Any = 20, max: Any = 100) -> int:
    return (n if isinstance(n, int) else 0) * (max if isinstance(max, int) else 0) * 16


# filter name -> size of its result (value, *args, **kwargs); join and sum see a list
_FILTER_SIZES: dict[str, Callable[..., int]] = {
    "replace": lambda v, old="", new="", count=None, *_, **__: _replace_size(v, old, new, -1 if count is None else count),
    "join": lambda items, d="", *_, **__: _join_size(items, d),
    "center": lambda v, width=80, *_, **__: _width(v, width),
    "indent": _indent_size,
    "wordwrap": _wordwrap_size,
    "urlize": _urlize_size,
    "batch": _sequence_size,
    "slice": _sequence_size,
    "sum": _sum_size,
    "truncate": lambda v, length=255, killwords=False, end="...", *_, **__: _text_len(v) + _text_len(end),
}
_MATERIALIZE = {"join", "sum"}  # filters whose (possibly lazy) input is listed before measuring

# str/bytes method name -> size of its result (self, *args, **kwargs)
_METHOD_SIZES: dict[str, Callable[..., int]] = {
    "replace": _replace_size,
    "join": lambda sep, items: _join_size(items, sep),
    "ljust": lambda s, width, *_: _width(s, width),
    "rjust": lambda s, width, *_: _width(s, width),
    "center": lambda s, width, *_: _width(s, width),
    "zfill": _width,
    "expandtabs": lambda s, tabsize=8: len(s) + s.count("\t" if isinstance(s, str) else b"\t") * max(0, tabsize),
    "translate": lambda s, table: len(s) * max([1] + [_text_len(v) for v in table.values() if v is not None]
                                                if isinstance(table, dict) else [1]),
}


# ------------------------------------------------------------------------------------------
# the environment
# ------------------------------------------------------------------------------------------
class _BudgetedEnvironment(ImmutableSandboxedEnvironment):
    """transformers' sandbox, metering calls, attribute lookups and the growing operators."""

    intercepted_binops = frozenset({"*", "+", "%", "**"})
    budget: RenderBudget = DEFAULT_BUDGET
    label: str = "chat template"

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's convention)
        m = _meter()
        m.tick()
        owner = getattr(__obj, "__self__", None)
        name = getattr(__obj, "__name__", "")
        if isinstance(owner, (str, bytes)) and name in _METHOD_SIZES:
            if name == "join":
                args = (list(args[0]),) + args[1:] if args else args
            try:
                m.expect(_METHOD_SIZES[name](owner, *args, **kwargs), f"the result of .{name}()")
            except TypeError:
                pass  # wrong arguments: the call below says so
        elif getattr(__obj, "_evolm_lipsum", False):
            m.expect(_lipsum_size(*args, **kwargs), "lipsum()")
        return m.produced(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj, attribute):
        _meter().tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj, argument):
        _meter().tick()
        return super().getitem(obj, argument)

    def wrap_str_format(self, value):
        fmt = super().wrap_str_format(value)
        if fmt is None:
            return None
        source = value.__self__

        def checked(*args, **kwargs):
            _check_format(_meter(), source, args, kwargs)
            return fmt(*args, **kwargs)

        return checked

    def call_binop(self, context, operator, left, right):
        m = _meter()
        m.tick()
        if operator == "*":
            for seq, k in ((left, right), (right, left)):
                if isinstance(seq, (str, bytes, list, tuple)) and isinstance(k, int):
                    m.expect(len(seq) * max(0, k), "a repeated value")
            if isinstance(left, int) and isinstance(right, int):
                m.int_result(left.bit_length() + right.bit_length())
        elif operator == "+":
            if isinstance(left, (str, bytes, list, tuple)) and isinstance(right, (str, bytes, list, tuple)):
                m.expect(len(left) + len(right), "a concatenation")
        elif operator == "%" and isinstance(left, (str, bytes)):
            _check_format(m, left, right if isinstance(right, tuple) else (right,), {})
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 \
                and abs(left) > 1:
            m.int_result(right * left.bit_length())
        return m.produced(super().call_binop(context, operator, left, right))


class _Metered(NodeTransformer):
    """Rewrites a parsed template so that loops, outputs and ``~`` pass through the meter."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = nodes.Filter(node.iter, _ITER, [], [], None, None, lineno=node.lineno)
        return node

    def visit_Output(self, node: nodes.Output) -> nodes.Output:
        self.generic_visit(node)
        node.nodes = [nodes.Filter(child, _OUT, [], [], None, None, lineno=child.lineno) for child in node.nodes]
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Filter:
        self.generic_visit(node)
        return nodes.Filter(nodes.List(node.nodes, lineno=node.lineno), _CONCAT, [], [], None, None,
                            lineno=node.lineno)


class _CountedIter:
    """An iterable that charges each step to the meter; keeps ``len`` for ``loop.length``."""

    __slots__ = ("items", "meter")

    def __init__(self, items: Any, meter: _Meter):
        self.items, self.meter = items, meter

    def __iter__(self):
        for x in self.items:
            self.meter.step()
            yield x

    def __len__(self) -> int:
        return len(self.items)


@pass_context
def _iter_filter(context, value):
    return _CountedIter(value, _meter())


@pass_context
def _output_filter(context, value):
    _meter().emit(value)
    return value


@pass_context
def _concat_filter(context, values):
    m = _meter()
    parts = [str(v) for v in values]  # what Jinja's own `~` does
    m.expect(sum(map(len, parts)), "a concatenation")
    return m.produced("".join(parts))


def _guard_filter(name: str, fn: Callable) -> Callable:
    size = _FILTER_SIZES.get(name)

    @pass_context
    def guarded(context, value, *args, **kwargs):
        m = _meter()
        m.tick()
        if name in _MATERIALIZE and not isinstance(value, (str, list, tuple, dict, jinja2.Undefined)):
            value = list(value)
        if name == "format":
            _check_format(m, value, args, kwargs)
        elif size is not None:
            try:
                m.expect(size(value, *args, **kwargs), f"the result of |{name}")
            except TypeError:
                pass  # wrong arguments: the filter itself says so
        return m.produced(context.call(fn, value, *args, **kwargs))

    return guarded


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; chat templates expect plain JSON (as transformers)
    m = _meter()
    step = indent if isinstance(indent, int) else _text_len(indent) if indent is not None else 0
    if step > 64:
        m.fail(f"tojson(indent={step})", "chars")
    compact = m.produced(json.dumps(x, ensure_ascii=ensure_ascii, sort_keys=sort_keys))
    if indent is None and separators is None:
        return compact
    m.expect(len(compact) + _indent_extra(x, 0, step, m.budget.chars), "the result of |tojson")
    return m.produced(json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                 sort_keys=sort_keys))


def _indent_extra(x: Any, depth: int, step: int, stop: int) -> int:
    """Characters that ``indent`` adds to the JSON of ``x`` (a newline and the indent per item)."""
    items = x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else ()
    total = 0
    for v in items:
        total += 2 + (depth + 1) * step + _indent_extra(v, depth + 1, step, stop - total)
        if total > stop:
            break
    return total + (1 + depth * step if total else 0)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Generation(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text; rendering keeps the body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


class _BudgetedTemplate(jinja2.Template):
    """A template whose ``render`` runs under its environment's budget."""

    def render(self, *args: Any, **kwargs: Any) -> str:
        env = self.environment
        meter = _Meter(env.budget, env.label)
        token = _ACTIVE.set(meter)
        try:
            return super().render(*args, **kwargs)
        except RecursionError:
            meter.fail("macros or loops nest deeper than Python's recursion limit")
        finally:
            _ACTIVE.reset(token)


def template_label(source: str) -> str:
    """How errors name a template: its length, a hash to find it by, and how it starts."""
    head = " ".join(source[:40].split())
    digest = hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()[:12]
    return f"chat template ({len(source)} chars, sha256 {digest}…, starting {head!r})"


def compile_template(source: str, budget: RenderBudget = DEFAULT_BUDGET) -> jinja2.Template:
    """Compile a chat template in transformers' environment, every render metered by ``budget``."""
    env = _BudgetedEnvironment(trim_blocks=True, lstrip_blocks=True,
                               extensions=[_Generation, jinja2.ext.loopcontrols])
    env.budget, env.label = budget, template_label(source)
    env.template_class = _BudgetedTemplate
    env.filters = {name: _guard_filter(name, fn) for name, fn in env.filters.items() if name != "pprint"}
    env.filters["tojson"] = _guard_filter("tojson", _tojson)
    env.filters.update({_ITER: _iter_filter, _OUT: _output_filter, _CONCAT: _concat_filter})
    lipsum = env.globals["lipsum"]
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       lipsum=_flagged(lipsum))
    try:
        tree = _Metered().visit(env.parse(source))
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"{env.label} does not parse: {e} (line {e.lineno})") from None
    tree.set_environment(env)
    return env.from_string(tree)


def _flagged(fn: Callable) -> Callable:
    def lipsum(*args, **kwargs):
        return fn(*args, **kwargs)

    lipsum._evolm_lipsum = True
    return lipsum


__all__ = ["RenderBudget", "DEFAULT_BUDGET", "TemplateBudgetError", "compile_template", "template_label"]
