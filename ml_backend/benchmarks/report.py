"""The benchmark's report: per-round tables, per-strategy summaries (AULC, gains vs random, effort), plots, markdown.

Reads only the saved run records, so a report can be rebuilt at any time (``--report-only``).
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from ml_backend.benchmarks.machine import describe
from ml_backend.benchmarks.protocol import Protocol
from ml_backend.store.atomic import write_atomic


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write: an interrupted benchmark never leaves half a run record (resuming trusts the files)."""
    write_atomic(path, json.dumps(obj, indent=1))


def load_runs(out: Path) -> list[dict]:
    return [json.loads(f.read_text()) for f in sorted((out / "runs").glob("*.json"))]


def _curves(runs: list[dict]) -> dict[str, dict[int, dict]]:
    """strategy -> seed -> arrays over rounds."""
    cur: dict[str, dict[int, dict]] = {}
    for r in runs:
        rs = r["rounds"]
        cur.setdefault(r["strategy"], {})[r["seed"]] = {
            key: np.array([x[key] for x in rs], dtype=float)
            for key in ("labelled", "pixels", "boundary", "iou", "dice")
        }
    return cur


def _first_reach(x: np.ndarray, y: np.ndarray, target: float) -> float | None:
    """Smallest x (linear interpolation) where the curve y first reaches target; None if it never does."""
    for i in range(len(y)):
        if y[i] >= target:
            if i == 0:
                return float(x[0])
            f = (target - y[i - 1]) / (y[i] - y[i - 1])
            return float(x[i - 1] + f * (x[i] - x[i - 1]))
    return None


def paired_rounds(runs: list[dict], ref: str = "random") -> dict[str, Any]:
    """Issue 11's per-round reading: for every arm, per round, the paired difference to ``ref`` over the seeds both
    ran (same seed = same pool, initial tiles and initial model), and diagnostics of the labelled set.

    Per round: IoU mean/std; IoU difference (points) and relative gain (%) vs ``ref``: mean, std, min over seeds;
    seeds at or above ``ref``; the labelled set's foreground fraction and boundary length per tile, and the same for
    the batch added that round (issue 11: an uncertainty batch can shift the class prior and the boundary load).
    Per arm: the relative gain averaged over rounds 1.. (per seed, then mean/std over seeds).
    """
    by: dict[str, dict[int, list[dict]]] = {}
    for r in runs:
        if r["strategy"] != "full":
            by.setdefault(r["strategy"], {})[r["seed"]] = r["rounds"]
    out: dict[str, Any] = {}
    base = by.get(ref, {})
    for st, seeds in by.items():
        n_r = min(len(v) for v in seeds.values())
        rows = []
        per_seed_rel: dict[int, list[float]] = {}
        for i in range(n_r):
            ious = np.array([seeds[sd][i]["iou"] for sd in seeds])
            row: dict[str, Any] = {
                "round": i,
                "labelled": float(np.mean([seeds[sd][i]["labelled"] for sd in seeds])),
                "seeds": len(seeds),
                "iou_mean": float(ious.mean()),
                "iou_std": float(ious.std()),
            }
            fg, bpt, bfg, bbpt = [], [], [], []
            for sd in seeds:
                cur = seeds[sd][i]
                if "foreground_pixels" not in cur:  # records without the diagnostics
                    continue
                fg.append(cur["foreground_pixels"] / max(1, cur["pixels"]))
                bpt.append(cur["boundary"] / max(1, cur["labelled"]))
                if i > 0:
                    prev = seeds[sd][i - 1]
                    dp, dn = cur["pixels"] - prev["pixels"], cur["labelled"] - prev["labelled"]
                    bfg.append((cur["foreground_pixels"] - prev["foreground_pixels"]) / max(1, dp))
                    bbpt.append((cur["boundary"] - prev["boundary"]) / max(1, dn))
            row["labelled_foreground"] = float(np.mean(fg)) if fg else None
            row["labelled_boundary_per_tile"] = float(np.mean(bpt)) if bpt else None
            row["batch_foreground"] = float(np.mean(bfg)) if bfg else None
            row["batch_boundary_per_tile"] = float(np.mean(bbpt)) if bbpt else None
            pairs = [(seeds[sd][i]["iou"], base[sd][i]["iou"], sd) for sd in seeds if sd in base and i < len(base[sd])]
            if pairs and st != ref:
                d = np.array([a - b for a, b, _ in pairs])
                rel = np.array([100 * (a / b - 1) if b > 0 else np.nan for a, b, _ in pairs])
                row.update(
                    diff_mean=float(d.mean()), diff_std=float(d.std()), diff_min=float(d.min()),
                    rel_mean=float(np.nanmean(rel)), rel_std=float(np.nanstd(rel)), rel_min=float(np.nanmin(rel)),
                    paired_seeds=len(pairs), seeds_at_or_above=int((d >= 0).sum()),
                )  # fmt: skip
                if i > 0:
                    for (_, _, sd), g in zip(pairs, rel, strict=True):
                        per_seed_rel.setdefault(sd, []).append(float(g))
            rows.append(row)
        entry: dict[str, Any] = {"rounds": rows}
        if per_seed_rel:
            m = np.array([np.mean(v) for v in per_seed_rel.values()])
            entry["rel_gain_rounds_1plus"] = [float(m.mean()), float(m.std()), len(m)]
            entry["at_or_above_every_round_paired"] = all(
                r.get("diff_mean", 0.0) >= 0 for r in rows[1:] if "diff_mean" in r
            )
        out[st] = entry
    return out


