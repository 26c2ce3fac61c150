"""The observed state of a grove, as data: what `observe` returns and `plan` decides from.

A module of its own so that planning (a pure function) imports no code with effects: no
runtime client, no git, no workspace code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.inventory import Inventory
from engine.runtimes import Observed

if TYPE_CHECKING:
    from engine.workspace import WorkState

RuntimeKey = tuple[str, str]  # (runtime name, host or "")


@dataclass
class Actual:
    grove: str
    inventory: Inventory
    observed: dict[str, Observed]
    work: dict[str, WorkState] = field(default_factory=dict)
    errors: dict[RuntimeKey, str] = field(default_factory=dict)
