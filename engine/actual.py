"""The observed state of a grove, as data: what runtimes report (`Observed`, the phases)
and what `observe` returns and `plan` decides from (`Actual`).

A module of its own so that planning (a pure function) imports no code with effects: no
runtime client, no git, no workspace code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine.inventory import Inventory

if TYPE_CHECKING:
    from engine.workspace import WorkState

RuntimeKey = tuple[str, str]  # (runtime name, host or "")

# Phases of an agent, as observed.
PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED = (
    "Pending", "Running", "Succeeded", "Failed", "Stopped")


@dataclass(frozen=True)
class Observed:
    """What a runtime reports about one agent it owns: the essence, no ids or timestamps
    that would make two observations of the same state differ."""

    grove: str
    name: str
    runtime: str
    spec_hash: str
    phase: str
    exit_code: int | None = None
    reason: str = ""  # e.g. "exited 1", "killed (out of memory)", "maxDuration 30s exceeded"
    host: str = ""  # docker host URL or kube context; "" for the default



@dataclass
class Actual:
    grove: str
    inventory: Inventory
    observed: dict[str, Observed]
    work: dict[str, WorkState] = field(default_factory=dict)
    errors: dict[RuntimeKey, str] = field(default_factory=dict)
