"""End-to-end smoke test of the AL benchmark (``ml-backend benchmark``) on generated data (asserts no figures)."""

import csv
import json

import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def bench():
    import ml_backend.benchmarks

    return ml_backend.benchmarks


@pytest.fixture(autouse=True)
def _restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


TINY = [
    "--quick", "--synthetic", "--synthetic-n", "3", "--synthetic-size", "128",
    "--downsample", "1", "--tile", "32", "--pool-size", "20", "--m", "4", "--k", "4", "--rounds", "2",
    "--width", "4", "--depth", "2", "--init-steps", "4", "--steps", "3", "--full-steps", "4",
    "--batch-size", "2", "--infer-tile", "64", "--infer-overlap", "8", "--test-every", "2",
    "--strategies", "random,entropy", "--seeds", "0", "--workers", "1", "--device", "cpu",
]  # fmt: skip


def test_quick_run_resumes_and_writes_outputs(bench, tmp_path):
    out = tmp_path / "bench"
    args = [*TINY, "--out", str(out)]
    runs = out / "runs"

    # Interrupted after one run: only that run is saved; the initial model is cached.
    assert bench.main([*args, "--max-runs", "1"]) == 0
    assert sorted(p.name for p in runs.glob("*.json")) == ["random__seed0.json"]
    assert (out / "initial" / "seed0.pt").exists()
    first_mtime = (runs / "random__seed0.json").stat().st_mtime_ns

    # Resume: the remaining runs are done, the saved one is not redone.
    assert bench.main(args) == 0
    names = sorted(p.name for p in runs.glob("*.json"))
    assert names == ["entropy__seed0.json", "full__seed0.json", "random__seed0.json"]
    assert (runs / "random__seed0.json").stat().st_mtime_ns == first_mtime

    # Delete one run: a re-run redoes exactly that one, with the same numbers (deterministic for a seed).
    before = json.loads((runs / "entropy__seed0.json").read_text())
    random_mtime = (runs / "random__seed0.json").stat().st_mtime_ns
    (runs / "entropy__seed0.json").unlink()
    assert bench.main(args) == 0
    after = json.loads((runs / "entropy__seed0.json").read_text())
    assert (runs / "random__seed0.json").stat().st_mtime_ns == random_mtime
    assert [r["iou"] for r in after["rounds"]] == [r["iou"] for r in before["rounds"]]
    assert after["labelled_order"] == before["labelled_order"]

    # Well-formed records: every strategy starts from the same initial labelled set and model.
    rnd = json.loads((runs / "random__seed0.json").read_text())
    assert [r["labelled"] for r in rnd["rounds"]] == [4, 8, 12]
    assert rnd["labelled_order"][:4] == after["labelled_order"][:4]
    assert rnd["rounds"][0]["iou"] == after["rounds"][0]["iou"]
    assert len(set(rnd["labelled_order"])) == 12
    for r in rnd["rounds"]:
        assert 0.0 <= r["iou"] <= 1.0 and 0.0 <= r["dice"] <= 1.0
        assert r["pixels"] == r["labelled"] * 32 * 32 and r["boundary"] >= 0

    # Outputs parse.
    with open(out / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["strategy"] for r in rows} == {"random", "entropy"} and len(rows) == 6
    assert {"labelled", "pixels", "boundary_mean", "iou_mean", "iou_std", "dice_mean"} <= set(rows[0])
    with open(out / "summary.csv") as f:
        summary = {r["strategy"]: r for r in csv.DictReader(f)}
    assert set(summary) == {"random", "entropy"}
    assert float(summary["random"]["gain_final_pct"]) == pytest.approx(0.0)
    results = json.loads((out / "results.json").read_text())
    assert results["full_supervision"]["iou"] and results["protocol"]["tile"] == 32
    assert set(results["summary"]) == {"random", "entropy"}
    report = (out / "summary.md").read_text()
    assert "| random | 0 |" in report and "| entropy | 0 |" in report
    assert "paired_aulc_gain_vs_random" in results["summary"]["entropy"]
    for png in ("iou_vs_tiles.png", "iou_vs_effort.png"):
        with Image.open(out / png) as im:
            assert im.format == "PNG" and im.size[0] > 100

    # A different protocol in the same output dir is refused (no silent mixing of runs).
    with pytest.raises(SystemExit, match="different protocol"):
        bench.main([*args, "--steps", "5"])

    # Report-only re-aggregates the saved runs.
    assert bench.main(["--report-only", "--out", str(out)]) == 0


