"""Request validation at the HTTP edge: body parsing with size and depth limits, pydantic models of every POST body.

Why: every client mistake must be a 4xx with a reason, never a 500, and ids that cannot exist must never reach the
disk (``MODEL_DIR/projects/<id>``) or Redis. So, before any handler code runs:

* the body is refused when it is too large (``MAX_REQUEST_BYTES``, Flask answers 413), has a non-JSON content type
  (415), or nests deeper than ``MAX_JSON_DEPTH`` -- checked by a linear scan of the raw text BEFORE ``json.loads``,
  whose recursion (and everything downstream: pydantic, jsonify) would otherwise blow up on 100k-deep input;
* integer literals longer than ``MAX_INT_DIGITS`` are kept as text (``BigIntLiteral``) instead of calling ``int()``
  on them (Python refuses > 4,300 digits with a ValueError), so one huge task id fails only its own task;
* ids are Label Studio's database ids: integers in 1..2**31-1 (``MAX_ID``), parsed by ``ml_backend.ids`` (the one
  id parser); project references may carry Label Studio's ``"<id>.<timestamp>"`` suffix. Strings are bounded;
  unknown extra fields are ignored, because Label Studio sends fields this backend does not use (``hostname``,
  ``access_token``, ``params``...) and adds new ones between versions.

A bad individual task inside ``/predict`` is NOT a request error: ``tasks`` is only checked to be a bounded list here,
and ``predict.py`` fails just that task (``task_id``).
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ml_backend.ids import MAX_ID, MAX_INT_DIGITS, BigIntLiteral
from ml_backend.ids import json_kind as _kind
from ml_backend.ids import parse_id as bounded_id  # re-exported: the one id parser lives in ml_backend.ids
from ml_backend.ids import parse_project_ref as project_id
from ml_backend.ids import shown as _show

__all__ = [
    "MAX_ID",
    "MAX_JSON_DEPTH",
    "MAX_TASKS",
    "BadRequest",
    "BigIntLiteral",
    "ExtraParams",
    "PredictRequest",
    "SetupRequest",
    "UnsupportedMediaType",
    "WebhookRequest",
    "bounded_id",
    "check_json_depth",
    "describe_validation_error",
    "json_depth",
    "json_body_text",
    "parse_json_body",
    "project_id",
]

MAX_JSON_DEPTH = 64  # Label Studio's deepest payload (a webhook's project) nests < 10
MAX_TASKS = 200_000  # per /predict: a protection only, far above a real project (the quick start: 1,980); what is
# not done by PREDICT_DEADLINE_S is answered empty and finished in the background (server/predict.py)
MAX_LABEL_CONFIG_CHARS = 1_000_000
MAX_EXTRA_PARAMS_CHARS = 65_536
MAX_NAME_CHARS = 64  # strategy / aggregation names, webhook actions

_STRING = re.compile(r'"[^"\\]*(?:\\(?:.|\Z)[^"\\]*)*(?:"|\Z)', re.S)  # always matches: linear, no backtracking
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_SCAN_CHUNK = 1 << 22


class BadRequest(ValueError):
    """The request is at fault (answered 400 with the message as reason)."""


class UnsupportedMediaType(BadRequest):
    """The body is not declared as JSON (answered 415)."""


def _parse_int(text: str) -> int | BigIntLiteral:
    return int(text) if len(text) <= MAX_INT_DIGITS else BigIntLiteral(text)


def json_depth(text: str) -> int:
    """Deepest bracket nesting of JSON ``text``, outside strings, in linear time without recursion.

    Up to the first syntax error the scan tokenises like the parser, so it never under-counts what ``json.loads``
    would recurse into. Unterminated strings swallow the rest of the text (the parser stops there too).
    """
    if text.count("[") + text.count("{") <= MAX_JSON_DEPTH:
        return text.count("[") + text.count("{")  # an upper bound, cheap for ordinary bodies
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode("ascii")
    deepest, level = 0, 0
    for start in range(0, len(brackets), _SCAN_CHUNK):
        codes = np.frombuffer(brackets, dtype=np.uint8, count=min(_SCAN_CHUNK, len(brackets) - start), offset=start)
        steps = np.where((codes == ord("[")) | (codes == ord("{")), 1, -1).astype(np.int64)
        levels = np.cumsum(steps) + level
        deepest = max(deepest, int(levels.max()))
        level = int(levels[-1])
    return deepest


def check_json_depth(text: str, what: str = "request body") -> None:
    if json_depth(text) > MAX_JSON_DEPTH:
        raise BadRequest(f"{what} nests JSON deeper than {MAX_JSON_DEPTH} levels")


def _refuse_constant(name: str) -> Any:
    """``NaN``, ``Infinity``, ``-Infinity``: Python's json accepts them, JSON does not; a parameter of Infinity once
    reached state.json and overflowed the selection."""
    raise ValueError(f"{name} is not a JSON number (non-finite numbers are refused)")


def loads_limited(text: str, what: str = "request body") -> Any:
    """``json.loads`` after the depth check; huge integers stay text; NaN/Infinity and anything else malformed is a
    BadRequest."""
    check_json_depth(text, what)
    try:
        return json.loads(text, parse_int=_parse_int, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise BadRequest(f"malformed JSON in {what}: {exc}") from exc


def json_body_text(raw: bytes, content_type: str | None) -> str:
    """The body as JSON text, checked before any parsing: content type, not empty, UTF-8/16/32.

    A missing content type is accepted (hand-written calls); a declared non-JSON one (form data, text) is not.
    """
    mimetype = (content_type or "").split(";", 1)[0].strip().lower()
    if mimetype and mimetype != "application/json" and not mimetype.endswith("+json"):
        raise UnsupportedMediaType(f"unsupported content type {mimetype[:80]!r}: send 'Content-Type: application/json'")
    if not raw.strip():
        raise BadRequest("empty request body: expected a JSON object")
    try:
        return raw.decode(json.detect_encoding(raw))
    except (UnicodeDecodeError, LookupError) as exc:
        raise BadRequest(f"malformed JSON: the body is not UTF-8/16/32 text ({exc.__class__.__name__})") from exc


def parse_json_body(raw: bytes, content_type: str | None) -> dict:
    """The body as a JSON object; BadRequest / UnsupportedMediaType with a reason otherwise (``json_body_text``)."""
    text = json_body_text(raw, content_type)
    try:
        body = loads_limited(text)
    except BadRequest as exc:
        raise BadRequest(str(exc).replace("malformed JSON in request body", "malformed JSON")) from exc
    if not isinstance(body, dict):
        raise BadRequest(f"expected a JSON object, got {_kind(body)}")
    return body


def describe_validation_error(exc: ValidationError) -> str:
    """One readable line per problem; our own validators' messages as they are, pydantic's with the field."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "missing":
            parts.append(f"missing {loc!r}" if loc != "project" else project_error_text(None))
        elif err["type"] == "value_error":
            parts.append(str(err["msg"]).removeprefix("Value error, "))
        else:
            parts.append(f"{loc!r}: {err['msg']}")
    return "; ".join(parts)


