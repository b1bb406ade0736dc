"""Renaming an arm's saved runs (``benchmarks.rename``): accepted only when the new name means what the runs ran."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest

from ml_backend.benchmarks.cli import main as cli_main
from ml_backend.benchmarks.protocol import PRESETS, Protocol
from ml_backend.benchmarks.rename import RenameError, rename_arm
from ml_backend.benchmarks.run import resolve_arm
from ml_backend.config import Settings


@pytest.fixture
def out(tmp_path):
    """An output folder with two seeds of ``default@scratch`` and one of ``random``, as the cli saves them."""
    p = replace(Protocol(), **PRESETS["cpu"])
    (tmp_path / "protocol.json").write_text(json.dumps(asdict(p)))
    arms = {name: asdict(resolve_arm(p, name, Settings())) for name in ("default@scratch", "random")}
    (tmp_path / "arms.json").write_text(json.dumps(arms))
    (tmp_path / "runs").mkdir()
    for name, seed in (("default@scratch", 0), ("default@scratch", 1), ("random", 0)):
        run = {"strategy": name, "seed": seed, "rounds": [{"iou": 0.5 + seed / 10}]}
        (tmp_path / "runs" / f"{name}__seed{seed}.json").write_text(json.dumps(run))
    return tmp_path


def _runs(out):
    return {f.name: json.loads(f.read_text()) for f in (out / "runs").glob("*.json")}


def test_rename_to_what_now_resolves_the_same(out):
    # With PRETRAIN=false shipped, "default" is what "default@scratch" ran.
    n = rename_arm(out, "default@scratch", "default", Settings(pretrain=False))
    assert n == 2
    runs = _runs(out)
    assert sorted(runs) == ["default__seed0.json", "default__seed1.json", "random__seed0.json"]
    assert runs["default__seed1.json"] == {"strategy": "default", "seed": 1, "rounds": [{"iou": 0.6}]}
    arms = json.loads((out / "arms.json").read_text())
    assert sorted(arms) == ["default", "random"] and arms["default"]["name"] == "default"
    assert arms["default"]["overrides"]["pretrain_steps"] == 0


def test_rename_refused_when_the_name_means_something_else(out):
    before = _runs(out), (out / "arms.json").read_text()
    with pytest.raises(RenameError, match="resolves now to other values"):
        rename_arm(out, "default@scratch", "default", Settings(pretrain=True))  # a default that pretrains
    assert (_runs(out), (out / "arms.json").read_text()) == before  # nothing touched


def test_rename_refused_onto_existing_runs_or_from_an_unknown_arm(out):
    with pytest.raises(RenameError, match="already has runs"):
        rename_arm(out, "default@scratch", "random", Settings())
    with pytest.raises(RenameError, match="no arm"):
        rename_arm(out, "entropy", "default", Settings())


def test_cli_subcommand(out, capsys, monkeypatch):
    monkeypatch.setenv("PRETRAIN", "false")
    assert cli_main(["rename", "--out", str(out), "default@scratch", "default"]) == 0
    assert "2 runs of 'default@scratch' are now 'default'" in capsys.readouterr().out
    monkeypatch.delenv("PRETRAIN")
    with pytest.raises(SystemExit, match="error: .*no arm"):
        cli_main(["rename", "--out", str(out), "default@scratch", "default"])