def test_summary_metrics_on_hand_made_curves(bench):
    def run(strategy, seed, labelled, iou, boundary):
        rounds = [
            {"labelled": n, "pixels": n * 10, "boundary": b, "iou": y, "dice": y}
            for n, y, b in zip(labelled, iou, boundary, strict=True)
        ]
        return {"strategy": strategy, "seed": seed, "rounds": rounds}

    runs = [
        run("random", 0, [10, 20, 30], [0.2, 0.3, 0.4], [100, 200, 300]),
        run("random", 1, [10, 20, 30], [0.2, 0.3, 0.4], [100, 200, 300]),
        run("entropy", 0, [10, 20, 30], [0.2, 0.4, 0.5], [100, 300, 500]),
        run("entropy", 1, [10, 20, 30], [0.2, 0.4, 0.5], [100, 300, 500]),
        {
            "strategy": "full",
            "seed": 0,
            "rounds": [{"labelled": 99, "pixels": 1, "boundary": 1, "iou": 0.8, "dice": 0.9}],
        },
    ]
    rep = bench.summarize(runs)
    e = rep["summary"]["entropy"]
    assert e["gain_final_pct"] == pytest.approx(25.0)
    assert e["gain_after_first_pct"] == pytest.approx((100 / 3 + 25) / 2)
    assert e["labels_to_random_final"] == pytest.approx(20.0)  # entropy hits 0.4 at 20 tiles
    assert e["label_fraction_of_random"] == pytest.approx(2 / 3)
    assert e["aulc"] == pytest.approx((0.3 * 10 + 0.45 * 10) / 20)
    assert e["seed_std_mean"] == 0.0 and e["round_to_round_drops"] == 0
    assert rep["full_supervision"]["mean"] == 0.8
    # Equal effort on the common range [100, 300]: entropy's IoU at effort 300 is 0.4 = random's at 300.
    assert rep["effort"]["entropy"]["iou_at_max"] == pytest.approx(0.4)
    assert rep["effort"]["random"]["iou_at_max"] == pytest.approx(0.4)


def test_volume_data_arms_and_cold_start_options(bench, tmp_path):
    """Issue 11 options end to end on a tiny generated volume: the stack-aware arms, SSL pretraining and a
    coverage-ordered first batch share one initial model per seed; the report pairs every round with random."""
    out = tmp_path / "vol"
    args = [
        "--quick", "--volume", "isotropic", "--volume-n", "4", "--volume-size", "128", "--tile", "32",
        "--pool-size", "40", "--m", "4", "--k", "4", "--rounds", "2", "--width", "4", "--depth", "2",
        "--init-steps", "4", "--steps", "3", "--full-steps", "4", "--full-seeds", "", "--batch-size", "2",
        "--infer-tile", "64", "--infer-overlap", "8", "--test-every", "2", "--seeds", "0", "--workers", "1",
        "--device", "cpu", "--pretrain-steps", "2", "--first-batch", "coverage",
        "--strategies", "random,entropy,entropy+stack,entropy+div,entropy+softrank", "--out", str(out),
    ]  # fmt: skip
    assert bench.main(args) == 0
    runs = {p.stem: json.loads(p.read_text()) for p in (out / "runs").glob("*.json")}
    arms = ("random", "entropy", "entropy+stack", "entropy+div", "entropy+softrank")
    assert set(runs) == {f"{a}__seed0" for a in arms}
    assert runs["entropy+softrank__seed0"]["params"]["selector"] == "stochastic"
    assert all({"precision", "recall", "predicted_foreground"} <= set(x) for x in runs["entropy__seed0"]["rounds"][1:])
    first = {tuple(r["labelled_order"][:4]) for r in runs.values()}
    assert len(first) == 1  # the same coverage-ordered initial tiles for every arm
    assert runs["entropy+stack__seed0"]["params"]["selector"] == "top"
    assert runs["entropy__seed0"]["params"]["selector"] == "topk"
    for r in runs.values():
        assert len(set(r["labelled_order"])) == 12
        assert all(0.0 <= x["foreground_fraction"] <= 1.0 for x in r["rounds"])
    results = json.loads((out / "results.json").read_text())
    assert results["protocol"]["data"] == "volume" and results["protocol"]["first_batch"] == "coverage"
    rows = results["paired_rounds"]["entropy+stack"]["rounds"]
    assert [r["round"] for r in rows] == [0, 1, 2] and "diff_mean" in rows[1]
    assert (out / "gain_vs_random.png").exists() and (out / "initial" / "pretrain_seed0.pt").exists()
    with pytest.raises(SystemExit, match="unknown strategies"):
        bench.main([*args, "--strategies", "entropy+nope"])

    # The diagnosis re-trains round 1 of a saved run exactly: the same test IoU as the run recorded.
    from ml_backend.benchmarks.diagnose import diagnose

    row = diagnose(out, "entropy", 0, 1)
    assert row["iou"] == pytest.approx(runs["entropy__seed0"]["rounds"][1]["iou"], abs=1e-6)
    assert 0.0 <= row["precision"] <= 1.0 and 0.0 <= row["iou_prior_corrected"] <= 1.0


def test_prior_correction_moves_the_foreground_posterior_towards_the_reference_prior():
    import numpy as np

    from ml_backend.benchmarks.diagnose import prior_corrected

    fg = np.linspace(0.01, 0.99, 50).reshape(1, 5, 10)
    probs = np.concatenate([1 - fg, fg])
    same = prior_corrected(probs, 0.1, 0.1)
    np.testing.assert_allclose(same, probs)
    lower = prior_corrected(probs, 0.2, 0.05)  # trained on a foreground-heavier set than the reference
    assert (lower[1] < probs[1]).all() and np.allclose(lower.sum(axis=0), 1.0)
    # Bayes: odds scale by (pi_ref / pi_train) / ((1 - pi_ref) / (1 - pi_train))
    odds = lower[1] / lower[0]
    np.testing.assert_allclose(odds, probs[1] / probs[0] * (0.05 / 0.2) / (0.95 / 0.8), rtol=1e-6)
