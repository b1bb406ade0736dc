"""Issue 17's decision, as code: ``benchmarks/label_efficiency/RULE.md`` applied to the runs of the three data sets.

    python -m ml_backend.benchmarks.decide                        # benchmarks/label_efficiency/{vnc,lucchi,volume}
    python -m ml_backend.benchmarks.decide --root DIR --seeds 5

Reads only saved run records (``report.load_runs``), pairs every candidate with random seed by seed
(``report.paired_rounds``), applies the rule (eligibility: no round's mean paired difference below -0.02 IoU on any
data set; then the highest mean relative gain), reports the issue's targets strictly, and the emulated promotion
gate (``run.emulated_gate``): how many harmful rounds (test IoU down by more than the tolerance) it would have
held back. Writes ``decision.json``, ``decision.md`` and ``decision.png`` under the root.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.benchmarks.data import REPO
from ml_backend.benchmarks.report import load_runs, paired_rounds, write_json
from ml_backend.benchmarks.run import GATE_TOLERANCE

DATASETS = ("vnc", "lucchi", "volume")
# RULE.md's candidates, in its order (ties go to the earlier one), by the names their runs carry since the decision
# landed (``benchmarks.rename``): C2 `default@safe-scratch`; C3, chosen and shipped, `default` (run as
# `default@safe-scratch-long`); C0, the default shipped before, `default@cold-start` (run as `default`).
CANDIDATES = ("default@safe-scratch", "default", "default@cold-start")
# Measured beside the candidates, not candidates (RULE.md amendment 2): the semi-supervised term (issue 17.3).
MEASURED = ("random+semi", "default+semi")
REFERENCE = "random"
HARM = 0.02  # RULE.md step 1: a mean paired difference within -0.02 IoU is not evidence of harm
TIE = 0.5  # percentage points


def dataset_summary(runs: list[dict], arms: tuple[str, ...]) -> dict[str, Any]:
    """Per arm: seeds, IoU mean/sd per round, paired difference to random per round (mean, sd), mean rel. gain."""
    paired = paired_rounds(runs, REFERENCE)
    out: dict[str, Any] = {}
    for arm in (REFERENCE, *arms):
        if arm not in paired:
            continue
        rows = paired[arm]["rounds"]
        out[arm] = {
            "seeds": sorted(r["seed"] for r in runs if r["strategy"] == arm),
            "labelled": [r["labelled"] for r in rows],
            "iou": [(r["iou_mean"], r["iou_std"]) for r in rows],
            "diff": [(r.get("diff_mean"), r.get("diff_std")) for r in rows] if arm != REFERENCE else None,
            "rel_gain": paired[arm].get("rel_gain_rounds_1plus"),
        }
    return out


def gate_stats(runs: list[dict]) -> dict[str, dict[str, int]]:
    """Per arm, over rounds 1.. of every seed: harmful rounds (test IoU below the previous round's by more than the
    tolerance) and what the emulated gate decided for them and for the others."""
    out: dict[str, dict[str, int]] = {}
    for r in runs:
        s = out.setdefault(r["strategy"], {k: 0 for k in ("rounds", "harmful", "caught", "inactive", "false_holds")})
        rs = r["rounds"]
        for prev, cur in zip(rs, rs[1:], strict=False):
            if "gate" not in cur:
                continue
            s["rounds"] += 1
            harmful = cur["iou"] < prev["iou"] - GATE_TOLERANCE
            held = cur["gate"] in ("hold", "undecided")
            s["harmful"] += harmful
            s["caught"] += harmful and held
            s["inactive"] += harmful and cur["gate"] == "not enough audit tiles"
            s["false_holds"] += (not harmful) and held
    return out


def decide(root: Path, seeds: int = 5, candidates: tuple[str, ...] = CANDIDATES) -> dict[str, Any]:
    """RULE.md on the runs under ``root/<data set>``."""
    runs = {ds: load_runs(root / ds) if (root / ds / "runs").is_dir() else [] for ds in DATASETS}
    shown = candidates + tuple(m for m in MEASURED if m not in candidates)
    summary = {ds: dataset_summary(runs[ds], shown) for ds in DATASETS}
    verdicts: dict[str, Any] = {}
    for c in candidates:
        complete = all(len(summary[ds].get(c, {}).get("seeds", [])) >= seeds for ds in DATASETS) and all(
            len(summary[ds].get(REFERENCE, {}).get("seeds", [])) >= seeds for ds in DATASETS
        )
        worst = {
            ds: min((d for d, _ in summary[ds][c]["diff"] if d is not None), default=None) if c in summary[ds] else None
            for ds in DATASETS
        }
        gains = {ds: (summary[ds][c]["rel_gain"] or [None])[0] if c in summary[ds] else None for ds in DATASETS}
        known = [w for w in worst.values() if w is not None]
        verdicts[c] = {
            "complete": complete,
            "worst_round_diff": worst,
            "eligible": complete and len(known) == len(DATASETS) and min(known) >= -HARM,
            "rel_gain": gains,
            "mean_rel_gain": float(np.mean([g for g in gains.values() if g is not None]))
            if any(g is not None for g in gains.values())
            else None,
            "targets": targets(summary, c),
        }
    eligible = [c for c in candidates if verdicts[c]["eligible"]]
    if eligible:
        best = max(verdicts[c]["mean_rel_gain"] for c in eligible)
        chosen = next(c for c in eligible if verdicts[c]["mean_rel_gain"] >= best - TIE)
        why = "eligible, highest mean relative gain (ties to the earlier candidate)"
    else:
        complete = [c for c in candidates if verdicts[c]["complete"]] or list(candidates)
        chosen = max(complete, key=lambda c: min((w for w in verdicts[c]["worst_round_diff"].values()
                                                  if w is not None), default=-np.inf))  # fmt: skip
        why = "no candidate eligible: the least harm (highest worst mean paired difference)"
    return {
        "root": str(root),
        "seeds_required": seeds,
        "candidates": list(candidates),
        "verdicts": verdicts,
        "chosen": chosen,
        "why": why,
        "summary": summary,
        "gate": {ds: gate_stats(runs[ds]) for ds in DATASETS},
    }


def targets(summary: dict[str, Any], arm: str) -> dict[str, Any]:
    """The issue's targets, strictly: at or above random at every round 1-5 (mean paired), mean gain >= +10% on at
    least two data sets, round 0 at least random's on all, VNC 40-tile IoU >= 0.45."""
    per = {ds: summary[ds].get(arm) for ds in DATASETS}
    above = {
        ds: None if s is None else all(d is not None and d >= 0 for d, _ in s["diff"][1:]) for ds, s in per.items()
    }
    gain10 = sum(1 for s in per.values() if s and s["rel_gain"] and s["rel_gain"][0] >= 10)
    round0 = {ds: None if s is None else s["diff"][0][0] is not None and s["diff"][0][0] >= 0 for ds, s in per.items()}
    vnc = per["vnc"]
    vnc40 = vnc["iou"][1][0] if vnc and len(vnc["iou"]) > 1 else None
    return {
        "at_or_above_every_round": above,
        "datasets_with_10pct_gain": gain10,
        "round0_at_least_random": round0,
        "vnc_40_tile_iou": vnc40,
        "vnc_40_tile_target_met": None if vnc40 is None else vnc40 >= 0.45,
    }


