"""`engine force-unlock ID -g GROVE`: remove a grove's lock left by a vanished operation.

A lock whose holder still runs on this host is refused (stop the holder: it releases the
lock itself); one held on another host cannot be checked from here and is removed."""

from __future__ import annotations

import argparse
from typing import Any

from engine import inventory, manifest, ui
from engine.commands import _common
from engine.errors import EngineError


def register(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "force-unlock", help="remove a stale grove lock (give the lock ID it printed); refused "
        "while its holder runs on this host")
    p.add_argument("lock_id", metavar="ID", help="the lock's ID, as the refused operation "
                   "printed it")
    _common.add_grove_arg(p)
    return p


def run(args: argparse.Namespace) -> int:
    r = _common.repo()
    names = args.groves or [d.name for d in manifest.grove_dirs(r.root)]
    for name in names:
        held = inventory.read_lock(r.state_dir, name)
        if held is not None and held.id == args.lock_id:
            inventory.force_unlock(r.state_dir, name, args.lock_id)
            ui.out(f"grove {name}: removed lock {held.describe()}")
            return 0
    raise EngineError(f"no grove holds lock {args.lock_id}")
