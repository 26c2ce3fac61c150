"""Stage 2, templating: jinja2 strings in resolved settings -> plain strings.

Called by `desired`. A sandboxed environment with StrictUndefined: templates see only
`task`, `agent`, `grove` and the `env` names the profile allows. A template error is a
`TemplateError` naming the problem; the caller adds file:line and the field.

Most templates are plain substitutions (`echo {{ agent.name }}`); those are filled in
directly, which gives jinja's output without compiling a template per agent. Anything else
(filters, blocks, unknown names, attributes jinja would resolve differently) goes to jinja.
tests/test_desired.py checks the two agree on generated templates.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import jinja2

MAX_OUTPUT = 200_000
_SIMPLE = re.compile(r"\{\{ *([A-Za-z][A-Za-z0-9_]*(?:\.[A-Za-z][A-Za-z0-9_]*)*) *\}\}")
_CONSTANTS = {"true", "false", "none", "True", "False", "None"}


class TemplateError(Exception):
    pass


@functools.cache
def _env() -> jinja2.Environment:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    return ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False,
                                         keep_trailing_newline=True)


@functools.lru_cache(maxsize=1024)
def _compile(text: str) -> jinja2.Template:
    return _env().from_string(text)


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
    import jinja2
    from jinja2.exceptions import SecurityError
    try:
        return _compile(text).render(context)
    except SecurityError as e:
        raise TemplateError(f"template refused by the sandbox: {e}") from None
    except jinja2.UndefinedError as e:
        raise TemplateError(f"template error: {e.message}") from None
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"template syntax error: {e.message} (line {e.lineno} of the "
                            "template)") from None
    except Exception as e:  # jinja can raise anything a filter raises
        raise TemplateError(f"template error: {type(e).__name__}: {e}") from None
