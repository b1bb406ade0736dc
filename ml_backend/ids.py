"""Label Studio's ids (projects, tasks) read from what callers send: ONE bound (``MAX_ID``), ONE parser.

Ids are Label Studio's database keys: integers in 1..2**31-1. Anything else cannot name a project or a task, and an
id names folders (``MODEL_DIR/projects/<id>``) and Redis keys, so it is refused before it reaches either.

* ``parse_id(value, what)``: an int, an integer-valued float or a string of ASCII digits, in 1..MAX_ID; ``ValueError``
  saying why not. Booleans, None, ``BigIntLiteral`` (a JSON integer too long to convert), other types, signs other
  than a leading ``-``, and strings longer than ``MAX_INT_DIGITS`` are refused without converting them.
* ``parse_project_ref(value)``: the project of Label Studio's ``"<id>.<timestamp>"`` (``/setup`` and ``/predict``
  send it) or a bare id, at most ``MAX_PROJECT_REF_CHARS`` characters, then ``parse_id``.
* ``is_id(value)``: whether a value already is an id (an ``int``, not a ``bool``, in 1..MAX_ID): no conversion.
* ``project_arg(text)``: ``parse_id`` as an argparse ``type=`` for ``--project`` (a usage error saying why not).

Messages name the value (shortened) or its JSON kind, never more than 40 characters of it.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = [
    "MAX_ID",
    "MAX_INT_DIGITS",
    "MAX_PROJECT_REF_CHARS",
    "BigIntLiteral",
    "is_id",
    "json_kind",
    "parse_id",
    "parse_project_ref",
    "project_arg",
    "shown",
]

MAX_ID = 2**31 - 1  # Label Studio's ids are 32-bit database keys
MAX_INT_DIGITS = 32  # longer integer literals are never converted (JSON bodies keep them as BigIntLiteral)
MAX_PROJECT_REF_CHARS = 64  # "<id>.<timestamp>"


class BigIntLiteral(str):
    """An integer literal too long to convert (kept as its digits); never a valid id."""


def json_kind(value: Any) -> str:
    """The JSON kind of ``value`` for a message (``object``, ``array``, ``string``, ...)."""
    if isinstance(value, BigIntLiteral):
        return f"an integer of {len(value)} digits"
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), type(value).__name__
    )


def shown(value: Any) -> str:
    """``repr(value)``, cut to 40 characters."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _ascii_digits(text: str) -> bool:
    """Only 0-9: ``str.isdigit`` (and ``int``) also take other scripts' digits ("١٢" is 12), which no id is."""
    return text.isascii() and text.isdigit()


def parse_id(value: Any, what: str = "id") -> int:
    """``value`` as an id in 1..MAX_ID (int, integer-valued float or digit string); ValueError saying why not."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{what} must be an integer in 1..{MAX_ID}, got {json_kind(value)}")
    if isinstance(value, float) and value.is_integer() and abs(value) <= MAX_ID + 1:
        value = int(value)
    if isinstance(value, str) and not isinstance(value, BigIntLiteral):
        text = value.strip()
        if len(text) > MAX_INT_DIGITS or not _ascii_digits(text.lstrip("-")):
            raise ValueError(f"{what} must be an integer in 1..{MAX_ID}, got {shown(value)}")
        value = int(text)
    if isinstance(value, BigIntLiteral):
        raise ValueError(f"{what} is out of range 1..{MAX_ID} (an integer of {len(value)} digits)")
    if not isinstance(value, int):
        raise ValueError(f"{what} must be an integer in 1..{MAX_ID}, got {json_kind(value)}")
    if not 1 <= value <= MAX_ID:
        raise ValueError(f"{what} {shown(value)} is out of range 1..{MAX_ID}")
    return value


def parse_project_ref(value: Any) -> int:
    """The project id of Label Studio's ``"<id>.<timestamp>"`` (or a bare id); ValueError with a reason."""
    if value is None or value == "":
        raise ValueError("missing 'project' (Label Studio sends '<project id>.<timestamp>')")
    if isinstance(value, str) and not isinstance(value, BigIntLiteral):
        if len(value) > MAX_PROJECT_REF_CHARS:
            raise ValueError(f"'project' is {len(value):,} characters long (at most {MAX_PROJECT_REF_CHARS})")
        head = value.split(".", 1)[0].strip()
        if not _ascii_digits(head.lstrip("-")):
            raise ValueError(
                f"'project' {shown(value)} does not start with a project id (expected '<project id>.<timestamp>')"
            )
        value = head
    elif isinstance(value, bool) or not isinstance(value, (int, float, BigIntLiteral)):
        raise ValueError(f"'project' must be a string like '3.1700000000', got {json_kind(value)}")
    return parse_id(value, "'project' id")


def is_id(value: Any) -> bool:
    """Whether ``value`` already is an id: an ``int`` (not a ``bool``) in 1..MAX_ID. Nothing is converted."""
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= MAX_ID


def project_arg(text: str) -> int:
    """argparse ``type=`` of ``--project``: ``parse_id``; anything else is a usage error saying why."""
    try:
        return parse_id(text, "--project")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