EFFORT_KEYS = ("effort_tiles", "effort_changed_fraction", "effort_boundary_edited", "effort_boundary_scratch")


def served_effort_rounds(runs: list[dict]) -> dict[tuple[str, int], dict[str, float | None]]:
    """(arm, round) -> the pre-annotation effort of the tiles that round's model picked (``run.served_effort``,
    issue 17.6), mean over the seeds that recorded it; ``effort_saved`` = 1 - outline edited / from scratch."""
    acc: dict[tuple[str, int], list[dict]] = {}
    for r in runs:
        for x in r["rounds"]:
            if x.get("effort_tiles"):
                acc.setdefault((r["strategy"], int(x["round"])), []).append(x)
    out: dict[tuple[str, int], dict[str, float | None]] = {}
    for key, xs in acc.items():
        row: dict[str, float | None] = {k: float(np.mean([x[k] for x in xs])) for k in EFFORT_KEYS}
        scratch = row["effort_boundary_scratch"] or 0.0
        row["effort_saved"] = 1.0 - (row["effort_boundary_edited"] or 0.0) / scratch if scratch > 0 else None
        out[key] = row
    return out


def summarize(runs: list[dict]) -> dict[str, Any]:
    """Per-round table and per-strategy summary (mean over seeds; spreads reported beside)."""
    cur = _curves(runs)
    full = cur.pop("full", {})
    table: list[dict] = []
    mean_curve: dict[str, dict[str, np.ndarray]] = {}
    for st, seeds in cur.items():
        n_r = min(len(v["iou"]) for v in seeds.values())
        stack = {
            key: np.stack([v[key][:n_r] for v in seeds.values()])
            for key in ("labelled", "pixels", "boundary", "iou", "dice")
        }
        mean_curve[st] = {key: a.mean(axis=0) for key, a in stack.items()} | {"iou_std": stack["iou"].std(axis=0)}
        for i in range(n_r):
            table.append(
                {
                    "strategy": st,
                    "round": i,
                    "seeds": len(seeds),
                    "labelled": float(stack["labelled"][:, i].mean()),
                    "pixels": float(stack["pixels"][:, i].mean()),
                    "boundary_mean": float(stack["boundary"][:, i].mean()),
                    "boundary_std": float(stack["boundary"][:, i].std()),
                    "iou_mean": float(stack["iou"][:, i].mean()),
                    "iou_std": float(stack["iou"][:, i].std()),
                    "iou_min": float(stack["iou"][:, i].min()),
                    "iou_max": float(stack["iou"][:, i].max()),
                    "dice_mean": float(stack["dice"][:, i].mean()),
                    "dice_std": float(stack["dice"][:, i].std()),
                }
            )
    full_iou = [float(v["iou"][0]) for v in full.values()]
    summary: dict[str, dict] = {}
    rnd = mean_curve.get("random")
    for st, mc in mean_curve.items():
        seeds = cur[st]
        x, y = mc["labelled"], mc["iou"]
        span = x[-1] - x[0]
        aulc = float(np.trapezoid(y, x) / span) if span > 0 else float(y[0])
        # Spreads: round-to-round movement of each seed's curve, seed-to-seed std per round.
        steps = np.concatenate([np.diff(v["iou"]) for v in seeds.values()])
        entry: dict[str, Any] = {
            "seeds": sorted(seeds),
            "final_labelled": float(x[-1]),
            "final_iou": float(y[-1]),
            "final_iou_std": float(mc["iou_std"][-1]),
            "aulc": aulc,
            "round_to_round_abs_change": float(np.abs(steps).mean()) if len(steps) else 0.0,
            "round_to_round_drops": int((steps < -0.01).sum()),
            "round_to_round_steps": int(len(steps)),
            "seed_std_mean": float(mc["iou_std"].mean()),
            "final_boundary": float(mc["boundary"][-1]),
        }
        if rnd is not None and len(rnd["iou"]) >= 2:
            n = min(len(y), len(rnd["iou"]))
            entry["gain_final_pct"] = float(100 * (y[n - 1] / rnd["iou"][n - 1] - 1)) if rnd["iou"][n - 1] > 0 else None
            gains = [100 * (y[i] / rnd["iou"][i] - 1) for i in range(1, n) if rnd["iou"][i] > 0]
            entry["gain_after_first_pct"] = float(np.mean(gains)) if gains else None
            reach = _first_reach(x, y, float(rnd["iou"][n - 1]))
            entry["labels_to_random_final"] = reach
            entry["label_fraction_of_random"] = None if reach is None else reach / float(rnd["labelled"][n - 1])
        summary[st] = entry
    # Equal boundary-length effort: IoU interpolated on a common effort grid (per seed, then averaged).
    effort: dict[str, Any] = {}
    if cur:
        lo = max(min(v["boundary"][0] for v in s.values()) for s in cur.values())
        hi = min(min(v["boundary"][-1] for v in s.values()) for s in cur.values())
        if hi > lo:
            grid = np.linspace(lo, hi, 25)
            for st, seeds in cur.items():
                ys = np.stack([np.interp(grid, v["boundary"], v["iou"]) for v in seeds.values()])
                effort[st] = {
                    "auc": float(np.trapezoid(ys.mean(axis=0), grid) / (hi - lo)),
                    "iou_at_max": float(ys.mean(axis=0)[-1]),
                }
            effort["grid"] = [float(lo), float(hi)]
    # Paired comparisons (same seed = same pool, initial set and model): per-seed differences, then mean +- std.
    for st, seeds in cur.items():
        for ref in ("random", "entropy"):
            if ref not in cur or ref == st:
                continue
            d_auc, d_eff = [], []
            for sd, v in seeds.items():
                w = cur[ref].get(sd)
                if w is None:
                    continue
                n = min(len(v["iou"]), len(w["iou"]))
                span = v["labelled"][n - 1] - v["labelled"][0]
                if span > 0:
                    a = np.trapezoid(v["iou"][:n], v["labelled"][:n]) - np.trapezoid(w["iou"][:n], w["labelled"][:n])
                    d_auc.append(a / span)
                e_lo, e_hi = max(v["boundary"][0], w["boundary"][0]), min(v["boundary"][-1], w["boundary"][-1])
                if e_hi > e_lo:  # mean IoU difference at equal boundary-length effort, on the pair's common range
                    g = np.linspace(e_lo, e_hi, 50)
                    diff = np.interp(g, v["boundary"], v["iou"]) - np.interp(g, w["boundary"], w["iou"])
                    d_eff.append(float(np.mean(diff)))
            entry = summary[st]
            if d_auc:
                entry[f"paired_aulc_gain_vs_{ref}"] = [float(np.mean(d_auc)), float(np.std(d_auc)), len(d_auc)]
            if d_eff:
                entry[f"equal_effort_iou_gain_vs_{ref}"] = [float(np.mean(d_eff)), float(np.std(d_eff)), len(d_eff)]
    served = served_effort_rounds(runs)
    for row in table:
        row.update(served.get((row["strategy"], row["round"]), {}))
    return {
        "table": table,
        "summary": summary,
        "paired_rounds": paired_rounds(runs),
        "effort": effort,
        "full_supervision": {"iou": full_iou, "mean": float(np.mean(full_iou)) if full_iou else None},
    }


