"""``ml-backend benchmark``: simulated active learning on a labelled EM volume, learning curves of every strategy.

    ml-backend benchmark --quick                      # <= 5 min smoke run (VNC if present, else synthetic)
    ml-backend benchmark --workers 2 --seeds 0,1,2    # CPU comparison of all strategies (background!)
    ml-backend benchmark --preset full                # the papers' full-size protocol (GPU)
    ml-backend benchmark --report-only --out DIR      # re-aggregate saved runs into tables and plots
    ml-backend benchmark --volume isotropic --strategies random,entropy,entropy+stack   # generated 3-D volume
    ml-backend benchmark --pretrain-steps 600 --first-batch coverage    # issue 11 cold-start ablations
    ml-backend benchmark --strategies default,random,random+semi,default+semi   # the product as it ships (Settings)
    ml-backend benchmark hygiene --tasks 2000         # Data Manager listing before/after prediction hygiene
    ml-backend benchmark region-effort --seeds 0,1,2  # region suggestion vs whole tiles (IoU per effort)

The protocol is ``ml_backend.benchmarks.protocol``, the data ``.data``, the loop ``.run`` (the product's round with a
ground-truth oracle), the tables and plots ``.report``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

from ml_backend.benchmarks.data import REPO, default_vnc_dir
from ml_backend.benchmarks.protocol import DEFAULT_ARM_ONLY_FIELDS, PRESETS, Protocol
from ml_backend.benchmarks.report import load_runs, print_summary, write_json, write_outputs
from ml_backend.benchmarks.run import DEFAULT_ARM, resolve_arm, run_all
from ml_backend.config import ConfigError, Settings
from ml_backend.data.context import parse_offsets
from ml_backend.strategies import available_strategies

log = logging.getLogger("al_benchmark")


def _join_context(argv: list[str] | None) -> list[str] | None:
    """``--context -1,0,1`` as ``--context=-1,0,1`` (argparse would take "-1,0,1" for an option)."""
    if argv is None:
        import sys

        argv = sys.argv[1:]
    args, out = list(argv), []
    i = 0
    while i < len(args):
        if args[i] == "--context" and i + 1 < len(args) and args[i + 1].startswith("-"):
            out.append(f"--context={args[i + 1]}")
            i += 2
        else:
            out.append(args[i])
            i += 1
    return out


def _bool(value: str) -> bool:
    """argparse type for the protocol's booleans (``bool("false")`` would be True)."""
    v = str(value).strip().lower()
    if v in {"1", "true", "yes", "on"}:
        return True
    if v in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = _join_context(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", help="folder of image slices or multi-page TIFF (default: VNC stack1/raw if present)")
    ap.add_argument("--masks", help="matching masks (default: VNC stack1/mitochondria)")
    ap.add_argument("--synthetic", action="store_true", help="use generated EM-like data instead of files")
    ap.add_argument("--synthetic-n", type=int, help="generated slices")
    ap.add_argument("--synthetic-size", type=int, help="generated slice size")
    ap.add_argument(
        "--volume",
        choices=["isotropic", "anisotropic"],
        help="use the generated 3-D volume (ml_backend.data.volume; harder setting volume.HARD, no binning)",
    )
    ap.add_argument("--preset", choices=sorted(PRESETS), help="protocol size (default: full on GPU, cpu otherwise)")
    ap.add_argument("--quick", action="store_true", help="same as --preset quick, strategies random,entropy, 1 seed")
    ap.add_argument(
        "--strategies",
        help="comma-separated arms (default: every registered strategy and 'default', the product as it ships from "
        "Settings); '<strategy>+stack|div|wkm|astack|softrank' for stack-aware batches, '+semi' on any arm for the "
        "semi-supervised term",
    )
    ap.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2; quick: 0)")
    ap.add_argument("--out", type=Path, help="output dir (default benchmarks/active_learning/<preset>)")
    ap.add_argument("--workers", type=int, default=1, help="worker processes (1 torch thread each by default)")
    ap.add_argument("--max-runs", type=int, help="stop after this many new runs (the rest resumes later)")
    ap.add_argument("--report-only", action="store_true", help="only aggregate the saved runs")
    ap.add_argument("--force", action="store_true", help="allow a different protocol in an existing output dir")
    ap.add_argument("-v", "--verbose", action="store_true")
    ap.add_argument(
        "--context",
        help="2.5D context: comma-separated slice offsets read as input channels, holding 0 (e.g. -1,0,1; "
        "default 0 = plain 2-D)",
    )
    for f in Protocol.__dataclass_fields__.values():  # every protocol field can be overridden
        if f.name in {"data", "images", "masks", "synthetic_n", "synthetic_size", "volume_setting", "context_offsets"}:
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.name == "full_seeds":
            ap.add_argument(flag, help="comma-separated seeds that get a full-supervision reference run")
        elif isinstance(f.default, bool):
            ap.add_argument(flag, type=_bool, help=argparse.SUPPRESS)
        elif f.name == "z_radius":
            ap.add_argument(flag, type=lambda v: v if v == "auto" else int(v), help=argparse.SUPPRESS)
        else:
            ap.add_argument(flag, type=type(f.default) if f.default is not None else str, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def build_protocol(a: argparse.Namespace) -> tuple[Protocol, str]:
    import torch

    preset = "quick" if a.quick else a.preset or ("full" if torch.cuda.is_available() else "cpu")
    p = replace(Protocol(), **PRESETS[preset])
    if a.volume:
        p = replace(p, data="volume", volume_setting=a.volume, downsample=1)  # generated at the tile scale already
    elif a.synthetic:
        p = replace(p, data="synthetic")
        if a.synthetic_n:
            p.synthetic_n = a.synthetic_n
        if a.synthetic_size:
            p.synthetic_size = a.synthetic_size
    elif a.images or a.masks:
        if not (a.images and a.masks):
            raise SystemExit("--images and --masks go together")
        p = replace(p, data="folder", images=str(Path(a.images).resolve()), masks=str(Path(a.masks).resolve()))
    else:
        vnc = default_vnc_dir() / "stack1"
        if (vnc / "raw").is_dir() and (vnc / "mitochondria").is_dir():
            p = replace(p, data="vnc", images=str((vnc / "raw").resolve()), masks=str((vnc / "mitochondria").resolve()))
        elif a.quick or a.report_only:  # report-only reads the saved protocol; it needs no data
            if a.quick:
                log.warning("VNC data not found at %s: quick mode uses generated data", vnc)
            p = replace(p, data="synthetic")
        else:
            raise SystemExit(
                f"VNC data not found at {vnc} (set VNC_DATA_DIR, or give --images/--masks, or --synthetic)"
            )
    if getattr(a, "context", None):
        try:
            p.context_offsets = list(parse_offsets(a.context))
        except ValueError as exc:
            raise SystemExit(f"--context: {exc}") from None
    for name in Protocol.__dataclass_fields__:
        v = getattr(a, name, None)
        if v is None or name in {"data", "images", "masks", "synthetic_n", "synthetic_size", "context_offsets"}:
            continue
        if name == "full_seeds":
            v = [int(s) for s in str(v).split(",") if s.strip() != ""]
        setattr(p, name, v)
    if p.m < 1 or p.k < 1 or p.rounds < 0 or p.pool_size < p.m:
        raise SystemExit(f"invalid protocol: m={p.m} k={p.k} rounds={p.rounds} pool_size={p.pool_size}")
    return p, preset


def _check_arms(path: Path, arms: dict[str, dict], force: bool) -> None:
    """Store what each arm ran (``default`` is the Settings of the command); an arm already in ``path`` that resolves
    differently now (a setting changed) stops the run, as a different protocol does, unless ``force``."""
    old = json.loads(path.read_text()) if path.exists() else {}
    changed = {k: (old[k], v) for k, v in arms.items() if k in old and old[k] != v}
    if changed and not force:
        raise SystemExit(
            f"{path.parent} holds runs of arms that now resolve differently (changed settings?): {changed}; use "
            "another --out or --force"
        )
    write_json(path, {**old, **arms})


SUBCOMMANDS = {
    "hygiene": "ml_backend.benchmarks.hygiene",
    "region-effort": "ml_backend.benchmarks.region_effort",
    "rename": "ml_backend.benchmarks.rename",
}


def main(argv: list[str] | None = None) -> int:
    import sys

    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] in SUBCOMMANDS:  # thin delegation: the module's own parser
        import importlib

        return int(importlib.import_module(SUBCOMMANDS[args[0]]).main(args[1:]) or 0)
    a = parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO, format="%(asctime)s %(processName)s %(message)s"
    )
    p, preset = build_protocol(a)
    out: Path = a.out or REPO / "benchmarks" / "active_learning" / (
        preset + {"synthetic": "-synthetic", "volume": f"-volume-{p.volume_setting}"}.get(p.data, "")
    )
    out.mkdir(parents=True, exist_ok=True)
    if a.report_only:
        saved = out / "protocol.json"
        rep = write_outputs(out, load_runs(out), Protocol(**json.loads(saved.read_text())) if saved.exists() else None)
        print_summary(rep)
        return 0

    names = available_strategies()
    if a.strategies is not None:  # "" = none (e.g. only the full-supervision reference)
        strategies = [s.strip() for s in a.strategies.split(",") if s.strip()]
    else:  # the product's default is in every run unless the arms are named
        strategies = ["random", "entropy", DEFAULT_ARM] if a.quick else [*names, DEFAULT_ARM]
    try:
        settings = Settings.from_env()
    except ConfigError as exc:
        raise SystemExit(str(exc)) from None
    arms, unknown = {}, []
    for s in strategies:
        try:
            arms[s] = resolve_arm(p, s, settings)
        except ValueError as exc:
            unknown.append(f"{s} ({exc})")
    if unknown:
        raise SystemExit(
            f"unknown strategies {unknown}; available: {', '.join(names)}, {DEFAULT_ARM} (+stack, +div, +wkm, +astack, "
            "+softrank for stack-aware batches; +semi for the semi-supervised term)"
        )
    seeds = [int(s) for s in (a.seeds or ("0" if a.quick else "0,1,2")).split(",")]
    saved = out / "protocol.json"
    if saved.exists() and not a.force:
        old = json.loads(saved.read_text())
        # Fields added to the protocol later (e.g. context_offsets) read as their default in older output dirs.
        defaults = json.loads(json.dumps({**asdict(Protocol()), **{k: getattr(p, k) for k in DEFAULT_ARM_ONLY_FIELDS}}))
        old = {**{k: v for k, v in defaults.items() if k not in old}, **old}
        if old != json.loads(json.dumps(asdict(p))):
            diff = {k: (old.get(k), v) for k, v in asdict(p).items() if old.get(k) != v}
            raise SystemExit(f"{out} holds runs of a different protocol {diff}; use another --out or --force")
    write_json(saved, asdict(p))
    _check_arms(out / "arms.json", {k: asdict(v) for k, v in arms.items()}, a.force)
    log.info("protocol (%s): %s", preset, asdict(p))
    log.info("strategies %s, seeds %s, output %s", strategies, seeds, out)
    t0 = time.monotonic()
    done = run_all(out, p, strategies, seeds, a.workers, a.max_runs, arms=arms)
    log.info("%d runs finished in %.0fs", done, time.monotonic() - t0)
    rep = write_outputs(
        out, [r for r in load_runs(out) if r["strategy"] in strategies + ["full"] and r["seed"] in seeds], p
    )
    print_summary(rep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
