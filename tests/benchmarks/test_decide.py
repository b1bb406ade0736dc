"""RULE.md as code (``benchmarks.decide``): eligibility, the choice, strict targets and the emulated gate's counts."""

from __future__ import annotations

import json

import pytest

from ml_backend.benchmarks import decide as d

LABELLED = [20, 40, 60, 80, 100, 120]


def _write(root, ds, arm, seed, ious, gates=None):
    rounds = [{"round": i, "labelled": n, "iou": v} for i, (n, v) in enumerate(zip(LABELLED, ious, strict=True))]
    for r, g in zip(rounds[1:], gates or [], strict=False):
        r["gate"] = g
    path = root / ds / "runs" / f"{arm}__seed{seed}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"strategy": arm, "seed": seed, "rounds": rounds}))


def _data(root, a_shift, b_shift, seeds=5):
    for ds in d.DATASETS:
        for s in range(seeds):
            base = [0.5 + 0.03 * i + 0.01 * s for i in range(6)]
            _write(root, ds, "random", s, base)
            _write(root, ds, "default@safe-scratch", s, [v + a_shift[ds] for v in base])
            _write(root, ds, "default", s, [v + b_shift[ds] for v in base])


def test_the_eligible_candidate_with_more_gain_is_chosen(tmp_path):
    # C2 never harms (+0.01 everywhere); C0 gains more on two data sets but loses 0.05 on lucchi: not eligible.
    _data(tmp_path, {"vnc": 0.01, "lucchi": 0.01, "volume": 0.01}, {"vnc": 0.1, "lucchi": -0.05, "volume": 0.1})
    dec = d.decide(tmp_path)
    assert dec["verdicts"]["default"]["eligible"] is False
    assert dec["verdicts"]["default"]["worst_round_diff"]["lucchi"] == pytest.approx(-0.05)
    assert dec["verdicts"]["default@safe-scratch"]["eligible"] is True
    assert dec["chosen"] == "default@safe-scratch"
    t = dec["verdicts"]["default@safe-scratch"]["targets"]
    assert all(t["at_or_above_every_round"].values()) and all(t["round0_at_least_random"].values())
    assert t["datasets_with_10pct_gain"] == 0


def test_ties_go_to_the_earlier_candidate_and_incomplete_ones_are_not_eligible(tmp_path):
    _data(tmp_path, {k: 0.0 for k in d.DATASETS}, {k: 0.001 for k in d.DATASETS})
    assert d.decide(tmp_path)["chosen"] == "default@safe-scratch"  # within 0.5 points: the earlier one
    assert d.decide(tmp_path, seeds=6)["verdicts"]["default"]["eligible"] is False  # 5 seeds < 6 required


def test_without_an_eligible_candidate_the_least_harm_is_chosen(tmp_path):
    _data(tmp_path, {"vnc": -0.08, "lucchi": 0.0, "volume": 0.0}, {"vnc": -0.03, "lucchi": 0.0, "volume": 0.0})
    dec = d.decide(tmp_path)
    assert not any(v["eligible"] for v in dec["verdicts"].values())
    assert dec["chosen"] == "default" and "least harm" in dec["why"]


def test_gate_counts_harmful_rounds_and_what_the_gate_did(tmp_path):
    # Round 2 drops by 0.1 (harmful) and is held; round 4 drops (harmful) before the gate is active; round 3 held
    # while not harmful.
    ious = [0.5, 0.6, 0.5, 0.55, 0.45, 0.5]
    gates = ["promote", "hold", "hold", "not enough audit tiles", "promote"]
    _write(tmp_path, "vnc", "random", 0, ious, gates)
    g = d.gate_stats(d.load_runs(tmp_path / "vnc"))["random"]
    assert g == {"rounds": 5, "harmful": 2, "caught": 1, "inactive": 1, "false_holds": 1}


def test_cli_writes_the_decision_files(tmp_path, capsys):
    _data(tmp_path, {k: 0.01 for k in d.DATASETS}, {k: 0.0 for k in d.DATASETS}, seeds=2)
    assert d.main(["--root", str(tmp_path), "--seeds", "2"]) == 0
    text = (tmp_path / "decision.md").read_text()
    assert "**default@safe-scratch**" in text and "## lucchi" in text
    assert json.loads((tmp_path / "decision.json").read_text())["chosen"] == "default@safe-scratch"
    assert (tmp_path / "decision.png").stat().st_size > 0
