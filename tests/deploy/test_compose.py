"""The Docker Compose deployment agrees with the Compose Specification and with the code.

Schema: the Compose Specification's JSON schema (compose-spec/compose-spec, ``schema/compose-spec.json``, Apache-2.0)
as vendored by the ``check-jsonschema`` package (``check_jsonschema/builtin_schemas/vendor/compose-spec.json``, from
SchemaStore; its licence file ``licenses/LICENSE.compose-spec``), validated with ``jsonschema``. No container engine
is needed: the files are read as Compose reads them (YAML with merge keys and ``!reset``, ``${VAR}`` interpolation from
``.env``, override files merged), then every part that names something in the code is checked against the code:
commands and console scripts, the gunicorn app, the settings each variable sets, the queue, the health-check routes,
volumes, ``.env.example``, the Dockerfile's stages and ``.dockerignore``. Two checks run the containers' own commands
on this machine: the backend's gunicorn command answers its health check, and the worker's health check tells a
registered rq worker from none. ``test_stack_comes_up`` (marker ``deploy``) starts the real stack where a Docker
engine with Compose v2 and the images is available; it is skipped elsewhere.
"""

from __future__ import annotations

import base64
import copy
import importlib
import importlib.resources
import importlib.util
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from ml_backend.config import Settings

REPO = Path(__file__).resolve().parents[2]
BASE = "docker-compose.yml"
CPU = "docker-compose.cpu.yml"
REMOTE = "docker-compose.worker.yml"
COMPOSE_FILES = [BASE, CPU, REMOTE]
# The services that run this repository's image (command, settings and queue are checked against the code).
OUR_SERVICES = {BASE: ["backend", "worker"], CPU: [], REMOTE: ["worker"]}
SECRETS = ["LABEL_STUDIO_API_KEY", "LABEL_STUDIO_PASSWORD", "POSTGRES_PASSWORD", "REDIS_PASSWORD",
           "BASIC_AUTH_USER", "BASIC_AUTH_PASS"]  # fmt: skip
# Variables set for the backend/worker that are not Settings fields, and who reads them.
NOT_SETTINGS = {
    "LOG_LEVEL": "ml_backend.server.app (logging level of the backend)",
    "OMP_NUM_THREADS": "PyTorch / OpenMP: CPU threads of a CPU worker",
}
# Variables that Compose itself reads from .env.
COMPOSE_VARIABLES = {"COMPOSE_FILE"}


# ------------------------------------------------------------------------------------------ reading like Compose


class Reset:
    """A value tagged ``!reset``: merging removes the attribute from the files before."""

    def __init__(self, value: Any) -> None:
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    if isinstance(node, yaml.MappingNode):
        return Reset(loader.construct_mapping(node, deep=True))
    if isinstance(node, yaml.SequenceNode):
        return Reset(loader.construct_sequence(node, deep=True))
    return Reset(loader.construct_scalar(node))


ComposeLoader.add_constructor("!reset", _reset)


def load(name: str) -> dict:
    with open(REPO / name) as fh:
        return yaml.load(fh, Loader=ComposeLoader)  # noqa: S506 - a SafeLoader subclass


