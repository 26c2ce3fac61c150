"""Stage 2, templating: jinja2 strings in resolved settings -> plain strings.

Called by `desired`. A sandboxed environment with StrictUndefined: templates see only
`task`, `agent`, `grove` and the `env` names the profile allows. A template error is an
`EngineError` naming the field; the caller adds file:line.
"""

from __future__ import annotations

import functools
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

MAX_OUTPUT = 200_000


class TemplateError(Exception):
    pass


@functools.cache
def _env() -> ImmutableSandboxedEnvironment:
    return ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined, autoescape=False,
                                         keep_trailing_newline=True)


@functools.lru_cache(maxsize=1024)
def _template(text: str) -> jinja2.Template:
    # from_string compiles every time; agents of one grove share most templates
    return _env().from_string(text)


def is_template(text: str) -> bool:
    return "{{" in text or "{%" in text or "{#" in text


def render(text: str, context: dict[str, Any]) -> str:
    """Render one template string; plain strings are returned as they are."""
    if not is_template(text):
        return text
    try:
        out = _template(text).render(context)
    except SecurityError as e:
        raise TemplateError(f"template refused by the sandbox: {e}") from None
    except jinja2.UndefinedError as e:
        raise TemplateError(f"template error: {e.message}") from None
    except jinja2.TemplateSyntaxError as e:
        raise TemplateError(f"template syntax error: {e.message}") from None
    except Exception as e:  # jinja can raise anything a filter raises
        raise TemplateError(f"template error: {e}") from None
    if len(out) > MAX_OUTPUT:
        raise TemplateError(f"template output over {MAX_OUTPUT} characters")
    return out