def project_error_text(value: Any) -> str:
    try:
        project_id(value)
    except ValueError as exc:
        return str(exc)
    return ""


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)


def _optional_text(value: Any, what: str, limit: int) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or isinstance(value, BigIntLiteral):
        raise ValueError(f"{what} must be {_TEXT_KIND.get(what, 'a string')}, got {_kind(value)}")
    if len(value) > limit:
        raise ValueError(f"{what} is {len(value):,} characters long (at most {limit:,})")
    return value


_TEXT_KIND = {"'schema'": "the label config XML as a string", "'label_config'": "the label config XML as a string"}


class ExtraParams(_Body):
    """/setup's ``extra_params`` (what the user typed in Label Studio's model settings), validated.

    Unknown keys are refused, not ignored (unlike the request's own fields, this object is typed by a user: a
    misspelt or misplaced key, e.g. ``n_init`` outside ``strategy_params``, must not silently do nothing). The
    strategy's parameters are checked against its declared ``Params`` by ``projects.strategy_from_params``.
    """

    model_config = ConfigDict(extra="forbid")

    strategy: str | None = None
    aggregation: str | None = None
    strategy_params: dict[str, bool | int | float | str | None] = Field(default_factory=dict, max_length=32)

    @field_validator("strategy", "aggregation", mode="before")
    @classmethod
    def _name(cls, value: Any, info: Any) -> str | None:
        if value in (None, ""):
            return None
        return _optional_text(value, f"extra_params.{info.field_name}", MAX_NAME_CHARS)

    @field_validator("strategy_params", mode="before")
    @classmethod
    def _params(cls, value: Any) -> dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ValueError(f"extra_params.strategy_params must be an object, got {_kind(value)}")
        for key, item in value.items():
            if len(key) > MAX_NAME_CHARS or isinstance(item, (dict, list, BigIntLiteral)):
                raise ValueError(f"extra_params.strategy_params[{_show(key)}] must be a number, string or boolean")
            if isinstance(item, float) and not math.isfinite(item):
                raise ValueError(f"extra_params.strategy_params[{_show(key)}] is {item!r}: numbers must be finite")
        return value

    @model_validator(mode="before")
    @classmethod
    def _known_keys(cls, value: Any) -> Any:
        if isinstance(value, dict):
            unknown = [key for key in value if key not in cls.model_fields]
            if unknown:
                raise ValueError(
                    f"extra_params has unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(_show, unknown))}; "
                    f"allowed: {', '.join(cls.model_fields)} (a strategy's own parameters go in strategy_params)"
                )
        return value


