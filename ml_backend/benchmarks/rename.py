"""``ml-backend benchmark rename``: give an arm's saved runs another name, checked against what that name means now.

Why: the arm named ``default`` is the product as it ships, resolved from ``Settings()`` when a command starts
(``run.default_arm``). When the defaults change, the runs saved as ``default`` are no longer the product; they keep
their meaning under a lever that states their values (``default@<lever>``), and the runs of the candidate that
became the default are the new ``default``. A rename is accepted only when the new name, resolved now, is exactly
what the runs ran (``arms.json``), so a published ``default`` column cannot drift from what ships.

    python -m ml_backend.benchmarks.cli rename --out benchmarks/label_efficiency/vnc default default@cold-start
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from ml_backend.benchmarks.protocol import Protocol
from ml_backend.benchmarks.report import write_json
from ml_backend.benchmarks.run import resolve_arm
from ml_backend.config import Settings

__all__ = ["RenameError", "rename_arm"]


class RenameError(ValueError):
    """The rename would mislabel runs (the new name means something else now, or it is taken)."""


def _run_files(out: Path, arm: str) -> list[Path]:
    return sorted((out / "runs").glob(f"{arm}__seed*.json"))


def rename_arm(out: Path, old: str, new: str, settings: Settings | None = None) -> int:
    """Rename arm ``old`` to ``new`` in the output folder ``out`` (its run files, their ``strategy`` and
    ``arms.json``); returns the number of runs renamed. ``settings``: what ``new`` resolves with (None: the
    environment's). RenameError when ``new`` resolves to other values than ``old`` ran, or already has runs."""
    arms_path = out / "arms.json"
    arms = json.loads(arms_path.read_text()) if arms_path.exists() else {}
    if old not in arms:
        raise RenameError(f"{out}: no arm {old!r} in arms.json (arms: {sorted(arms)})")
    if _run_files(out, new):
        raise RenameError(f"{out}: arm {new!r} already has runs; rename those first")
    protocol = Protocol(**json.loads((out / "protocol.json").read_text()))
    resolved = resolve_arm(protocol, new, settings if settings is not None else Settings.from_env())
    now = json.loads(json.dumps(asdict(resolved)))  # as arms.json stores it (tuples as lists)
    ran = {**arms[old], "name": new}
    if now != ran:
        diff = {k: (ran.get(k), v) for k, v in now.items() if ran.get(k) != v}
        raise RenameError(f"{out}: {new!r} resolves now to other values than {old!r} ran: {diff}")
    files = _run_files(out, old)
    for f in files:
        run = json.loads(f.read_text())
        run["strategy"] = new
        write_json(f.with_name(f.name.replace(f"{old}__", f"{new}__", 1)), run)
        f.unlink()
    write_json(arms_path, {**{k: v for k, v in arms.items() if k not in (old, new)}, new: ran})
    return len(files)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, action="append", help="benchmark output folder (repeatable)")
    ap.add_argument("old", help="the arm's name in the saved runs")
    ap.add_argument("new", help="its new name; must resolve now to exactly what the runs ran")
    a = ap.parse_args(argv)
    for out in a.out:
        try:
            n = rename_arm(out, a.old, a.new)
        except RenameError as exc:
            raise SystemExit(f"error: {exc}") from None
        print(f"{out}: {n} runs of {a.old!r} are now {a.new!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