def _pm(pair: tuple[float | None, float | None] | None, signed: bool = False) -> str:
    if pair is None or pair[0] is None:
        return "-"
    m, s = pair
    return f"{m:+.3f} ± {s:.3f}" if signed else f"{m:.3f} ± {s:.3f}"


def markdown(dec: dict[str, Any]) -> str:
    lines = ["# Issue 17's decision (`python -m ml_backend.benchmarks.decide`, rule: RULE.md)", ""]
    for ds in DATASETS:
        s = dec["summary"][ds]
        if not s:
            continue
        head = "| arm | seeds | test IoU per round (mean; sd) | IoU - random, paired, per round | mean rel. gain |"
        lines += [f"## {ds}", "", head, "|---|---:|---|---|---:|"]
        for arm, a in s.items():
            iou = " / ".join(f"{m:.3f}" for m, _ in a["iou"])
            sd = max(sd for _, sd in a["iou"])
            diff = " / ".join(_pm(d, signed=True) for d in a["diff"]) if a["diff"] else "-"
            gain = f"{a['rel_gain'][0]:+.1f}% ± {a['rel_gain'][1]:.1f}" if a["rel_gain"] else "-"
            name = f"**{arm}**" if arm == dec["chosen"] else arm
            lines.append(f"| {name} | {len(a['seeds'])} | {iou} (sd <= {sd:.3f}) | {diff} | {gain} |")
        labelled = " / ".join(str(int(x)) for x in next(iter(s.values()))["labelled"])
        lines += ["", f"Rounds at {labelled} labelled tiles.", ""]
    lines += ["## The rule", ""]
    for c, v in dec["verdicts"].items():
        worst = ", ".join(f"{ds} {w:+.3f}" for ds, w in v["worst_round_diff"].items() if w is not None)
        gains = ", ".join(f"{ds} {g:+.1f}%" for ds, g in v["rel_gain"].items() if g is not None)
        lines.append(f"- `{c}`: complete {v['complete']}, eligible {v['eligible']}; worst round {worst}; gains {gains}")
    lines += ["", f"Chosen: **`{dec['chosen']}`** ({dec['why']}).", "", "## Targets (strict)", ""]
    for c, v in dec["verdicts"].items():
        t = v["targets"]
        v40 = t["vnc_40_tile_iou"]
        lines.append(f"- `{c}`: at or above random every round {t['at_or_above_every_round']}; data sets with >= +10% "
                     f"{t['datasets_with_10pct_gain']}; 20 tiles >= random {t['round0_at_least_random']}; VNC 40 tiles "
                     f"{v40 if v40 is None else round(v40, 3)}")  # fmt: skip
    lines += ["", "## The emulated promotion gate (10% audit tiles, tolerance 0.02)", "",
              "| data set | arm | rounds | harmful (test IoU down > 0.02) | held back by the gate | gate not active "
              "yet | held back, not harmful |", "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for ds in DATASETS:
        for arm, g in dec["gate"][ds].items():
            if g["rounds"]:
                lines.append(f"| {ds} | {arm} | {g['rounds']} | {g['harmful']} | {g['caught']} | {g['inactive']} | "
                             f"{g['false_holds']} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(dec: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(DATASETS), figsize=(5 * len(DATASETS), 3.8), sharey=True)
    for ax, ds in zip(axes, DATASETS, strict=True):
        for arm, a in dec["summary"][ds].items():
            if not a["diff"]:
                continue
            x = a["labelled"]
            m = np.array([d if d is not None else np.nan for d, _ in a["diff"]])
            e = np.array([s if s is not None else np.nan for _, s in a["diff"]])
            ax.errorbar(x, m, yerr=e, marker="o", capsize=3, label=f"{arm} ({len(a['seeds'])} seeds)")
        ax.axhline(0, color="grey", lw=1)
        ax.axhline(-HARM, color="grey", lw=0.8, ls=":")
        ax.set_title(ds)
        ax.set_xlabel("labelled tiles")
        ax.legend(fontsize=8)  # per panel: the seeds differ between data sets
    axes[0].set_ylabel("test IoU - random (paired, mean ± sd)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=REPO / "benchmarks" / "label_efficiency")
    ap.add_argument("--seeds", type=int, default=5, help="seeds a candidate needs on every data set")
    ap.add_argument("--candidates", default=",".join(CANDIDATES))
    a = ap.parse_args(argv)
    dec = decide(a.root, a.seeds, tuple(c.strip() for c in a.candidates.split(",") if c.strip()))
    write_json(a.root / "decision.json", dec)
    text = markdown(dec)
    (a.root / "decision.md").write_text(text)
    if any(dec["summary"][ds] for ds in DATASETS):
        plot(dec, a.root / "decision.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
