"""The benchmark's ``default`` arm is the product as it ships (issue 17): built from Settings, never a copy of it."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, replace

import pytest
import torch

from ml_backend.active_learning.plan import batch_config as product_batch_config
from ml_backend.benchmarks.protocol import PRESETS, Protocol, train_config
from ml_backend.benchmarks.run import (
    LEVERS,
    arm_batch_config,
    arm_protocol,
    arm_strategy,
    initial_tag,
    resolve_arm,
)
from ml_backend.config import Settings
from ml_backend.strategies.resolve import stored_strategy
from ml_backend.training.recipe import product_train_config

# What the benchmark protocol sets itself (sizes and determinism), everything else must be the product's. The clock
# (time_budget_s, and anneal_by_time that follows it on a first version) is the protocol's: the benchmark runs by steps.
SIZES = {"steps", "lr", "crop", "time_budget_s", "anneal_by_time", "seed", "split_seed", "device"}


@pytest.fixture(autouse=True)
def _restore_threads():
    old = torch.get_num_threads()
    yield
    torch.set_num_threads(old)


def _cpu() -> Protocol:
    return replace(Protocol(), **PRESETS["cpu"])


def _recipe_matches(ap: Protocol, s: Settings) -> None:
    """The arm's TrainConfigs (first training and fine-tuning) are the product's but for the sizes."""
    for steps, lr, parent in ((ap.init_steps, ap.init_lr, None), (ap.steps, ap.lr, "v1")):
        ours = asdict(train_config(ap, steps=steps, lr=lr, seed=3, split_seed=0))
        product = asdict(product_train_config(s, parent))
        assert {k: v for k, v in ours.items() if k not in SIZES} == {k: v for k, v in product.items() if k not in SIZES}
        assert steps == max(1, round(product["steps"] * ap.product_steps_scale))
        assert lr == pytest.approx(product["lr"] * ap.product_lr_scale)


def _matches(arm, ap: Protocol, s: Settings) -> None:
    assert arm.strategy == s.strategy
    assert arm_strategy(arm).params() == stored_strategy({}, s).params()  # the product's resolver, aggregation too
    assert (arm.selector is not None) == s.batch_diversity
    if s.batch_diversity:
        assert arm.selector == s.diversity_method and arm.labelled_embeddings
        assert arm_batch_config(ap, arm) == product_batch_config(s)  # z radius, feature radius, method
    assert (ap.pretrain_steps > 0) == (s.pretrain and s.pretrain_steps > 0)
    assert ap.first_batch == ("spread" if s.pretrain else "random")  # the product's coverage_order(method="random")
    if s.pretrain:
        assert (ap.pretrain_tiles, ap.pretrain_crop) == (s.pretrain_tiles, s.pretrain_crop)
    assert (ap.semi_supervised, ap.semi_threshold, ap.semi_weight, ap.semi_unlabelled_batch) == (
        s.semi_supervised, s.semi_threshold, s.semi_weight, s.semi_unlabelled_batch,
    )  # fmt: skip
    assert (ap.norm, ap.dropout, tuple(ap.context_offsets)) == (s.model_norm, s.model_dropout, s.context_offset_list)
    assert ap.bn_calibration_tiles == s.bn_calibration_tiles
    _recipe_matches(ap, s)


@pytest.mark.parametrize("preset", ["full", "cpu", "quick"])
def test_default_arm_is_settings(preset):
    p = replace(Protocol(), **PRESETS[preset])
    s = Settings()
    arm = resolve_arm(p, "default", s)
    ap = arm_protocol(p, arm)
    _matches(arm, ap, s)
    if preset == "full":  # unscaled: exactly the shipped numbers
        assert (ap.steps, ap.init_steps, ap.lr, ap.init_lr) == (
            s.train_steps, round(s.train_steps * s.initial_train_factor), s.learning_rate, s.initial_learning_rate,
        )  # fmt: skip
        assert ap.pretrain_steps == (s.pretrain_steps if s.pretrain else 0)
    assert (ap.tile, ap.pool_size, ap.m, ap.k, ap.width) == (p.tile, p.pool_size, p.m, p.k, p.width)  # sizes kept
    assert initial_tag(p, ap) != ""  # its own cold start, not the shared initial model


def test_changing_a_setting_changes_the_arm(monkeypatch):
    p = _cpu()
    before = resolve_arm(p, "default", Settings())
    for var, value in {
        "STRATEGY": "margin", "BATCH_DIVERSITY": "false", "PRETRAIN": "false", "SEMI_SUPERVISED": "true",
        "SEMI_THRESHOLD": "0.8", "TRAIN_STEPS": "100", "LEARNING_RATE": "0.001", "VAL_FRACTION": "0.3",
        "MODEL_NORM": "group",
    }.items():  # fmt: skip
        monkeypatch.setenv(var, value)
    s = Settings()
    arm = resolve_arm(p, "default", s)
    ap = arm_protocol(p, arm)
    assert arm != before
    assert arm.strategy == "margin" and arm.selector is None and ap.pretrain_steps == 0 and ap.first_batch == "random"
    assert ap.semi_supervised and ap.semi_threshold == 0.8 and ap.steps == 100 and ap.lr == pytest.approx(4e-3)
    _matches(arm, ap, s)
    # Through the constructor too, one choice at a time.
    for change in (
        {"diversity_method": "stochastic"},
        {"diversity_z_radius": "auto"},
        {"diversity_feature_radius": 0.2},
        {"pretrain_steps": 300},
        {"aggregation": "mean"},
        {"semi_weight": 0.5},
        {"context_offsets": "-1,0,1"},
        {"selection_random_share": 0.5},
        {"uncertainty_from_labels": 60},
        {"initial_train_factor": 2.25},
    ):
        s2 = Settings(**change)
        arm2 = resolve_arm(p, "default", s2)
        assert arm2 != before, change
        _matches(arm2, arm_protocol(p, arm2), s2)


@pytest.mark.parametrize("lever", sorted(LEVERS))
def test_lever_arms_are_settings_with_the_lever(lever):
    """ "default@<lever>" is the product's Settings with the lever's values, and nothing else changed."""
    p, s = _cpu(), Settings()
    arm = resolve_arm(p, f"default@{lever}", s)
    ap = arm_protocol(p, arm)
    s2 = s.model_copy(update=LEVERS[lever])
    _matches(arm, ap, s2)
    assert arm == replace(resolve_arm(p, "default", s2), name=f"default@{lever}")
    assert ap.random_share == s2.selection_random_share and ap.uncertainty_from_labels == s2.uncertainty_from_labels
    # Hedges change what a round selects, not the cold start: the same initial model as the default's.
    if "pretrain" not in LEVERS[lever]:
        assert initial_tag(p, ap) == initial_tag(p, arm_protocol(p, resolve_arm(p, "default", s)))
    assert arm_protocol(p, resolve_arm(p, f"default@{lever}+semi", s)).semi_supervised


def test_unknown_lever_is_refused():
    with pytest.raises(ValueError, match="unknown lever"):
        resolve_arm(_cpu(), "default@nope", Settings())


def test_semi_suffix_on_any_arm_and_refused_arms():
    p, s = _cpu(), Settings(semi_threshold=0.9)
    plain, semi = resolve_arm(p, "random", s), resolve_arm(p, "random+semi", s)
    assert arm_protocol(p, plain) == p and initial_tag(p, p) == ""  # plain arms share the run's initial model
    sp = arm_protocol(p, semi)
    assert sp.semi_supervised and sp.semi_threshold == 0.9 and initial_tag(p, sp) != ""
    assert train_config(sp, steps=5, lr=1e-3, seed=0, split_seed=0).semi.enabled
    assert not train_config(p, steps=5, lr=1e-3, seed=0, split_seed=0).semi.enabled
    stack = resolve_arm(p, "entropy+stack+semi", s)
    assert stack.selector == "top" and stack.z_radius == p.z_radius and arm_protocol(p, stack).semi_supervised
    assert resolve_arm(p, "entropy+semi+astack", s).z_radius == "auto"
    d = resolve_arm(p, "default+semi", Settings(semi_supervised=False))
    assert arm_protocol(p, d).semi_supervised and d.strategy == Settings().strategy
    for bad in ("default+stack", "entropy+nope", "nope", "entropy+stack+div", "random+semi+semi"):
        with pytest.raises(ValueError):
            resolve_arm(p, bad, s)


def test_cli_runs_default_and_semi_arms_end_to_end(tmp_path, monkeypatch):
    """A tiny real run: the default arm (pretraining, spread first batch, product recipe) and random+semi each train
    their own initial model; curves.csv names the arm 'default'; a changed setting stops a resumed run."""
    import ml_backend.benchmarks as bench

    out = tmp_path / "bench"
    args = [
        "--quick", "--volume", "isotropic", "--volume-n", "4", "--volume-size", "128", "--tile", "32",
        "--pool-size", "24", "--m", "4", "--k", "4", "--rounds", "1", "--width", "4", "--depth", "2",
        "--init-steps", "4", "--steps", "3", "--full-seeds", "", "--batch-size", "2", "--infer-tile", "64",
        "--infer-overlap", "8", "--test-every", "2", "--seeds", "0", "--workers", "1", "--device", "cpu",
        "--product-steps-scale", "0.01", "--strategies", "default,random,random+semi", "--out", str(out),
    ]  # fmt: skip
    monkeypatch.setenv("SEMI_UNLABELLED_BATCH", "2")
    monkeypatch.setenv("PRETRAIN", "true")  # the arm's cold-start path, whatever ships
    assert bench.main(args) == 0
    runs = {f.stem: json.loads(f.read_text()) for f in (out / "runs").glob("*.json")}
    assert set(runs) == {"default__seed0", "random__seed0", "random+semi__seed0"}
    d = runs["default__seed0"]["arm"]
    assert d["strategy"] == Settings().strategy and d["overrides"]["pretrain_steps"] == 6  # 600 x 0.01
    assert d["overrides"]["first_batch"] == "spread" and d["overrides"]["steps"] == 4  # 400 x 0.01
    assert runs["random+semi__seed0"]["arm"]["overrides"]["semi_unlabelled_batch"] == 2
    tags = sorted(x.parent.name for x in (out / "initial").rglob("seed0.pt"))
    assert len(tags) == 3 and "initial" in tags  # the shared one (random) and one per arm with its own protocol
    with open(out / "curves.csv") as fh:
        assert {"default", "random", "random+semi"} <= {row["strategy"] for row in csv.DictReader(fh)}
    # An output dir written before issue 17 (no semi/recipe/scale fields) still resumes with the default arm.
    saved = json.loads((out / "protocol.json").read_text())
    new = ("semi_supervised", "semi_threshold", "semi_weight", "semi_unlabelled_batch", "recipe", "pretrain_tiles",
           "pretrain_crop", "bn_calibration_tiles", "product_steps_scale", "product_lr_scale")  # fmt: skip
    (out / "protocol.json").write_text(json.dumps({k: v for k, v in saved.items() if k not in new}))
    assert bench.main(args) == 0
    monkeypatch.setenv("STRATEGY", "margin")  # the saved default arm no longer is what ships
    with pytest.raises(SystemExit, match="resolve differently"):
        bench.main(args)


def test_semi_settings_are_in_the_readme_table_with_their_defaults():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    defaults = dict(Settings.documented())
    for var in ("SEMI_SUPERVISED", "SEMI_THRESHOLD", "SEMI_WEIGHT", "SEMI_UNLABELLED_BATCH", "SEMI_UNLABELLED_TILES"):
        assert f"| `{var}` | `{defaults[var]}` |" in readme, var