class SetupRequest(_Body):
    """``POST /setup`` as Label Studio sends it: {project, schema, extra_params, hostname, access_token, ...}."""

    project: int
    schema_xml: str | None = Field(None, alias="schema")
    label_config: str | None = None
    extra_params: ExtraParams | None = None

    @field_validator("project", mode="before")
    @classmethod
    def _project(cls, value: Any) -> int:
        return project_id(value)

    @field_validator("schema_xml", mode="before")
    @classmethod
    def _schema(cls, value: Any) -> str | None:
        return _optional_text(value, "'schema'", MAX_LABEL_CONFIG_CHARS)

    @field_validator("label_config", mode="before")
    @classmethod
    def _label_config(cls, value: Any) -> str | None:
        return _optional_text(value, "'label_config'", MAX_LABEL_CONFIG_CHARS)

    @field_validator("extra_params", mode="before")
    @classmethod
    def _extra(cls, value: Any) -> Any:
        """Label Studio sends an object, or the JSON text the user typed; empty means "keep the stored strategy"."""
        if isinstance(value, str) and not isinstance(value, BigIntLiteral):
            if len(value) > MAX_EXTRA_PARAMS_CHARS:
                raise ValueError(f"extra_params is {len(value):,} characters long (at most {MAX_EXTRA_PARAMS_CHARS})")
            if not value.strip():
                return None
            try:
                value = loads_limited(value, "extra_params")
            except BadRequest as exc:
                reason = str(exc).replace("malformed JSON in extra_params", "extra_params is not valid JSON")
                raise ValueError(reason) from None
        if value in (None, {}):
            return None
        if not isinstance(value, dict):
            raise ValueError(f"extra_params must be an object, got {_kind(value)}")
        return value

    @property
    def xml(self) -> str | None:
        return self.schema_xml or self.label_config


class PredictRequest(_Body):
    """``POST /predict``: {tasks, project, label_config, params}. Tasks are checked one by one later."""

    project: int
    tasks: list[Any] = Field(default_factory=list)
    label_config: str | None = None

    @field_validator("project", mode="before")
    @classmethod
    def _project(cls, value: Any) -> int:
        return project_id(value)

    @field_validator("tasks", mode="before")
    @classmethod
    def _tasks(cls, value: Any) -> list:
        if value is None:
            return []
        if not isinstance(value, list):
            raise ValueError(f"'tasks' must be a list, got {_kind(value)}")
        if len(value) > MAX_TASKS:
            raise ValueError(
                f"'tasks' has {len(value):,} tasks, at most {MAX_TASKS:,} per request (a protection: select fewer "
                "tasks in Label Studio's Data Manager)"
            )
        return value

    @field_validator("label_config", mode="before")
    @classmethod
    def _label_config(cls, value: Any) -> str | None:
        return _optional_text(value, "'label_config'", MAX_LABEL_CONFIG_CHARS)


# Where a Label Studio webhook may carry ids that ml_backend.queue reads (project, then annotation/task).
_WEBHOOK_ID_PATHS = (
    (("project",), "project"),
    (("project", "id"), "project"),
    (("annotation", "project"), "project"),
    (("task", "project"), "project"),
    (("annotation", "id"), "annotation"),
    (("annotation", "task"), "task"),
    (("task", "id"), "task"),
)


class WebhookRequest(_Body):
    """A Label Studio webhook: {action, project: {id, ...}, annotation, task, ...}; every id present is bounded."""

    action: str | None = None

    @field_validator("action", mode="before")
    @classmethod
    def _action(cls, value: Any) -> str | None:
        return _optional_text(value, "'action'", MAX_NAME_CHARS)

    @classmethod
    def check_ids(cls, body: dict) -> None:
        """ValueError unless every id the queue could read is absent/null or in 1..MAX_ID."""
        for path, what in _WEBHOOK_ID_PATHS:
            holder: Any = body
            for part in path[:-1]:
                holder = holder.get(part) if isinstance(holder, dict) else None
            if not isinstance(holder, dict):
                continue
            value = holder.get(path[-1])
            if value is None or (path == ("project",) and isinstance(value, dict)):
                continue
            name = ".".join(path)
            if what == "project" and isinstance(value, str) and not isinstance(value, BigIntLiteral):
                project_id(value)  # '<id>.<timestamp>' is accepted here too
                continue
            bounded_id(value, f"{name!r}")


def validate(model: type[BaseModel], body: dict) -> Any:
    """``model`` of ``body``; BadRequest with a readable reason."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise BadRequest(describe_validation_error(exc)) from None
