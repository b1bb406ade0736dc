"""Per-project state of the backend under ``MODEL_DIR/projects/<id>/``: label config and acquisition strategy.

One backend serves several Label Studio projects, each with its own label config (dense or sparse, its own label
names), strategy and models (``ml_backend.registry``). ``/setup`` writes the state; ``/predict`` and the RQ jobs read
it. Files (the RQ jobs read the same names):

    label_config.xml   the XML Label Studio sent last (``schema`` of /setup or ``label_config`` of /predict)
    state.json         {"strategy", "strategy_params", "mode", "from_name", "to_name", "labels", "updated_at"}

Writes are atomic (temporary file + ``os.replace``) so a reader never sees half a file.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ml_backend.atomic import write_atomic
from ml_backend.labelstudio.labelconfig import BrushConfig, parse_label_config

__all__ = ["ProjectError", "ProjectStore", "parse_project_id", "strategy_from_params"]

LABEL_CONFIG_FILE = "label_config.xml"
STATE_FILE = "state.json"


class ProjectError(ValueError):
    """Bad project reference or project state (the request is at fault)."""


def parse_project_id(value: Any) -> str:
    """Project id from Label Studio's ``"<id>.<timestamp>"`` (or a bare id), in 1..2**31-1; ProjectError otherwise.

    Bounded here because the id names a folder (``MODEL_DIR/projects/<id>``) and Redis keys: an id that cannot exist
    in Label Studio must never create either.
    """
    from .schemas import project_id

    try:
        return str(project_id(value))
    except ValueError as exc:
        raise ProjectError(str(exc)) from None


def strategy_from_params(extra_params: Any, default_name: str, default_aggregation: str) -> tuple[str, dict[str, Any]]:
    """(strategy name, params) from /setup's ``extra_params`` ({"strategy": ..., "aggregation": ..., ...}).

    Label Studio sends ``extra_params`` as an object or as a JSON string (what the user typed); ``None`` falls back
    to the defaults. The shape is checked by ``schemas.ExtraParams`` (wrong types are a ProjectError, never a
    TypeError), the name and params by instantiating the strategy.
    """
    from pydantic import ValidationError

    from ml_backend.strategies import get_strategy

    from .schemas import BadRequest, ExtraParams, SetupRequest, describe_validation_error

    try:
        if not isinstance(extra_params, ExtraParams):
            checked = SetupRequest.model_validate({"project": 1, "extra_params": extra_params}).extra_params
            extra_params = checked
    except ValidationError as exc:
        raise ProjectError(describe_validation_error(exc)) from None
    except BadRequest as exc:
        raise ProjectError(str(exc)) from None
    params: dict[str, Any] = {}
    name = default_name
    if extra_params is not None:
        params = dict(extra_params.strategy_params)
        name = extra_params.strategy or default_name
        if extra_params.aggregation is not None:
            params["aggregation"] = extra_params.aggregation
    params.setdefault("aggregation", default_aggregation)
    try:
        strategy = get_strategy(name, **params)
    except (ValueError, TypeError) as exc:  # TypeError: a parameter the strategy does not take
        raise ProjectError(f"extra_params: strategy {name!r} {params}: {exc}") from None
    return strategy.name, strategy.params()


class ProjectStore:
    """Read/write the per-project files under ``model_dir/projects/<id>``."""

    def __init__(self, model_dir: str | Path) -> None:
        self.root = Path(model_dir) / "projects"

    def path(self, project_id: str) -> Path:
        return self.root / str(project_id)

    def label_config_xml(self, project_id: str) -> str | None:
        try:
            return (self.path(project_id) / LABEL_CONFIG_FILE).read_text()
        except FileNotFoundError:
            return None

    def state(self, project_id: str) -> dict:
        try:
            return json.loads((self.path(project_id) / STATE_FILE).read_text())
        except FileNotFoundError:
            return {}
        except (OSError, json.JSONDecodeError) as exc:
            raise ProjectError(f"project {project_id}: unreadable {STATE_FILE}: {exc}") from exc

    def save(
        self,
        project_id: str,
        xml: str,
        config: BrushConfig,
        *,
        strategy: str | None = None,
        strategy_params: dict | None = None,
    ) -> dict:
        """Store the label config (when it changed) and the state; keeps the stored strategy when none is given."""
        folder = self.path(project_id)
        if self.label_config_xml(project_id) != xml:
            write_atomic(folder / LABEL_CONFIG_FILE, xml)
        state = self.state(project_id)
        new = dict(state)
        if strategy is not None:
            new["strategy"] = strategy
            new["strategy_params"] = strategy_params or {}
        new.update(mode=config.mode, from_name=config.from_name, to_name=config.to_name, labels=list(config.labels))
        if new != state:
            new["updated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            write_atomic(folder / STATE_FILE, json.dumps(new, indent=1, sort_keys=True))
        return new

    def config(self, project_id: str, xml: str | None = None) -> tuple[BrushConfig, str]:
        """(parsed config, XML): the given XML (stored when new) or the stored one; ProjectError when neither."""
        if xml:
            config = parse_label_config(xml)
            if self.label_config_xml(project_id) != xml:
                self.save(project_id, xml, config)
            return config, xml
        stored = self.label_config_xml(project_id)
        if not stored:
            raise ProjectError(
                f"project {project_id} has no label config: send 'label_config' or connect the backend (/setup) first"
            )
        return parse_label_config(stored), stored
