"""Tokens, cost and turns an agent's harness reported: parsed, summed and shown.

Called by `ingest` (an agent's `AgentReport` carries its run's cumulative usage), `status`,
`engine cost` and `budget`. The figures come from the harness's own machine-readable output
(Claude Code's stream-json result, codex's turn events, gemini's stats), relayed by the
agent-side client: they are what the agent says, so every field is checked (a number, not
negative, capped) and a field nobody reported stays None, shown as "unknown", never 0.

A record keeps `usage` (the totals of runs that ended) and `run_usage` (the current run's
latest cumulative report); an agent's usage is their sum, field by field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

FIELDS = ("inputTokens", "outputTokens", "costUSD", "turns")
MAX_TOKENS = 10**13  # beyond any real run: a bigger figure is a lie or garbage
MAX_COST = 10.0**7
MAX_TURNS = 10**7


@dataclass(frozen=True)
class Usage:
    input_tokens: int | None = None
    output_tokens: int | None = None
    cost_usd: float | None = None
    turns: int | None = None

    @property
    def tokens(self) -> int | None:
        """Input plus output tokens; None when neither was reported."""
        if self.input_tokens is None and self.output_tokens is None:
            return None
        return (self.input_tokens or 0) + (self.output_tokens or 0)

    @property
    def known(self) -> bool:
        return any(v is not None for v in (self.input_tokens, self.output_tokens,
                                           self.cost_usd, self.turns))

    def to_json(self) -> dict[str, Any]:
        """The reported fields only (a field left out is unknown)."""
        out: dict[str, Any] = {}
        for key, value in zip(FIELDS, (self.input_tokens, self.output_tokens, self.cost_usd,
                                       self.turns), strict=True):
            if value is not None:
                out[key] = value
        return out

    def __add__(self, other: Usage) -> Usage:
        return Usage(_add(self.input_tokens, other.input_tokens),
                     _add(self.output_tokens, other.output_tokens),
                     _add(self.cost_usd, other.cost_usd), _add(self.turns, other.turns))


def _add(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


def _int(value: Any, cap: int, clamp: bool = False) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if value < 0:
        return None
    if value > cap:
        return cap if clamp else None
    return int(value)


def _cost(value: Any, clamp: bool = False) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if value > MAX_COST:  # compared before float(): a huge JSON integer overflows it
        return MAX_COST if clamp else None
    v = float(value)
    if not math.isfinite(v) or v < 0:
        return None
    return round(v, 6)


def parse(data: Any, clamp: bool = False) -> Usage:
    """A Usage from untrusted JSON ({inputTokens, outputTokens, costUSD, turns}); a field
    that is missing or not a sane number is unknown. `clamp`: the engine's own sums, where
    a figure over the cap is the cap (still crossing any budget), not unknown."""
    if not isinstance(data, dict):
        return Usage()
    return Usage(_int(data.get("inputTokens"), MAX_TOKENS, clamp),
                 _int(data.get("outputTokens"), MAX_TOKENS, clamp),
                 _cost(data.get("costUSD"), clamp), _int(data.get("turns"), MAX_TURNS, clamp))


def of_record(usage: dict[str, Any], run_usage: dict[str, Any]) -> Usage:
    """An agent's usage over all its runs, from its inventory record's two fields."""
    return parse(usage, clamp=True) + parse(run_usage, clamp=True)


def monotonic(old: Usage, new: Usage) -> Usage:
    """The current run's usage after a new cumulative report: no field goes down (a report
    that shrinks a figure, e.g. from a reset or a lie, does not undo what was counted)."""
    def hi(a: Any, b: Any) -> Any:
        if a is None:
            return b
        if b is None:
            return a
        return max(a, b)

    return Usage(hi(old.input_tokens, new.input_tokens),
                 hi(old.output_tokens, new.output_tokens), hi(old.cost_usd, new.cost_usd),
                 hi(old.turns, new.turns))


def show_tokens(u: Usage) -> str:
    t = u.tokens
    return "unknown" if t is None else _si(t)


def show_cost(u: Usage) -> str:
    return "unknown" if u.cost_usd is None else f"${u.cost_usd:.4f}".rstrip("0").rstrip(".") \
        if u.cost_usd >= 1 else f"${u.cost_usd:.4f}"


def _si(n: int) -> str:
    if n < 10_000:
        return str(n)
    for unit, size in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