def plain(obj: Any) -> Any:
    """The document as the schema sees one file (a ``!reset`` value is its plain value)."""
    if isinstance(obj, Reset):
        return plain(obj.value)
    if isinstance(obj, dict):
        return {k: plain(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [plain(v) for v in obj]
    return obj


def merge(base: Any, override: Any) -> Any:
    """Compose's merge of an override file (mappings merged key by key, ``!reset`` removes, other values replace;
    sequences of ports/volumes are not merged here: the override files of this repository replace none)."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for key, value in override.items():
            if isinstance(value, Reset):
                out.pop(key, None)
            elif key in out:
                out[key] = merge(out[key], value)
            else:
                out[key] = plain(value)
        return out
    return plain(override)


_TOKEN = re.compile(r"\$\$|\$\{(?P<braced>[^}]*)\}|\$(?P<bare>[A-Za-z_][A-Za-z0-9_]*)")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?$", re.S)


def variables(obj: Any) -> set[str]:
    """Every ${VAR} (and $VAR) a document interpolates."""
    found: set[str] = set()
    if isinstance(obj, Reset):
        return variables(obj.value)
    if isinstance(obj, dict):
        for value in obj.values():
            found |= variables(value)
    elif isinstance(obj, list):
        for value in obj:
            found |= variables(value)
    elif isinstance(obj, str):
        for m in _TOKEN.finditer(obj):
            if m.group(0) == "$$":
                continue
            name = m.group("bare") or _BRACED.match(m.group("braced")).group("name")
            found.add(name)
    return found


def interpolate(obj: Any, env: dict[str, str], errors: list[str]) -> Any:
    """Compose's interpolation: ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?err}, ${VAR?err}, ${VAR:+x}, $$."""
    if isinstance(obj, Reset):
        return Reset(interpolate(obj.value, env, errors))
    if isinstance(obj, dict):
        return {k: interpolate(v, env, errors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [interpolate(v, env, errors) for v in obj]
    if not isinstance(obj, str):
        return obj

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group("bare"):
            return env.get(m.group("bare"), "")
        parts = _BRACED.match(m.group("braced"))
        if parts is None:
            errors.append(f"invalid interpolation {m.group(0)!r}")
            return ""
        name, op, arg = parts.group("name"), parts.group("op"), parts.group("arg") or ""
        value = env.get(name)
        empty = value is None or (op is not None and op.startswith(":") and value == "")
        if op in (":-", "-"):
            return arg if empty else value
        if op in (":?", "?"):
            if empty:
                errors.append(f"{name}: {arg}")
                return ""
            return value
        if op in (":+", "+"):
            return "" if empty else arg
        return value or ""

    return _TOKEN.sub(one, obj)


def env_example() -> tuple[dict[str, str], set[str]]:
    """(the assignments of .env.example, the variables it documents, commented-out ones included)."""
    values: dict[str, str] = {}
    documented: set[str] = set()
    for line in (REPO / ".env.example").read_text().splitlines():
        active = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        commented = re.match(r"^#\s*([A-Za-z_][A-Za-z0-9_]*)=", line)
        if active:
            values[active.group(1)] = active.group(2)
            documented.add(active.group(1))
        elif commented:
            documented.add(commented.group(1))
    return values, documented


@pytest.fixture(scope="module")
def test_env() -> dict[str, str]:
    """.env.example with its required secrets filled in (throw-away values) and the remote worker's addresses."""
    values, _ = env_example()
    values.update({name: secrets.token_hex(20) for name in SECRETS})
    values.update(
        REDIS_HOST="gpu-main.example.org", WORKER_LABEL_STUDIO_URL="http://ls.example.org:8080",
        WORKER_MODEL_STORE="/mnt/em-models",
    )  # fmt: skip
    return values


def resolved(name: str, env: dict[str, str]) -> dict:
    errors: list[str] = []
    doc = interpolate(load(name), env, errors)
    assert not errors, errors
    return doc


def merged_cpu(env: dict[str, str]) -> dict:
    return merge(plain(resolved(BASE, env)), resolved(CPU, env))


def service_env(service: dict) -> dict[str, str]:
    environment = service.get("environment") or {}
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    return {k: "" if v is None else str(v) for k, v in environment.items()}


def settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as the container reads them: only ``env`` (the process's own settings removed)."""
    for field in Settings.model_fields.values():
        for alias in field.validation_alias.choices:
            monkeypatch.delenv(alias, raising=False)
            monkeypatch.delenv(alias.upper(), raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return Settings.from_env()


def setting_names() -> set[str]:
    return {f.validation_alias.choices[0] for f in Settings.model_fields.values()}


def named_volume(spec: str) -> tuple[str, str]:
    """(source, target) of a short-syntax volume."""
    source, target = spec.split(":")[:2]
    return source, target


# ------------------------------------------------------------------------------------------ the schema


@pytest.fixture(scope="module")
def schema() -> dict:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    licence = vendor.joinpath("licenses", "LICENSE.compose-spec").read_text()
    assert "Apache License" in licence and "Version 2.0" in licence
    doc = json.loads(vendor.joinpath("compose-spec.json").read_text())
    assert doc.get("title") == "Compose Specification"
    return doc


def validate(doc: dict, schema: dict) -> None:
    jsonschema.validators.validator_for(schema)(schema).validate(doc)


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_files_follow_the_compose_specification(name, schema, test_env):
    validate(plain(load(name)), schema)  # as written
    validate(plain(resolved(name, test_env)), schema)  # as Compose sees it after interpolation


def test_cpu_variant_merged_follows_the_specification(schema, test_env):
    validate(merged_cpu(test_env), schema)


def test_the_schema_catches_a_misspelt_key(schema):
    doc = plain(load(BASE))
    doc["services"]["backend"]["healtcheck"] = doc["services"]["backend"].pop("healthcheck")
    with pytest.raises(jsonschema.ValidationError, match="healtcheck"):
        validate(doc, schema)
    doc = plain(load(BASE))
    doc["services"]["worker"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] = "gpu"
    with pytest.raises(jsonschema.ValidationError):
        validate(doc, schema)


# ------------------------------------------------------------------------------------------ .env and secrets


def test_every_variable_is_documented_in_env_example():
    _, documented = env_example()
    used = set().union(*(variables(load(name)) for name in COMPOSE_FILES))
    assert used - documented == set(), "used by a compose file but not in .env.example"
    assert documented - used - COMPOSE_VARIABLES == set(), "in .env.example but used by no compose file"


def test_required_secrets_stop_compose_until_set(test_env):
    values, _ = env_example()
    errors: list[str] = []
    for name in COMPOSE_FILES:
        interpolate(load(name), values, errors)
    missing = {e.split(":")[0] for e in errors}
    assert set(SECRETS) <= missing
    assert missing - set(SECRETS) <= {"REDIS_HOST", "WORKER_LABEL_STUDIO_URL", "WORKER_MODEL_STORE"}
    for name in COMPOSE_FILES:
        resolved(name, test_env)  # nothing missing once they are set


def test_env_example_holds_no_secret():
    values, _ = env_example()
    for name in SECRETS:
        assert values.get(name) == "", f"{name} must be empty in .env.example (the deployer sets it)"
    for name, value in values.items():
        if re.search(r"PASS|SECRET|TOKEN|KEY", name):
            assert value == "", f"{name} looks like a secret and must be empty in .env.example"
        # nothing token-like: long runs of letters and digits mixed
        for run in re.findall(r"[A-Za-z0-9+/_=-]{16,}", value):
            assert not (re.search(r"\d", run) and re.search(r"[A-Za-z]", run)), f"{name}={value!r}"


def test_no_secret_has_a_default_in_a_compose_file():
    """A secret is required (``${VAR:?message}``), never given a default or a value a deployment could keep."""
    required = re.compile(r"^\$\{(?P<var>[A-Z_]+):\?[^}]+\}$")
    for name in COMPOSE_FILES:
        text = (REPO / name).read_text()
        for var in SECRETS:
            assert not re.search(r"\$\{" + var + r":?[-+]", text), f"{name}: {var} has a default"
        for svc, spec in load(name)["services"].items():
            for key, value in (spec.get("environment") or {}).items():
                if re.search(r"PASS|SECRET|TOKEN|KEY", key) and str(value) not in ("true", "false"):
                    m = required.match(str(value))
                    assert m and m.group("var") in SECRETS, f"{name} {svc}: {key}={value!r}"


def test_gitignore_and_dockerignore_keep_env_out():
    assert ".env" in (REPO / ".gitignore").read_text().split()
    ignored = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()]
    for entry in (".env", ".venv/", ".cache/", "data/", ".quickstart/"):
        assert entry in ignored, entry


# ------------------------------------------------------------------------------------------ agreement with the code


@pytest.mark.parametrize("name", [BASE, REMOTE])
def test_backend_and_worker_variables_are_settings(name, test_env, monkeypatch):
    doc = resolved(name, test_env)
    known = setting_names()
    for svc in OUR_SERVICES[name]:
        env = service_env(doc["services"][svc])
        unknown = set(env) - known - set(NOT_SETTINGS)
        assert not unknown, f"{name} {svc}: not a Settings variable: {sorted(unknown)}"
        settings = settings_from(env, monkeypatch)  # every value parses and passes the Settings rules
        assert settings.basic_auth is not None or svc == "worker"


def test_cpu_override_variables_are_settings(test_env, monkeypatch):
    worker = merged_cpu(test_env)["services"]["worker"]
    env = service_env(worker)
    assert set(env) - setting_names() - set(NOT_SETTINGS) == set()
    assert settings_from(env, monkeypatch).device == "cpu"


def test_label_studio_variables_exist_in_label_studio_1_23_2():
    """Label Studio's settings read NAME as LABEL_STUDIO_NAME, HEARTEX_NAME or NAME (core.utils.params.get_env)."""
    from ml_backend.services.label_studio import LABEL_STUDIO_VERSION

    image = load(BASE)["services"]["label-studio"]["image"]
    assert image == f"heartexlabs/label-studio:{LABEL_STUDIO_VERSION}"
    venv = Path(os.environ.get("LABEL_STUDIO_VENV") or REPO / ".cache" / "label-studio-venv")
    packages = sorted(venv.glob("lib/python*/site-packages/label_studio"))
    if not packages:
        pytest.skip(f"Label Studio {LABEL_STUDIO_VERSION} is not installed at {venv} (scripts/test.sh installs it)")
    source = "\n".join(p.read_text(errors="replace") for p in packages[0].rglob("*.py"))
    env = load(BASE)["services"]["label-studio"]["environment"]
    for name in env:
        bare = name.removeprefix("LABEL_STUDIO_")
        assert re.search(rf"['\"](LABEL_STUDIO_)?{bare}['\"]", source), f"Label Studio reads no {name}"
    assert env["DJANGO_DB"] == "default"
    assert "get_env('DJANGO_DB', 'default')" in source
    assert "DATABASES_ALL['default'] = DATABASES_ALL[DJANGO_DB_POSTGRESQL]" in source
    assert re.search(r"re_path\(r'health/'", source), "Label Studio has no /health route"


def test_backend_and_workers_share_redis_queue_and_model_store(test_env, monkeypatch):
    from ml_backend.cli.worker import worker_command
    from ml_backend.queue.connection import get_queue

    doc = resolved(BASE, test_env)
    backend, worker = doc["services"]["backend"], doc["services"]["worker"]
    s_backend = settings_from(service_env(backend), monkeypatch)
    s_worker = settings_from(service_env(worker), monkeypatch)
    assert s_backend.redis_url == s_worker.redis_url
    assert s_backend.redis_url.startswith("redis://") and "@redis:6379" in s_backend.redis_url  # the redis service
    assert s_backend.label_studio_url == s_worker.label_studio_url == "http://label-studio:8080"
    # the worker listens on the queue the backend enqueues on
    cmd = worker_command(s_worker)
    assert cmd[-1] == get_queue(s_backend, connection=object()).name == s_backend.queue_name
    assert cmd[cmd.index("-u") + 1] == s_backend.redis_url
    # the worker publishes versions into MODEL_DIR, the backend serves them: one volume at both MODEL_DIRs
    mounts_b = {t: s for s, t in map(named_volume, backend["volumes"])}
    mounts_w = {t: s for s, t in map(named_volume, worker["volumes"])}
    assert str(s_backend.model_dir) == str(s_worker.model_dir)
    assert mounts_b[str(s_backend.model_dir)] == mounts_w[str(s_worker.model_dir)]
    # tiles: written by `ml-backend import` in the backend, served by Label Studio from the same volume
    ls = doc["services"]["label-studio"]
    mounts_ls = {t: s for s, t in map(named_volume, ls["volumes"])}
    root = s_backend.local_files_root
    assert ls["environment"]["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] == root
    assert mounts_ls[root] == mounts_b[root] == mounts_w[root]
    # the remote worker talks to the same queue name and mounts a model store at its MODEL_DIR
    remote = resolved(REMOTE, test_env)["services"]["worker"]
    s_remote = settings_from(service_env(remote), monkeypatch)
    assert s_remote.queue_name == s_backend.queue_name
    assert str(s_remote.model_dir) in {t for _, t in map(named_volume, remote["volumes"])}
    assert s_remote.redis_url.endswith("@gpu-main.example.org:6379/0")


def test_worker_command_dry_run_listens_on_the_backends_queue(test_env, monkeypatch):
    """The worker's command, run as the container runs it (``--dry-run``): the rq command it would exec."""
    doc = resolved(BASE, test_env)
    worker = doc["services"]["worker"]
    s_backend = settings_from(service_env(doc["services"]["backend"]), monkeypatch)
    cmd = [sys.executable if a == "python" else a for a in worker["command"]] + ["--dry-run"]
    env = {"PATH": os.environ.get("PATH", ""), **service_env(worker)}
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=120, check=True).stdout
    rq_args = shlex.split(out.strip().splitlines()[-1])
    assert rq_args[-1] == s_backend.queue_name
    assert rq_args[rq_args.index("-u") + 1] == s_backend.redis_url
    assert rq_args[rq_args.index("--worker-class") + 1] == "ml_backend.worker.RecoveringWorker"


def _check_command(command: list[str]) -> None:
    from ml_backend.cli import DELEGATED, build_parser

    if command[0] == "python":
        assert command[1] == "-m"
        module = command[2]
        assert importlib.util.find_spec(module) is not None, module
        if module in ("ml_backend", "ml_backend.cli"):
            sub = build_parser()._subparsers._group_actions[0].choices
            assert command[3] in sub or command[3] in DELEGATED, f"no `ml-backend {command[3]}`"
    elif command[0] == "ml-backend":
        import tomllib

        scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
        module, func = scripts["ml-backend"].split(":")
        assert callable(getattr(importlib.import_module(module), func))
        _check_command(["python", "-m", "ml_backend.cli", *command[1:]])
    elif command[0] == "gunicorn":
        target = command[-1]
        module, expr = target.split(":")
        factory = expr.removesuffix("()")
        assert callable(getattr(importlib.import_module(module), factory)), target
    else:
        pytest.fail(f"unknown command {command}")


@pytest.mark.parametrize("name", [BASE, REMOTE])
def test_commands_exist(name, test_env):
    doc = resolved(name, test_env)
    for svc in OUR_SERVICES[name]:
        command = doc["services"][svc]["command"]
        assert isinstance(command, list), "exec form: signals reach the process"
        _check_command(command)


def test_health_check_paths_are_backend_routes(tmp_path, monkeypatch):
    from ml_backend.server.app import create_app
    from ml_backend.server.auth import OPEN_PATHS

    routes = {rule.rule: rule.methods for rule in create_app(Settings(model_dir=tmp_path)).url_map.iter_rules()}
    for name in [BASE]:
        test = load(name)["services"]["backend"]["healthcheck"]["test"]
        paths = re.findall(r"http://127\.0\.0\.1:9090(/[^'\"]*)", " ".join(test))
        assert paths, test
        for path in paths:
            assert path in routes and "GET" in routes[path], path
            assert path in OPEN_PATHS, f"{path} needs basic auth: the health check has no login"


def test_every_service_is_checked_restarted_and_waited_for(test_env):
    for name in [BASE, REMOTE]:
        doc = resolved(name, test_env)
        for svc, spec in doc["services"].items():
            assert spec.get("restart") == "unless-stopped", f"{name} {svc}"
            assert spec.get("healthcheck", {}).get("test"), f"{name} {svc} has no health check"
            for dep, cond in (spec.get("depends_on") or {}).items():
                assert cond == {"condition": "service_healthy"}, f"{svc} -> {dep}"
                assert doc["services"][dep]["healthcheck"]["test"]
    services = load(BASE)["services"]
    assert "pg_isready" in " ".join(services["postgres"]["healthcheck"]["test"])
    assert "ping" in " ".join(services["redis"]["healthcheck"]["test"])
    assert "/health" in " ".join(services["label-studio"]["healthcheck"]["test"])
    assert set(services["label-studio"]["depends_on"]) == {"postgres"}
    assert set(services["backend"]["depends_on"]) == {"redis", "label-studio"}


def test_redis_keeps_an_append_only_file(test_env):
    redis = resolved(BASE, test_env)["services"]["redis"]
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--requirepass" in command
    assert any(target == "/data" for _, target in map(named_volume, redis["volumes"]))


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_named_volumes_are_declared(name, test_env):
    doc = resolved(name, test_env)
    declared = set((doc.get("volumes") or {}).keys())
    for svc, spec in doc["services"].items():
        for volume in spec.get("volumes") or []:
            source, _ = named_volume(volume)
            if not source.startswith(("/", ".", "~")):
                assert source in declared, f"{name} {svc}: volume {source} is not declared"


def test_gpu_worker_and_cpu_variant(test_env):
    worker = resolved(BASE, test_env)["services"]["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert worker["build"]["args"]["VARIANT"] == "cuda"
    remote = resolved(REMOTE, test_env)["services"]["worker"]
    assert remote["deploy"] == worker["deploy"] and remote["build"] == worker["build"]
    cpu = merged_cpu(test_env)["services"]["worker"]
    assert "deploy" not in cpu
    assert cpu["build"]["args"]["VARIANT"] == "cpu"
    assert cpu["image"] == resolved(BASE, test_env)["services"]["backend"]["image"]
    assert cpu["command"] == worker["command"] and cpu["volumes"] == worker["volumes"]
    assert service_env(cpu)["DEVICE"] == "cpu"


# ------------------------------------------------------------------------------------------ the Dockerfile


def dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def test_dockerfile_variants_match_the_compose_build_args(test_env):
    text = dockerfile()
    stages = set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", text, re.M | re.I))
    assert {"cpu", "cuda", "app"} <= stages
    assert re.search(r"^ARG VARIANT=cpu$", text, re.M), "the CPU image stays the default"
    assert re.search(r"^FROM \$\{VARIANT\} AS app$", text, re.M)
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:\S+$", text, re.M), "the cuda stage is an official nvidia/cuda image"
    assert text.strip().splitlines()[-1].startswith("CMD"), "the last stage (default target) is the application"
    builds = [resolved(BASE, test_env)["services"][s]["build"] for s in ("backend", "worker")]
    builds.append(resolved(REMOTE, test_env)["services"]["worker"]["build"])
    builds.append(merged_cpu(test_env)["services"]["worker"]["build"])
    for build in builds:
        assert build["args"]["VARIANT"] in stages


def test_dockerfile_holds_no_secret_and_copies_what_exists():
    text = dockerfile()
    for kind, name in re.findall(r"^(ENV|ARG)\s+([A-Za-z_][A-Za-z0-9_]*)", text, re.M):
        assert not re.search(r"PASS|SECRET|TOKEN|KEY|AUTH", name), f"{kind} {name} in the Dockerfile"
    for name in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", " ".join(re.findall(r"^ENV (.*)$", text, re.M))):
        assert not re.search(r"PASS|SECRET|TOKEN|KEY|AUTH", name), name
    ignored = {line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()}
    for sources in re.findall(r"^COPY (?!--from)(.*) \S+$", text, re.M):
        for source in sources.split():
            assert (REPO / source).exists(), source
            assert source.rstrip("/") not in ignored, f"{source} is copied but .dockerignore excludes it"


def test_dockerfile_cmd_is_the_compose_backend_command(test_env):
    cmd = re.search(r"^CMD (\[.*\])$", dockerfile(), re.M).group(1)
    image_cmd = json.loads(cmd)
    compose_cmd = resolved(BASE, test_env)["services"]["backend"]["command"]
    assert image_cmd[-1] == compose_cmd[-1]
    _check_command(image_cmd)


# ------------------------------------------------------------------------------------------ the containers' commands


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local(test: list[str], *, port: int | None = None) -> list[str]:
    """A compose health check (exec form) as a command on this machine."""
    assert test[0] == "CMD", test
    cmd = [sys.executable if a in ("python", "python3") else a for a in test[1:]]
    return [a.replace(":9090/", f":{port}/") for a in cmd] if port else cmd


@pytest.mark.timeout(240)
def test_backend_command_answers_its_health_check(test_env, tmp_path):
    doc = resolved(BASE, test_env)
    backend = doc["services"]["backend"]
    port = _free_port()
    command = [a.replace("0.0.0.0:9090", f"127.0.0.1:{port}") for a in backend["command"]]
    assert command != backend["command"]
    env = {**service_env(backend), "MODEL_DIR": str(tmp_path / "models"), "PATH": os.environ.get("PATH", "")}
    env["REDIS_URL"] = f"redis://:{test_env['REDIS_PASSWORD']}@127.0.0.1:{_free_port()}/0"  # unused by /health
    env["LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT"] = str(tmp_path / "files")
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = bin_dir + os.pathsep + env["PATH"]
    check = _local(backend["healthcheck"]["test"], port=port)
    assert subprocess.run(check, capture_output=True, timeout=30).returncode != 0, "nothing listens yet"
    log = tmp_path / "gunicorn.log"
    with open(log, "wb") as fh:
        proc = subprocess.Popen(command, env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            if subprocess.run(check, env=env, capture_output=True, timeout=30).returncode == 0:
                break
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(1)
        # the login from .env reaches the backend: other routes need it
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/versions", timeout=10)
        assert exc.value.code == 401
        req = urllib.request.Request(f"http://127.0.0.1:{port}/health?details=1")
        login = f"{test_env['BASIC_AUTH_USER']}:{test_env['BASIC_AUTH_PASS']}".encode()
        req.add_header("Authorization", "Basic " + base64.b64encode(login).decode())
        details = json.loads(urllib.request.urlopen(req, timeout=10).read())
        assert details["device"] == "cpu" and details["model_dir"] == env["MODEL_DIR"]
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(timeout=30)


@pytest.mark.timeout(180)
def test_worker_health_check_sees_the_registered_worker(redis_url, start_rq_worker, test_env, tmp_path):
    worker = resolved(BASE, test_env)["services"]["worker"]
    check = _local(worker["healthcheck"]["test"])
    env = {**service_env(worker), "REDIS_URL": redis_url, "MODEL_DIR": str(tmp_path / "models"),
           "PATH": os.environ.get("PATH", ""), "DEVICE": "cpu"}  # fmt: skip
    assert subprocess.run(check, env=env, capture_output=True, timeout=60).returncode == 1, "no worker yet"
    rq_worker = start_rq_worker(env, prefix="deploy")
    deadline = time.monotonic() + 120
    while subprocess.run(check, env=env, capture_output=True, timeout=60).returncode != 0:
        assert rq_worker.process.poll() is None, rq_worker.log_path.read_text()[-3000:]
        assert time.monotonic() < deadline, rq_worker.log_path.read_text()[-3000:]
        time.sleep(1)
    rq_worker.stop()
    deadline = time.monotonic() + 60
    while subprocess.run(check, env=env, capture_output=True, timeout=60).returncode == 0:
        assert time.monotonic() < deadline, "a stopped worker still counts as healthy"
        time.sleep(1)


# ------------------------------------------------------------------------------------------ the real stack


def _compose_v2() -> list[str] | None:
    docker = shutil.which("docker")
    if docker is None:
        return None
    try:
        ok = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30).returncode == 0
        ok = ok and subprocess.run([docker, "info"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return None
    return [docker, "compose"] if ok else None


@pytest.mark.deploy
@pytest.mark.timeout(1800)
def test_stack_comes_up(tmp_path, test_env):
    """The CPU variant from scratch: build, `up --wait` (every health check green), the backend and Label Studio
    answer from the host, then everything is removed with its volumes. Needs Docker with Compose v2 and access to
    Docker Hub (skipped otherwise)."""
    compose = _compose_v2()
    if compose is None:
        pytest.skip("no Docker engine with Compose v2 here")
    env_file = tmp_path / ".env"
    ports = {"LABEL_STUDIO_PORT": _free_port(), "BACKEND_PORT": _free_port()}
    env_file.write_text("".join(f"{k}={v}\n" for k, v in {**test_env, **ports}.items()))
    project = f"emal-test-{secrets.token_hex(4)}"
    base = [*compose, "-p", project, "--env-file", str(env_file), "-f", BASE, "-f", CPU]
    try:
        subprocess.run([*base, "up", "-d", "--build", "--wait"], cwd=REPO, check=True, timeout=1500)
        for port in ports.values():
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
                assert json.loads(resp.read())["status"] == "UP"
    finally:
        subprocess.run([*base, "down", "-v"], cwd=REPO, timeout=300)


def test_interpolation_helper_follows_compose():
    """The reader above is what the other tests rely on: it must resolve like Compose."""
    errors: list[str] = []
    env = {"A": "a", "EMPTY": ""}
    doc = {"x": "${A}-${B:-b}-${EMPTY:-e}-${EMPTY-e}-$$A-${A:+set}-${C?c is required}", "y": ["${EMPTY:?must}"]}
    out = interpolate(copy.deepcopy(doc), env, errors)
    assert out["x"] == "a-b-e--$A-set-"
    assert errors == ["C: c is required", "EMPTY: must"]
    assert variables(doc) == {"A", "B", "EMPTY", "C"}
