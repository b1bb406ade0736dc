"""Model registry: atomic versions (a killed writer never damages the current model), rollback, prune, cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from ml_backend.model import build_model
from ml_backend.store.cache import ModelCache
from ml_backend.store.registry import ModelRegistry, RegistryError


def tiny(seed: int = 0, **hp):
    torch.manual_seed(seed)
    return build_model("unet", width=hp.pop("width", 4), depth=hp.pop("depth", 2), **hp)


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)


def test_publish_promote_and_metadata(tmp_path):
    reg = ModelRegistry(tmp_path, 3)
    assert reg.current_version() is None and reg.load_current() is None and reg.versions() == []
    m1 = tiny(1)
    v1 = reg.publish(m1, {"n_annotations": 20, "metrics": {"val_iou": 0.5}, "device": "cpu"})
    assert v1.startswith("v0001-") and reg.current_version() == v1
    meta = reg.current_meta()
    assert meta["version"] == v1 and meta["parent"] is None and meta["n_annotations"] == 20
    assert meta["hparams"]["width"] == 4 and "created" in meta
    model, loaded_meta = reg.load_current()
    assert same_weights(model, m1) and not model.training and loaded_meta == meta
    v2 = reg.publish(tiny(2), {"n_annotations": 40})
    assert v2.startswith("v0002-") and reg.meta(v2)["parent"] == v1 and reg.current_version() == v2
    v3 = reg.publish(tiny(3), {}, promote=False)
    assert reg.current_version() == v2  # published, not promoted
    assert [m["version"] for m in reg.versions()] == [v1, v2, v3]
    assert (tmp_path / "projects" / "3" / "versions" / v1 / "model.pt").is_file()


def test_rollback_and_history(tmp_path):
    reg = ModelRegistry(tmp_path, 1)
    m1 = tiny(1)
    v1 = reg.publish(m1, {})
    v2 = reg.publish(tiny(2), {})
    reg.rollback(v1)
    assert reg.current_version() == v1
    assert same_weights(reg.load_current()[0], m1)
    assert [(e["action"], e["version"], e["previous"]) for e in reg.history()] == [
        ("promote", v1, None),
        ("promote", v2, v1),
        ("rollback", v1, v2),
    ]
    with pytest.raises(RegistryError, match="no complete version 'v0009-20990101T000000Z'"):
        reg.rollback("v0009-20990101T000000Z")
    with pytest.raises(RegistryError, match="not a version id"):
        reg.rollback("../../etc")
    assert reg.current_version() == v1


def test_prune_keeps_the_newest_and_never_the_current(tmp_path):
    reg = ModelRegistry(tmp_path, 1)
    versions = [reg.publish(tiny(i), {}) for i in range(5)]
    reg.rollback(versions[0])
    removed = reg.prune(keep=2)
    assert removed == versions[1:3]
    assert [m["version"] for m in reg.versions()] == [versions[0], versions[3], versions[4]]
    assert reg.current_version() == versions[0] and reg.load_current() is not None
    with pytest.raises(ValueError, match="keep"):
        reg.prune(0)


def test_invalid_project_ids_are_refused(tmp_path):
    for bad in ("../x", "", ".hidden", "a/b"):
        with pytest.raises(ValueError, match="invalid project id"):
            ModelRegistry(tmp_path, bad)


def test_dangling_current_pointer_is_a_clear_error(tmp_path):
    reg = ModelRegistry(tmp_path, 1)
    reg.publish(tiny(), {})
    reg.current_file.write_text("v0042-20990101T000000Z\n")
    with pytest.raises(RegistryError, match="CURRENT points to 'v0042-20990101T000000Z'.*roll back"):
        reg.load_current()


def test_extra_models_are_stored_with_the_version(tmp_path):
    reg = ModelRegistry(tmp_path, 1)
    members = {"ensemble_0": tiny(5), "ensemble_1": tiny(6)}
    v = reg.publish(tiny(1), {}, extra_models=members)
    assert reg.meta(v)["extra_models"] == ["ensemble_0", "ensemble_1"]
    assert same_weights(reg.load_extra(v, "ensemble_1"), members["ensemble_1"])
    with pytest.raises(RegistryError, match="no extra model"):
        reg.load_extra(v, "ensemble_7")


SLOW_SAVE = textwrap.dedent(
    """
    import time, torch
    from ml_backend.model import build_model
    from ml_backend.store.registry import ModelRegistry

    real_save = torch.save
    def slow_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        f.flush()
        f.truncate(f.tell() // 2)          # half of the checkpoint is on disk ...
        print("SAVING", flush=True)
        time.sleep(60)                      # ... when the worker gets killed
    torch.save = slow_save
    ModelRegistry({root!r}, 1).publish(build_model("unet", width=4, depth=2), {{"n_annotations": 99}})
    """
)


def test_killed_during_save_leaves_the_current_model_untouched(tmp_path):
    reg = ModelRegistry(tmp_path, 1)
    m1 = tiny(1)
    v1 = reg.publish(m1, {"n_annotations": 20})
    script = SLOW_SAVE.format(root=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "SAVING"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    leftovers = [p.name for p in reg.versions_dir.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers, "the killed writer should have left its temporary directory behind"
    assert reg.current_version() == v1
    assert [m["version"] for m in reg.versions()] == [v1]
    model, meta = reg.load_current()
    assert same_weights(model, m1) and meta["n_annotations"] == 20
    # the job can be re-run: the next publish gets the next number and works
    v2 = reg.publish(tiny(2), {})
    assert v2.startswith("v0002-") and reg.current_version() == v2
    # a stale temporary directory (older than an hour) is cleaned by prune
    for name in leftovers:
        os.utime(reg.versions_dir / name, (time.time() - 7200, time.time() - 7200))
    reg.prune(keep=5)
    assert not [p for p in reg.versions_dir.iterdir() if p.name.startswith(".tmp-")]


PUBLISH_LOOP = textwrap.dedent(
    """
    from ml_backend.model import build_model
    from ml_backend.store.registry import ModelRegistry
    reg = ModelRegistry({root!r}, 1)
    model = build_model("unet", width=24, depth=4)   # ~25 MB checkpoint: saving takes a while
    print("READY", flush=True)
    for i in range(1000):
        reg.publish(model, {{"i": i}})
    """
)


@pytest.mark.parametrize("delay", [0.05, 0.3, 0.8])
def test_random_kills_during_publishing_never_break_the_registry(tmp_path, delay):
    reg = ModelRegistry(tmp_path, 1)
    reg.publish(tiny(1), {"i": -1})
    proc = subprocess.Popen(
        [sys.executable, "-c", PUBLISH_LOOP.format(root=str(tmp_path))],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "READY"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        proc.kill()
    current = reg.current_version()
    model, meta = reg.load_current()  # always loadable
    assert meta["version"] == current
    for meta in reg.versions():  # every listed version is complete and loadable
        reg.load(meta["version"])


def test_model_cache_reloads_only_when_current_changes(tmp_path):
    reg = ModelRegistry(tmp_path, 4)
    cache = ModelCache(tmp_path, device="cpu")
    assert cache.get(4) is None
    m1 = tiny(1)
    v1 = reg.publish(m1, {})
    model_a, meta_a = cache.get(4)
    model_b, _ = cache.get("4")
    assert model_a is model_b and cache.loads == 1 and meta_a["version"] == v1
    os.utime(reg.current_file)  # touched, same content: no reload
    assert cache.get(4)[0] is model_a and cache.loads == 1
    v2 = reg.publish(tiny(2), {})
    model_c, meta_c = cache.get(4)
    assert meta_c["version"] == v2 and model_c is not model_a and cache.loads == 2
    reg.rollback(v1)
    model_d, meta_d = cache.get(4)
    assert meta_d["version"] == v1 and same_weights(model_d, m1) and cache.loads == 3


def test_model_cache_picks_up_a_version_published_by_another_process(tmp_path):
    reg = ModelRegistry(tmp_path, 2)
    reg.publish(tiny(1), {})
    cache = ModelCache(tmp_path, device="cpu")
    first = cache.get(2)[1]["version"]
    code = (
        "from ml_backend.model import build_model; from ml_backend.store.registry import ModelRegistry;"
        f"print(ModelRegistry({str(tmp_path)!r}, 2).publish(build_model('unet', width=4, depth=2), {{}}))"
    )
    new = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    assert new != first and cache.get(2)[1]["version"] == new


def test_metadata_with_numpy_values_is_stored_as_json(tmp_path):
    np = pytest.importorskip("numpy")
    reg = ModelRegistry(tmp_path, 1)
    v = reg.publish(tiny(), {"metrics": {"val_iou": np.float32(0.25)}, "ids": np.arange(3)})
    meta = json.loads((reg.versions_dir / v / "meta.json").read_text())
    assert meta["metrics"]["val_iou"] == pytest.approx(0.25) and meta["ids"] == [0, 1, 2]


# ---------------------------------------------------------------------- the operator CLI (real subprocesses)
def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "ml_backend.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_cli_versions_rollback_and_status_with_learning_curve(tmp_path, redis_url):
    reg = ModelRegistry(tmp_path, 6)
    v1 = reg.publish(tiny(1), {"n_annotations": 20, "metrics": {"val_iou": 0.41, "val_dice": 0.58}})
    v2 = reg.publish(tiny(2), {"n_annotations": 40, "metrics": {"val_iou": 0.63, "val_dice": 0.77}})
    env = {"MODEL_DIR": str(tmp_path), "REDIS_URL": redis_url, "TRAIN_BATCH_SIZE": "20"}

    out = run_cli("versions", "--project", "6", env_extra=env)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert any(line.startswith("* " + v2) for line in lines) and any(line.startswith("  " + v1) for line in lines)
    assert "0.6300" in out.stdout

    out = run_cli("rollback", "--project", "6", "--version", v1, env_extra=env)
    assert out.returncode == 0 and f"{v2} -> {v1}" in out.stdout
    assert reg.current_version() == v1
    bad = run_cli("rollback", "--project", "6", "--version", "v0099-20990101T000000Z", env_extra=env)
    assert bad.returncode == 2 and "no complete version" in bad.stderr

    plot = tmp_path / "curve.png"
    out = run_cli("status", "--project", "6", "--plot", str(plot), "--json", env_extra=env)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["current_version"] == v1 and report["versions"] == 2
    assert report["last_training"]["metrics"]["val_iou"] == 0.41
    assert [(p["n_annotations"], p["val_iou"]) for p in report["learning_curve"]] == [(20, 0.41), (40, 0.63)]
    assert report["queue"]["pending_annotations"] == 0 and report["queue"]["threshold"] == 20
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000

    text = run_cli("status", "--project", "6", env_extra=env)
    assert text.returncode == 0 and f"current version : {v1}" in text.stdout and "20 -> 0.410" in text.stdout


def test_cli_status_without_redis_still_reports_the_registry(tmp_path, redis_tools):
    ModelRegistry(tmp_path, 2).publish(tiny(), {"n_annotations": 5, "metrics": {"val_iou": 0.2}})
    env = {"MODEL_DIR": str(tmp_path), "REDIS_URL": f"redis://127.0.0.1:{redis_tools.free_port()}/0"}
    out = run_cli("status", "--project", "2", env_extra=env)
    assert out.returncode == 0
    assert "queue           : unavailable (Redis at" in out.stdout and "5 -> 0.200" in out.stdout


def test_cli_worker_command_uses_json_serializer_and_the_queue(tmp_path):
    env = {"REDIS_URL": "redis://127.0.0.1:6390/2", "RQ_QUEUE": "em-q"}
    out = run_cli("worker", "--dry-run", env_extra=env)
    assert out.returncode == 0
    cmd = out.stdout.split()
    assert cmd[1] == "worker" and cmd[-1] == "em-q"
    assert "rq.serializers.JSONSerializer" in cmd and "--with-scheduler" in cmd
    assert cmd[cmd.index("-u") + 1] == "redis://127.0.0.1:6390/2"
