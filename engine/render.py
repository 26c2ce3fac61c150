"""Stage 2, templating: jinja2 strings in resolved settings -> plain strings.

Called by `desired`. A sandboxed environment with StrictUndefined: templates see only
`task`, `agent`, `grove` and the `env` names the profile allows. A template error is a
`TemplateError` naming the kind of problem; the caller adds file:line and the field. Its
message never repeats a value the template computed (only names written in the template
itself), so a template cannot print an environment variable through an error.

Templates are bounded, so hostile ones fail fast instead of hanging or eating memory:
arithmetic (`9**(9**9)`), repetition (`'a' * 10**10`), ranges, widths given to filters and
string methods, everything built along the way (`MAX_VALUE`), everything output, captured
blocks included (`MAX_TOTAL`), loop iterations and calls (`MAX_STEPS`) and time
(`MAX_SECONDS`). The hooks are the sandbox's own (`call_binop`, `call`, `getattr`,
`getitem`, `finalize`) plus a rewrite of the parsed template that routes loops, `~`
concatenation and list/dict literals through checks; include/import/extends are refused.

Most templates are plain substitutions (`echo {{ agent.name }}`); those are filled in
directly, which gives jinja's output without compiling a template per agent. Anything else
(filters, blocks, unknown names, attributes jinja would resolve differently) goes to jinja.
tests/test_desired.py checks the two agree on generated templates.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import os
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:
    import jinja2
    from jinja2 import nodes

MAX_OUTPUT = 200_000  # characters one field renders to
MAX_VALUE = 1_000_000  # characters or items of any value a template builds
MAX_TOTAL = 1_000_000  # characters output in all, loops, macros and captured blocks included
MAX_TEMPLATE = 100_000  # characters of template text that goes to jinja
MAX_RANGE = 10_000  # items of range() (jinja's own MAX_RANGE is 100,000)
MAX_INT_BITS = 8192
MAX_STEPS = 200_000  # loop iterations, calls, operators and lookups of one rendering
MAX_SECONDS = 2.0
MAX_INDENT = 16  # tojson(indent=...)
_SIMPLE = re.compile(r"\{\{ *([A-Za-z][A-Za-z0-9_]*(?:\.[A-Za-z][A-Za-z0-9_]*)*) *\}\}")
_CONSTANTS = {"true", "false", "none", "True", "False", "None"}
_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")
_TYPE_NAMES = {"str", "int", "float", "bool", "list", "tuple", "dict", "NoneType", "set",
               "bytes", "range", "Markup", "generator", "function", "method", "module"}
_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d*)(?:\.(\*|\d*))?[hlL]?(.)", re.S)
_WIDTH_FILTERS = {"center": "width", "indent": "width", "wordwrap": "width",
                  "batch": "linecount", "slice": "slices"}
_WIDTH_METHODS = {"center", "ljust", "rjust", "zfill"}
_ESTIMATED = {*_WIDTH_FILTERS, "join", "replace", "format", "sum", "tojson"}


class TemplateError(Exception):
    pass


class _Refused(Exception):
    """A template went over one of the bounds; the message says which, never a value."""


class _Budget:
    """What is left to one rendering: steps, output characters, time."""

    def __init__(self) -> None:
        self.steps = MAX_STEPS
        self.output = MAX_TOTAL
        self.deadline = time.monotonic() + MAX_SECONDS

    def step(self) -> None:
        self.steps -= 1
        if self.steps < 0:
            raise _Refused(f"over {MAX_STEPS} steps (a loop, or calls, going on too long)")
        if time.monotonic() > self.deadline:
            raise _Refused(f"took over {MAX_SECONDS:g} seconds")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("budget",
                                                                         default=None)


def _budget() -> _Budget:
    b = _BUDGET.get()
    return b if b is not None else _Budget()  # outside a rendering: bounds per call


# -- sizes ---------------------------------------------------------------------------------

_SEQUENCES: tuple[type[Iterable[Any]], ...] = (
    list, tuple, set, frozenset, type({}.keys()), type({}.values()), type({}.items()))


def _children(v: Any) -> list[Any] | None:
    """The parts `str(v)` spells out, for containers; None for anything else."""
    from jinja2.utils import Namespace
    if isinstance(v, dict):
        return [*v.keys(), *v.values()]
    if isinstance(v, _SEQUENCES):
        return list(v)
    if isinstance(v, Namespace):
        return [v._Namespace__attrs]
    return None


def _leaf(v: Any) -> int:
    if isinstance(v, str | bytes):
        return len(v)
    if isinstance(v, int):
        return v.bit_length() // 3 + 1
    return 1


def _size(value: Any, limit: int = MAX_VALUE) -> int:
    """About how many characters `str(value)` spells out: containers are counted through,
    a part they share each time it appears (as `str` repeats it), but each container is
    walked once, so the cost is that of the memory `value` really takes. Sizes are capped
    just over `limit`."""
    if isinstance(value, str | int | float | bytes | None):
        return _leaf(value)  # what nearly every check meets: no walk
    memo: dict[int, int] = {}
    stack: list[tuple[Any, list[Any] | None]] = [(value, None)]
    while stack:
        v, kids = stack.pop()
        if kids is None:
            kids = _children(v)
            if kids is None or id(v) in memo:
                continue
            stack.append((v, kids))
            stack += [(k, None) for k in kids if id(k) not in memo]
            continue
        total = 1 + len(kids)
        for k in kids:
            total += memo.get(id(k)) or _leaf(k)
            if total > limit:
                break
        memo[id(v)] = min(total, limit + 1)
    return memo.get(id(value)) or _leaf(value)


def _checked(value: Any) -> Any:
    if _size(value) > MAX_VALUE:
        raise _Refused(f"a value over {MAX_VALUE} characters or items")
    return value


def _expect(estimate: int, what: str) -> None:
    if estimate > MAX_VALUE:
        raise _Refused(f"{what} would make over {MAX_VALUE} characters")


def _cap(value: Any, what: str, limit: int = MAX_VALUE) -> None:
    if isinstance(value, int) and abs(value) > limit:
        raise _Refused(f"{what} over {limit}")


def _depth(value: Any) -> int:
    """How deeply lists and maps nest in `value`."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        v, d = stack.pop()
        deepest = max(deepest, d)
        if isinstance(v, dict):
            stack += [(x, d + 1) for x in v.values()]
        elif isinstance(v, list | tuple):
            stack += [(x, d + 1) for x in v]
    return deepest


