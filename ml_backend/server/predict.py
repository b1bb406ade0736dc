"""The HTTP side of /predict: the request body read task by task (``parse_predict_body``) and the tasks not done by
PREDICT_DEADLINE_S handed to the background (``queue_undone``). The pipeline itself (fetch, score, RLE, queue scores)
is ``labelstudio/prediction.py``, shared with the backlog jobs (``jobs/backlog.py``).
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from ml_backend.ids import parse_id
from ml_backend.labelstudio.prediction import DeadlineExceeded, PredictionOutcome, deadline_error, fail_task
from ml_backend.queue import QueueUnavailable
from ml_backend.queue.rescoring import enqueue_backlog

from .schemas import (
    MAX_JSON_DEPTH,
    MAX_TASKS,
    BadRequest,
    _parse_int,
    json_body_text,
    json_depth,
    parse_json_body,
)

__all__ = ["parse_predict_body", "queue_undone"]

log = logging.getLogger(__name__)


def queue_undone(project: int, outcome: PredictionOutcome, tasks: list[Any], settings: Any) -> None:
    """Hand the tasks not done by the deadline to the background (``queue.rescoring.enqueue_backlog``: RQ jobs that
    predict them with the same version and push the predictions to Label Studio), so that a large "Retrieve
    predictions" ends with every task predicted without anybody pressing it again.

    Their answer stays ``[]`` (nothing stored, asked again next time: module docstring). When they cannot be queued
    (no Redis), each becomes a per-task "deadline exceeded" error, as before; Label Studio asks again next time.
    """
    if not outcome.undone:
        return
    ids = [parse_id(tasks[i].get("id"), "id") for i in outcome.undone]  # validated before they were fetched
    try:
        receipt = enqueue_backlog(int(project), outcome.model_version, ids, settings)
    except QueueUnavailable as exc:
        log.warning("project %s: %d task(s) not done by the deadline could not be queued: %s", project, len(ids), exc)
        reason = f"{deadline_error(settings)}; not queued for the background: {exc}"
        for i in outcome.undone:
            fail_task(outcome, i, tasks[i], DeadlineExceeded(reason), quiet=True)
        outcome.errors.sort(key=lambda e: e["index"])
        outcome.undone = []
        return
    outcome.queued = {
        "tasks": len(receipt.queued),
        "jobs": len(receipt.jobs),
        "already_queued": receipt.already_queued,
        "reason": (
            f"not done within PREDICT_DEADLINE_S={float(settings.predict_deadline_s):g} s: answered without a "
            f"prediction and predicted in the background with {outcome.model_version} "
            "(pushed to Label Studio as they are done)"
        ),
    }
    log.info("project %s: %d task(s) queued for background prediction with %s in %d job(s) (%d already queued)",
             project, len(receipt.queued), outcome.model_version, len(receipt.jobs),
             receipt.already_queued)  # fmt: skip


# ---------------------------------------------------------------------- the request body, one task at a time
_WS = re.compile(r"[ \t\n\r]*")
TASK_FIELDS = ("id", "data")  # all /predict reads of a task; Label Studio also sends its predictions, annotations...


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


_DECODER = json.JSONDecoder(parse_int=_parse_int, parse_constant=_refuse_constant)


def _slim(task: Any) -> Any:
    """What /predict keeps of a task: ``id`` and ``data`` (a non-object stays, sized down, to fail alone later)."""
    if isinstance(task, dict):
        return {k: task[k] for k in TASK_FIELDS if k in task}
    if isinstance(task, (list, str)):
        return type(task)()  # keeps its kind for the per-task error, not its size
    return task


def parse_predict_body(raw: bytes, content_type: str | None) -> dict:
    """The /predict body as a dict, its ``tasks`` read one at a time and slimmed (``_slim``) as they are read.

    Why not ``json.loads``: Label Studio serialises every task with its annotations and predictions (brush RLE:
    tens of kB per 512-px tile); as Python objects those take several times their text, and 2,000+ tasks come in
    one request. Read element by element, the memory is the body's text plus one task. Same rules as
    ``schemas.parse_json_body`` (content type, MAX_JSON_DEPTH, huge integers kept as text, a clear 400), with two
    differences: the depth is checked per value as it is read (the C scanner stops a deeper nesting at the
    recursion limit with a RecursionError; a scan of the whole text would copy it twice), and the task cap
    (``MAX_TASKS``) is checked while reading.
    """
    text = json_body_text(raw, content_type)
    start = _WS.match(text, 0).end()
    if text[start : start + 1] != "{":
        return parse_json_body(raw, content_type)  # not an object: its own error ("expected a JSON object, got ...")
    try:
        return _read_object(text, start)
    except RecursionError:
        raise BadRequest(_TOO_DEEP) from None
    except (json.JSONDecodeError, ValueError) as exc:
        if isinstance(exc, BadRequest):
            raise
        raise BadRequest(f"malformed JSON: {exc}") from exc


_TOO_DEEP = f"request body nests JSON deeper than {MAX_JSON_DEPTH} levels"


def _value(text: str, pos: int, level: int) -> tuple[Any, int]:
    """(the JSON value at ``pos``, the position after it), at nesting ``level``: deeper than MAX_JSON_DEPTH in all
    is a BadRequest, like the whole-body check of ``schemas.check_json_depth``."""
    value, end = _DECODER.raw_decode(text, pos)
    if isinstance(value, (dict, list)) and level + json_depth(text[pos:end]) > MAX_JSON_DEPTH:
        raise BadRequest(_TOO_DEEP)
    return value, end


def _expect(text: str, pos: int, chars: str, what: str) -> tuple[str, int]:
    """(the character at ``pos`` after whitespace, the position after it); a JSONDecodeError unless in ``chars``."""
    pos = _WS.match(text, pos).end()
    char = text[pos : pos + 1]
    if not char or char not in chars:
        raise json.JSONDecodeError(f"Expecting {what}", text, pos)
    return char, pos + 1


def _read_object(text: str, pos: int) -> dict:
    body: dict[str, Any] = {}
    _, pos = _expect(text, pos, "{", "'{'")
    pos = _WS.match(text, pos).end()
    if text[pos : pos + 1] == "}":
        pos += 1
    else:
        while True:
            pos = _WS.match(text, pos).end()
            if text[pos : pos + 1] != '"':
                raise json.JSONDecodeError("Expecting property name enclosed in double quotes", text, pos)
            name, pos = _DECODER.raw_decode(text, pos)
            _, pos = _expect(text, pos, ":", "':' delimiter")
            pos = _WS.match(text, pos).end()
            if name == "tasks" and text[pos : pos + 1] == "[":
                body[name], pos = _read_tasks(text, pos + 1)
            else:
                body[name], pos = _value(text, pos, 1)
            char, pos = _expect(text, pos, ",}", "',' delimiter")
            if char == "}":
                break
    if _WS.match(text, pos).end() != len(text):
        raise json.JSONDecodeError("Extra data", text, _WS.match(text, pos).end())
    return body


def _read_tasks(text: str, pos: int) -> tuple[list[Any], int]:
    tasks: list[Any] = []
    pos = _WS.match(text, pos).end()
    if text[pos : pos + 1] == "]":
        return tasks, pos + 1
    while True:
        task, pos = _value(text, _WS.match(text, pos).end(), 2)
        if len(tasks) == MAX_TASKS:
            raise BadRequest(
                f"'tasks' has more than {MAX_TASKS:,} tasks, at most {MAX_TASKS:,} per request (a protection: select "
                "fewer tasks in Label Studio's Data Manager)"
            )
        tasks.append(_slim(task))
        char, pos = _expect(text, pos, ",]", "',' delimiter")
        if char == "]":
            return tasks, pos