CURVE_COLUMNS = [
    "strategy", "round", "seeds", "labelled", "pixels", "boundary_mean", "boundary_std",
    "iou_mean", "iou_std", "iou_min", "iou_max", "dice_mean", "dice_std",
    *EFFORT_KEYS, "effort_saved",
]  # fmt: skip


def write_outputs(out: Path, runs: list[dict], protocol: Protocol | None = None) -> dict[str, Any]:
    """curves.csv, summary.csv, results.json, iou_vs_tiles.png, iou_vs_effort.png under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = summarize(runs)
    if not runs:
        raise SystemExit(f"no finished runs under {out / 'runs'}")
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CURVE_COLUMNS)
        w.writeheader()
        w.writerows(rep["table"])
    cols = [
        "strategy", "seeds", "final_labelled", "final_iou", "final_iou_std", "aulc", "gain_final_pct",
        "gain_after_first_pct", "labels_to_random_final", "label_fraction_of_random", "effort_auc",
        "round_to_round_abs_change", "round_to_round_drops", "seed_std_mean",
    ]  # fmt: skip
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for st, e in rep["summary"].items():
            w.writerow(
                {"strategy": st, **e, "seeds": len(e["seeds"]), "effort_auc": rep["effort"].get(st, {}).get("auc")}
            )
    meta = {"protocol": asdict(protocol) if protocol else None, "machine": describe()}
    write_json(out / "results.json", {**meta, **rep, "runs": runs})
    (out / "summary.md").write_text(markdown_report(rep, runs))
    by = {}
    for row in rep["table"]:
        by.setdefault(row["strategy"], []).append(row)
    for xkey, fname, xlabel in (
        ("labelled", "iou_vs_tiles.png", "labelled tiles"),
        ("boundary_mean", "iou_vs_effort.png", "annotated boundary length (pixels, effort)"),
    ):
        fig, ax = plt.subplots(figsize=(8, 5.5))
        for st, rows in sorted(by.items()):
            x = np.array([r[xkey] for r in rows])
            y = np.array([r["iou_mean"] for r in rows])
            s = np.array([r["iou_std"] for r in rows])
            style = {"lw": 2.5, "color": "black"} if st == "random" else {"lw": 1.5}
            ax.plot(x, y, marker="o", ms=3, label=f"{st} (n={rows[0]['seeds']})", **style)
            ax.fill_between(x, y - s, y + s, alpha=0.12, color=ax.lines[-1].get_color())
        if rep["full_supervision"]["mean"] is not None:
            ax.axhline(rep["full_supervision"]["mean"], ls="--", color="grey", label="full supervision")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test IoU (mean ± std over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, ncol=2)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=110)
        plt.close(fig)
    pr = rep.get("paired_rounds", {})
    arms = [st for st in sorted(pr) if any("diff_mean" in r for r in pr[st]["rounds"])]
    if arms:  # issue 11: the paired IoU difference to random at every round, mean ± std over seeds
        fig, ax = plt.subplots(figsize=(8, 5))
        for j, st in enumerate(arms):
            rows = [r for r in pr[st]["rounds"] if "diff_mean" in r]
            x = np.array([r["labelled"] for r in rows]) + (j - (len(arms) - 1) / 2) * 1.2
            ax.errorbar(x, [r["diff_mean"] for r in rows], yerr=[r["diff_std"] for r in rows], marker="o", ms=4,
                        capsize=3, label=f"{st} (n={rows[0]['paired_seeds']})")  # fmt: skip
        ax.axhline(0, color="black", lw=1)
        ax.set_xlabel("labelled tiles")
        ax.set_ylabel("test IoU - random's, same seed (mean ± std)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "gain_vs_random.png", dpi=110)
        plt.close(fig)
    return rep


def _fmt(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def markdown_report(rep: dict[str, Any], runs: list[dict]) -> str:
    """Markdown tables for benchmarks/active_learning.md: summary per strategy and every seed's curve."""
    lines = [
        f"Full supervision IoU: {', '.join(_fmt(v) for v in rep['full_supervision']['iou']) or '-'}",
        "",
        "| strategy | seeds | final tiles | final IoU (mean ± std) | AULC | gain vs random, final | gain vs random, "
        "rounds > 0 | tiles to random's final IoU | IoU-vs-effort AUC | mean abs. round-to-round change | drops "
        "> 0.01 | seed std (mean over rounds) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for st, e in sorted(rep["summary"].items(), key=lambda kv: -kv[1]["aulc"]):
        lines.append(
            f"| {st} | {len(e['seeds'])} | {e['final_labelled']:.0f} | {e['final_iou']:.3f} ± {e['final_iou_std']:.3f} "
            f"| {e['aulc']:.3f} | {_fmt(e.get('gain_final_pct'), '+.1f')}% "
            f"| {_fmt(e.get('gain_after_first_pct'), '+.1f')}% "
            f"| {_fmt(e.get('labels_to_random_final'), '.0f')} | {_fmt(rep['effort'].get(st, {}).get('auc'))} "
            f"| {e['round_to_round_abs_change']:.3f} | {e['round_to_round_drops']}/{e['round_to_round_steps']} "
            f"| {e['seed_std_mean']:.3f} |"
        )
    lines += [
        "",
        "Paired per-seed differences (mean ± std over seeds, IoU points): AULC vs random; IoU at equal boundary effort",
        "(on each pair's common effort range) vs random and vs entropy.",
        "",
        "| strategy | AULC gain vs random | equal-effort gain vs random | equal-effort gain vs entropy |",
        "|---|---|---|---|",
    ]

    def pm(v: list | None) -> str:
        return "-" if not v else f"{v[0]:+.3f} ± {v[1]:.3f} (n={v[2]})"

    for st, e in sorted(rep["summary"].items(), key=lambda kv: -kv[1]["aulc"]):
        lines.append(
            f"| {st} | {pm(e.get('paired_aulc_gain_vs_random'))} | {pm(e.get('equal_effort_iou_gain_vs_random'))} "
            f"| {pm(e.get('equal_effort_iou_gain_vs_entropy'))} |"
        )
    pr = rep.get("paired_rounds", {})
    if pr:
        lines += [
            "",
            "Per round, paired over seeds vs random (same pool, initial tiles and model per seed): IoU mean ± std; the",
            "IoU difference to random (points, mean ± std, min); relative gain (%, mean ± std); seeds >= random;",
            "the labelled set's foreground fraction and boundary per tile; the same for the batch added that round.",
            "",
            "| arm | round | tiles | IoU | diff vs random | min diff | rel. gain | seeds >= random | labelled fg "
            "| labelled boundary/tile | batch fg | batch boundary/tile |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for st in sorted(pr):
            for r in pr[st]["rounds"]:
                d = (
                    f"{r['diff_mean']:+.3f} ± {r['diff_std']:.3f} | {r['diff_min']:+.3f} "
                    f"| {r['rel_mean']:+.1f}% ± {r['rel_std']:.1f} | {r['seeds_at_or_above']}/{r['paired_seeds']}"
                    if "diff_mean" in r
                    else "- | - | - | -"
                )
                lines.append(
                    f"| {st} | {r['round']} | {r['labelled']:.0f} | {r['iou_mean']:.3f} ± {r['iou_std']:.3f} | {d} "
                    f"| {_fmt(r['labelled_foreground'])} | {_fmt(r['labelled_boundary_per_tile'], '.0f')} "
                    f"| {_fmt(r['batch_foreground'])} | {_fmt(r['batch_boundary_per_tile'], '.0f')} |"
                )
        lines += ["", "| arm | rel. gain vs random, mean over rounds >= 1 (per seed, then mean ± std) | >= random "
                  "at every round (paired mean) |", "|---|---|---|"]  # fmt: skip
        for st in sorted(pr):
            g = pr[st].get("rel_gain_rounds_1plus")
            if g:
                lines.append(
                    f"| {st} | {g[0]:+.1f}% ± {g[1]:.1f} (n={g[2]}) | {pr[st]['at_or_above_every_round_paired']} |"
                )
    served = [row for row in rep["table"] if row.get("effort_tiles")]
    if served:  # issue 17.6: the quantity the status page shows per serving version, here per round's model
        lines += [
            "",
            "Pre-annotation effort per round (mean over seeds): the oracle's masks of the tiles a round's model picked",
            "against that model's predictions of them; outline in pixels per tile; effort saved = 1 - edited / from",
            "scratch.",
            "",
            "| arm | round | tiles | pixels changed | outline edited | outline from scratch | effort saved |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in served:
            lines.append(
                f"| {row['strategy']} | {row['round']} | {row['effort_tiles']:.0f} "
                f"| {row['effort_changed_fraction']:.3f} | {row['effort_boundary_edited']:.0f} "
                f"| {row['effort_boundary_scratch']:.0f} | {_fmt(row['effort_saved'], '.0%')} |"
            )
    lines += [
        "",
        "Test IoU per round (each seed):",
        "",
        "| strategy | seed | IoU by round | boundary effort by round |",
    ]
    lines.append("|---|---|---|---|")
    for r in sorted(runs, key=lambda r: (r["strategy"], r["seed"])):
        ious = " ".join(f"{x['iou']:.3f}" for x in r["rounds"])
        eff = " ".join(f"{x['boundary']:.0f}" for x in r["rounds"])
        lines.append(f"| {r['strategy']} | {r['seed']} | {ious} | {eff} |")
    return "\n".join(lines) + "\n"


def print_summary(rep: dict[str, Any]) -> None:
    print(f"full supervision IoU: {rep['full_supervision']}")
    head = ("strategy", "final IoU", "AULC", "gain%", "gain>1%", "labels->rnd", "effortAUC", "r2r")
    print("{:18s} {:>14s} {:>6s} {:>7s} {:>8s} {:>11s} {:>9s} {:>6s}".format(*head))
    for st, e in sorted(rep["summary"].items(), key=lambda kv: -kv[1]["aulc"]):
        g = e.get("gain_final_pct")
        g1 = e.get("gain_after_first_pct")
        lab = e.get("labels_to_random_final")
        eff = rep["effort"].get(st, {}).get("auc", float("nan"))
        print(
            f"{st:18s} {e['final_iou']:.3f}±{e['final_iou_std']:.3f}  {e['aulc']:.3f} "
            f"{'' if g is None else f'{g:+7.1f}':>7s} {'' if g1 is None else f'{g1:+8.1f}':>8s} "
            f"{'never' if lab is None else f'{lab:.0f}':>11s} {eff:9.3f} "
            f"{e['round_to_round_abs_change']:6.3f}"
        )