# -- what amplifies: operators, formats, filters, string methods --------------------------

def _binop_guard(op: str, left: Any, right: Any) -> None:
    ints = isinstance(left, int) and isinstance(right, int)
    if op == "**" and ints and right > 0 and abs(left) > 1 \
            and abs(left).bit_length() * right > MAX_INT_BITS:
        raise _Refused(f"number over {MAX_INT_BITS} bits")
    if op == "*" and ints and left.bit_length() + right.bit_length() > MAX_INT_BITS:
        raise _Refused(f"number over {MAX_INT_BITS} bits")
    if op == "*" and not ints:
        seq, n = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(n, int) and n > 0 and isinstance(seq, str | bytes | list | tuple):
            _expect(_size(seq, MAX_VALUE // n + 1) * n, "repetition")
    if op == "%" and isinstance(left, str):
        _percent_guard(left, right)


def _format_estimate(fmt: str, fields: int, widths: list[int], values: list[Any]) -> None:
    for w in widths:
        _cap(w, "format width or precision")
    biggest = max((_size(v) for v in values), default=0)
    _expect(len(fmt) + fields * (max(widths, default=0) + 4 * biggest + 4), "formatting")


def _percent_guard(fmt: str, args: Any) -> None:
    """`fmt % args` (and the `format` filter)."""
    values = list(args.values()) if isinstance(args, Mapping) else \
        list(args) if isinstance(args, tuple) else [args]
    widths: list[int] = []
    specs = [m for m in _PERCENT.finditer(fmt) if m.group(3) != "%"]
    for m in specs:
        for g in m.group(1), m.group(2):
            if g == "*":
                widths += [v for v in values if isinstance(v, int)]
            elif g:
                widths.append(int(g))
    _format_estimate(fmt, len(specs), widths, values)


def _str_format_guard(fmt: str, values: list[Any]) -> None:
    """`fmt.format(...)` and `fmt.format_map(...)`."""
    fields, widths, nested = 0, [], False
    try:
        for _text, name, spec, _conv in string.Formatter().parse(fmt):
            if name is not None:
                fields += 1
                widths += [int(n) for n in re.findall(r"\d+", spec or "")]
                nested = nested or "{" in (spec or "")
    except ValueError:
        return  # str.format raises the same error itself
    if nested:
        widths += [v for v in values if isinstance(v, int) and not isinstance(v, bool)]
    _format_estimate(fmt, fields, widths, values)


def _join_estimate(items: list[Any], sep: Any) -> None:
    _expect(sum(_size(x) for x in items) + max(len(items) - 1, 0) * _size(sep), "join")


def _replace_estimate(s: Any, old: Any, new: Any, count: Any) -> None:
    if not isinstance(s, str | bytes) or not isinstance(old, str | bytes):
        return
    hits = len(s) + 1 if not old else s.count(old)  # type: ignore[arg-type]
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    _expect(len(s) + hits * _size(new), "replace")


def _method_guard(owner: str | bytes, name: str, args: tuple[Any, ...],
                  kwargs: dict[str, Any]) -> tuple[Any, ...]:
    """Check a call of a str/bytes method that can make its result far bigger than its
    inputs; returns the arguments to call it with (a lazy sequence made a list)."""
    if name == "join" and args:
        args = (list(args[0]), *args[1:])
        _join_estimate(args[0], owner)
    elif name == "format" and isinstance(owner, str):
        _str_format_guard(owner, [*args, *kwargs.values()])
    elif name == "format_map" and isinstance(owner, str) and args:
        _str_format_guard(owner, list(args[0].values()) if isinstance(args[0], Mapping) else [])
    elif name == "replace" and len(args) >= 2:
        _replace_estimate(owner, args[0], args[1], args[2] if len(args) > 2 else -1)
    elif name == "expandtabs":
        size = args[0] if args else kwargs.get("tabsize", 8)
        _cap(size, "tab size")
        _expect(len(owner) + owner.count("\t" if isinstance(owner, str) else b"\t")  # type: ignore[arg-type]
                * max(int(size), 0), "expandtabs")
    elif name == "translate" and args and isinstance(args[0], Mapping):
        _expect(len(owner) * max((_size(v) for v in args[0].values()), default=1),
                "translate")
    elif name in _WIDTH_METHODS:
        for a in (*args, *kwargs.values()):
            _cap(a, f"width of {name}")
    return args


def _filter_estimate(name: str, a: dict[str, Any]) -> None:
    """Check a filter call that can amplify its input (`a`: its bound arguments)."""
    if name in _WIDTH_FILTERS:
        _cap(a[_WIDTH_FILTERS[name]], f"{_WIDTH_FILTERS[name]} of filter {name}")
    if name == "join":
        _join_estimate(a["value"], a["d"])
    elif name == "replace":
        _replace_estimate(a["s"], a["old"], a["new"], a["count"])
    elif name == "indent":
        w = a["width"]
        per_line = len(w) if isinstance(w, str) else int(w)
        _expect(_size(a["s"]) + (str(a["s"]).count("\n") + 1) * per_line, "indent")
    elif name == "wordwrap":
        wrap = a["wrapstring"] or "\n"
        _expect(_size(a["s"]) + (_size(a["s"]) + 1) * len(wrap), "wordwrap")
    elif name == "format":
        _percent_guard(str(a["value"]), a["kwargs"] or a["args"])
    elif name == "sum":
        _expect(_size(a["start"]) + sum(_size(x) for x in a["iterable"]), "sum")
    elif name == "tojson" and a["indent"] is not None:
        _cap(a["indent"], "indent of filter tojson", MAX_INDENT)
        _expect(6 * _size(a["value"]) * (1 + int(a["indent"]) * _depth(a["value"])),
                "tojson")


def _binder(f: Callable[..., Any]) -> inspect.Signature:
    """The signature of a filter's own function, without the context argument jinja
    passes first (async variants wrap a sync function and take it themselves)."""
    inner = inspect.unwrap(f)
    sig = inspect.signature(inner)
    drop = 1 if getattr(inner, "jinja_pass_arg", None) is not None else 0
    return sig.replace(parameters=list(sig.parameters.values())[drop:])


def _guard_filter(name: str, f: Callable[..., Any]) -> Callable[..., Any]:
    sig = _binder(f) if name in _ESTIMATED else None
    skip = 1 if getattr(f, "jinja_pass_arg", None) is not None else 0

    @functools.wraps(f)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _budget().step()
        if name in ("join", "sum") and len(args) > skip \
                and not isinstance(args[skip], str | list | tuple):
            args = (*args[:skip], list(args[skip]), *args[skip + 1:])
        for a in (*args[skip:], *kwargs.values()):
            _checked(a)
        if sig is not None:
            bound = sig.bind(*args[skip:], **kwargs)
            bound.apply_defaults()
            _filter_estimate(name, bound.arguments)
        return _checked(f(*args, **kwargs))
    return guarded


# -- the environment -----------------------------------------------------------------------

class _Counted:
    """A loop's sequence: each item taken costs a step."""

    def __init__(self, items: Any) -> None:
        self.items = items

    def __iter__(self) -> Iterator[Any]:
        budget = _budget()
        for item in self.items:
            budget.step()
            yield item

    def __len__(self) -> int:  # loop.length; a TypeError makes jinja count by itself
        return len(self.items)


def _each(items: Any) -> _Counted:
    return _Counted(items)


def _concat(*parts: Any) -> str:
    """`a ~ b`: the parts as text, refused before it is built if it would be too big."""
    _expect(sum(_size(p) for p in parts), "concatenation")
    return "".join(map(str, parts))


def _range(*args: int) -> range:
    rng = range(*args)
    if len(rng) > MAX_RANGE:
        raise _Refused(f"range over {MAX_RANGE} items")
    return rng


def _finalize(_ctx: Any, value: Any) -> Any:
    """Every `{{ ... }}` and piece of text output, captured blocks included."""
    budget = _budget()
    budget.step()
    n = len(value) if type(value) is str else _size(value, MAX_OUTPUT)
    if n > MAX_OUTPUT:
        raise _Refused(f"template output over {MAX_OUTPUT} characters")
    budget.output -= n
    if budget.output < 0:
        raise _Refused(f"over {MAX_TOTAL} characters output in all (loops, macros and "
                       "captured blocks included)")
    return value


@functools.cache
def _sandbox() -> type[jinja2.Environment]:
    """jinja's immutable sandbox with every operator, call and lookup counted and the
    ones that can amplify checked (made on first use: jinja is imported lazily)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Sandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            _budget().step()
            _binop_guard(operator, left, right)
            return _checked(super().call_binop(context, operator, left, right))

        def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
            _budget().step()
            target = getattr(obj, "__wrapped__", obj)  # the sandbox wraps str.format
            owner = getattr(target, "__self__", None)
            if isinstance(owner, str | bytes):
                args = _method_guard(owner, getattr(target, "__name__", ""), args, kwargs)
            return _checked(super().call(context, obj, *args, **kwargs))

        def getattr(self, obj: Any, attribute: str) -> Any:
            _budget().step()
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            _budget().step()
            return super().getitem(obj, argument)

    return Sandbox


@functools.cache
def _env() -> jinja2.Environment:
    import jinja2
    env = _sandbox()(undefined=jinja2.StrictUndefined, autoescape=False,
                     keep_trailing_newline=True, finalize=jinja2.pass_eval_context(_finalize))
    env.filters = {n: _guard_filter(n, f) for n, f in env.filters.items() if n != "urlize"}
    env.globals.pop("lipsum", None)
    env.globals["range"] = _range
    return env


def _call(func: str, *args: nodes.Expr, lineno: int) -> nodes.Call:
    from jinja2 import nodes
    return nodes.Call(nodes.ImportedName(f"{__name__}.{func}", lineno=lineno), list(args),
                      [], None, None, lineno=lineno)


@functools.cache
def _rewriter() -> type[jinja2.visitor.NodeTransformer]:
    """Loops count their steps; `~`, list, tuple and dict literals are size-checked; text
    goes through `finalize` like `{{ }}`, so text repeated by a loop counts too."""
    from jinja2 import nodes
    from jinja2.visitor import NodeTransformer

    class Rewrite(NodeTransformer):
        def visit_For(self, node: nodes.For) -> nodes.Node:
            self.generic_visit(node)
            node.iter = _call("_each", cast("nodes.Expr", node.iter), lineno=node.lineno)
            return node

        def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
            self.generic_visit(node)
            return _call("_concat", *node.nodes, lineno=node.lineno)

        def visit_Tuple(self, node: nodes.Tuple) -> nodes.Node:
            self.generic_visit(node)
            return _call("_checked", node, lineno=node.lineno) if node.ctx == "load" else node

        def visit_List(self, node: nodes.List) -> nodes.Node:
            self.generic_visit(node)
            return _call("_checked", node, lineno=node.lineno)

        visit_Dict = visit_List

        def visit_TemplateData(self, node: nodes.TemplateData) -> nodes.Node:
            return nodes.Const(node.data, lineno=node.lineno)

    return Rewrite


def _rewrite(tree: nodes.Template) -> nodes.Template:
    from jinja2 import nodes
    for _ in tree.find_all((nodes.Include, nodes.Import, nodes.FromImport, nodes.Extends)):
        raise _Refused("include, import and extends are not available")
    out: nodes.Template = _rewriter()().visit(tree)
    out.set_environment(_env())
    return out


@functools.lru_cache(maxsize=1024)
def _compile(text: str) -> jinja2.Template:
    if len(text) > MAX_TEMPLATE:
        raise _Refused(f"template over {MAX_TEMPLATE} characters")
    env = _env()
    return env.from_string(_rewrite(env.parse(text)))


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text or "{#" in text


def render(text: str, context: dict[str, Any]) -> str:
    """Render one template string; plain strings are returned as they are."""
    if not is_template(text):
        return text
    out = _substitute(text, context)
    if out is None:
        out = _jinja(text, context)
    if len(out) > MAX_OUTPUT:
        raise TemplateError(f"template output over {MAX_OUTPUT} characters")
    return out


def _substitute(text: str, context: dict[str, Any]) -> str | None:
    """`text` with each `{{ a.b }}` filled in, or None when jinja must decide."""
    if "\r" in text:
        return None  # jinja normalises newlines in template text
    parts: list[str] = []
    pos = 0
    for m in _SIMPLE.finditer(text):
        literal = text[pos:m.start()]
        if is_template(literal) or literal.endswith("{"):
            return None
        value = _lookup(m.group(1), context)
        if value is None:
            return None
        parts += (literal, value)
        pos = m.end()
    tail = text[pos:]
    if is_template(tail):
        return None
    parts.append(tail)
    return "".join(parts)


def _lookup(dotted: str, context: dict[str, Any]) -> str | None:
    first, *attrs = dotted.split(".")
    if first in _CONSTANTS or first not in context:
        return None
    value = context[first]
    for a in attrs:
        # jinja tries the attribute before the item: `env.items` is dict.items
        if not isinstance(value, dict) or a not in value or hasattr(dict, a):
            return None
        value = value[a]
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def _jinja(text: str, context: dict[str, Any]) -> str:
    token = _BUDGET.set(_Budget())
    try:
        return _compile(text).render(context)
    except Exception as e:  # jinja can raise anything a filter raises
        raise TemplateError(_describe(e, text, context)) from None
    finally:
        _BUDGET.reset(token)


def _describe(e: Exception, text: str, context: dict[str, Any]) -> str:
    """What went wrong, as one line that repeats no value the template computed."""
    import jinja2
    from jinja2.exceptions import SecurityError
    if isinstance(e, _Refused):
        msg = str(e)
        return msg if msg.startswith("template output") else \
            f"template refused by the sandbox: {msg}"
    if isinstance(e, jinja2.TemplateSyntaxError):  # said of the template text itself
        return f"template syntax error: {e.message} (line {e.lineno} of the template)"
    if isinstance(e, RecursionError | MemoryError):
        return f"template refused by the sandbox: {type(e).__name__}"
    detail = _safe_detail(str(getattr(e, "message", None) or e), text, context)
    if isinstance(e, SecurityError):
        return "template refused by the sandbox" + (f": {detail}" if detail else "")
    if isinstance(e, jinja2.UndefinedError):
        return f"template error: {detail or 'undefined name, attribute or item'}"
    return f"template error: {type(e).__name__}" + (f": {detail}" if detail else "")


def _safe_detail(message: str, text: str, context: dict[str, Any]) -> str:
    """`message` if all it quotes is written in the template (or is a type name) and it
    holds no value of the environment; else "" (the caller says only the kind of error)."""
    lines = message.strip().splitlines()
    msg = lines[0] if lines else ""
    if len(msg) > 300:
        return ""
    for m in _QUOTED.finditer(msg):
        token = m.group(1) if m.group(1) is not None else m.group(2)
        typeish = token in _TYPE_NAMES or re.fullmatch(r"[\w.]+ object", token)
        if token not in text and not typeish:
            return ""
    if any(n not in text for n in re.findall(r"\d+", _QUOTED.sub("", msg))):
        return ""
    env = context.get("env")
    shown = [str(v) for v in (env.values() if isinstance(env, dict) else ()) if len(str(v)) > 2]
    shown += [v for v in os.environ.values() if len(v) > 7]
    if any(v in msg for v in shown):
        return ""
    return msg

