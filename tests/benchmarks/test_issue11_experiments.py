"""Issue 11's cold-start experiment (``ml_backend.benchmarks.experiments``; ``scripts/experiments_issue11.py``
wraps it): the command line, the pool of tiles and the summary, without training anything."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from ml_backend.benchmarks import experiments

REPO = Path(__file__).resolve().parents[2]


def test_command_line_gives_one_job_per_data_set_and_seed(tmp_path):
    args = experiments.parse_args(["--data", "vnc,isotropic", "--seeds", "0,2", "--vnc", str(tmp_path),
                                   "--out", str(tmp_path / "o"), "--init-steps", "5"])  # fmt: skip
    jobs = experiments.jobs_of(args)
    assert [(j[0], j[1]) for j in jobs] == [("vnc", 0), ("vnc", 2), ("isotropic", 0), ("isotropic", 2)]
    assert jobs[0][2:] == (str(tmp_path / "o"), str(tmp_path), 600, 5, 0.0, "random,random+ssl,coverage+ssl,coverage",
                           "")  # fmt: skip
    defaults = experiments.parse_args([])
    assert (defaults.data, defaults.seeds, defaults.workers, defaults.out) == (
        "vnc,isotropic",
        "0,1,2",
        1,
        "/tmp/issue11",
    )


def test_vnc_dir_follows_the_argument_then_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("VNC_DATA_DIR", str(tmp_path / "env"))
    assert experiments.vnc_dir(str(tmp_path / "arg")) == tmp_path / "arg"
    assert experiments.vnc_dir(None) == tmp_path / "env"
    monkeypatch.delenv("VNC_DATA_DIR")
    assert experiments.vnc_dir(None) == REPO.parent / "shared" / "data" / "vnc"


def test_pool_is_a_seeded_subset_of_whole_tiles_in_the_training_half():
    shape = (20, 512, 384)  # 480 grid tiles in the training half
    pos = experiments.pool_positions(shape, seed=0)
    t = experiments.TILE
    assert pos.shape == (experiments.POOL, 3) and len({tuple(p) for p in pos}) == len(pos)
    assert (pos[:, 1] + t <= shape[1] // 2).all() and (pos[:, 2] + t <= shape[2]).all()
    assert (pos[:, 1] % t == 0).all() and (pos[:, 2] % t == 0).all()  # the non-overlapping grid
    assert np.array_equal(pos, experiments.pool_positions(shape, seed=0))
    assert not np.array_equal(pos, experiments.pool_positions(shape, seed=1))
    small = experiments.pool_positions((2, 256, 128), seed=0)  # fewer grid tiles than POOL: all of them
    assert len(small) == 2 * 2 * 2


def test_summary_pairs_each_condition_with_random_per_seed():
    def record(seed: int, rnd: float, cov: float) -> dict:
        return {"data": "vnc", "seed": seed, "pretrain": {"steps": 1}, "random": {"test_iou": rnd},
                "coverage": {"test_iou": cov}}  # fmt: skip

    out = experiments.summarise([record(1, 0.4, 0.5), record(0, 0.2, 0.5)])["vnc"]
    assert out["seeds"] == [0, 1] and out["random"]["per_seed"] == [0.2, 0.4]
    assert np.isclose(out["coverage"]["mean"], 0.5) and out["coverage"]["paired_gain_vs_random"]["per_seed"] == [
        0.3, 0.1]  # fmt: skip
    assert "paired_gain_vs_random" not in out["random"] and "random+ssl" not in out


def test_the_script_is_the_module():
    out = subprocess.run([sys.executable, "scripts/experiments_issue11.py", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout  # fmt: skip
    assert "--pretrain-steps" in out and "Issue 11 evidence" in out
