"""The grove lock and the state file: exclusive across processes, damage reported plainly."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import pytest

from engine import inventory
from engine.errors import EngineError, LockedError


def _hold(d: str, q: mp.Queue) -> None:  # type: ignore[type-arg]
    for _ in range(40):
        try:
            with inventory.locked(Path(d), "g", "apply"):
                q.put(("in", time.monotonic()))
                time.sleep(0.002)
                q.put(("out", time.monotonic()))
        except LockedError:
            pass


def test_lock_is_exclusive_across_processes(tmp_path: Path) -> None:
    q: mp.Queue = mp.get_context("fork").Queue()  # type: ignore[type-arg]
    procs = [mp.get_context("fork").Process(target=_hold, args=(str(tmp_path), q))
             for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    events = []
    while not q.empty():
        events.append(q.get())
    events.sort(key=lambda e: e[1])
    depth = most = 0
    for kind, _ in events:
        depth += 1 if kind == "in" else -1
        most = max(most, depth)
    assert events and most == 1


@pytest.mark.parametrize("text", ['[]', '{"format": 1}', '{"format": 1, "lineage": "x", '
                                  '"serial": "abc", "agents": {}}',
                                  '{"format": 1, "lineage": "x", "serial": 1, "agents": []}',
                                  '{"format": 1, "lineage": "x", "serial": 1, '
                                  '"agents": {"a": {"bogus": 1}}}'])
def test_damaged_state_file_is_one_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "g.json").write_text(text)
    with pytest.raises(EngineError, match=r"state file .* is damaged"):
        inventory.load(tmp_path, "g")


def test_state_round_trip(tmp_path: Path) -> None:
    inv = inventory.Inventory("g")
    inv.agents["a"] = inventory.Record("h", "{}", "local")
    inventory.save(tmp_path, inv)
    again = inventory.load(tmp_path, "g")
    assert again.serial == 1 and again.lineage == inv.lineage
    saved = json.loads((tmp_path / "state" / "g.json").read_text())
    assert saved["agents"]["a"]["spec_hash"] == "h"
