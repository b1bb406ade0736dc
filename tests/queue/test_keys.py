"""The Redis key layout (``queue.keys``): every key is a named function, under the prefix, one key per argument set,
and the strings stay what deployed backends (and jobs queued by an older version) already use."""

from __future__ import annotations

import fnmatch
import inspect
import itertools

from ml_backend.queue import keys

PIDS = (1, 7, 2**31 - 1)
VERSIONS = ("v1", "20240101-120000")
CHUNKS = (keys.chunk_id([1, 2, 3]), keys.chunk_id([4]))
TASKS = (1, 42)
ARGS = {"project_id": PIDS, "version": VERSIONS, "chunk": CHUNKS, "task_id": TASKS}


def _key_functions() -> dict:
    return {
        name: fn
        for name, fn in inspect.getmembers(keys, inspect.isfunction)
        if fn.__module__ == keys.__name__ and name.endswith("_key") and not name.startswith("_")
    }


def _calls(fn) -> list[tuple]:
    params = list(inspect.signature(fn).parameters)
    return list(itertools.product(*(ARGS[p] for p in params)))


def test_every_key_is_under_the_prefix_and_distinct_for_distinct_arguments():
    functions = _key_functions()
    assert set(functions) == {
        "projects_key", "pending_key", "queued_key", "force_key", "lock_key", "dirty_key", "last_job_key",
        "rescore_ctx_key", "rescore_result_key", "rescore_claim_key", "backlog_key",
    }  # fmt: skip
    seen: dict[str, tuple] = {}
    for name, fn in functions.items():
        assert fn.__doc__, f"{name} has no docstring"
        for args in _calls(fn):
            value = fn(*args)
            assert value.startswith(keys.PREFIX), (name, args, value)
            assert fnmatch.fnmatchcase(value, keys.all_pattern())
            assert value not in seen, f"{name}{args} and {seen.get(value)} both give {value!r}"
            seen[value] = (name, args)
            if name != "projects_key":
                pid = args[0]
                assert fnmatch.fnmatchcase(value, keys.project_pattern(pid))
                assert fnmatch.fnmatchcase(value, keys.project_pattern())
                assert not any(fnmatch.fnmatchcase(value, keys.project_pattern(p)) for p in PIDS if p != pid)
                assert fnmatch.fnmatchcase(value, keys.rescore_pattern(pid)) == name.startswith("rescore_")


def test_the_strings_stay_byte_identical():
    assert keys.projects_key() == "mlb:projects"
    for name in ("pending", "queued", "force", "lock", "dirty", "last_job"):
        assert getattr(keys, f"{name}_key")(7) == f"mlb:project:7:{name}"
    assert keys.rescore_ctx_key(3, "v1") == "mlb:project:3:rescore:v1:ctx"
    assert keys.rescore_result_key(3, "v1", "abc") == "mlb:project:3:rescore:v1:result:abc"
    assert keys.rescore_claim_key(3, "v1", "abc") == "mlb:project:3:rescore:v1:claim:abc"
    assert keys.backlog_key(3, "v1", 42) == "mlb:project:3:backlog:v1:42"
    assert keys.rescore_pattern(3) == "mlb:project:3:rescore:*"
    assert keys.project_pattern() == "mlb:project:*:*" and keys.all_pattern() == "mlb:*"
    assert keys.chunk_id([1, 2, 3]) == "b85e2d4914e22b5a"
