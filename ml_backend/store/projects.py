"""Per-project state of the backend under ``MODEL_DIR/projects/<id>/``: label config and acquisition strategy.

One backend serves several Label Studio projects, each with its own label config (dense or sparse, its own label
names), strategy and models (``ml_backend.store.registry``). ``/setup`` writes the state; ``/predict`` and the RQ
jobs read it through ``ProjectStore``. Files:

    label_config.xml   the XML Label Studio sent last (``schema`` of /setup or ``label_config`` of /predict)
    state.json         {"strategy", "strategy_params", "mode", "from_name", "to_name", "labels", "updated_at"}

Writes are atomic (temporary file + ``os.replace``) so a reader never sees half a file.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ml_backend.store.atomic import write_atomic

LABEL_CONFIG_FILE = "label_config.xml"
STATE_FILE = "state.json"


class ProjectError(ValueError):
    """Bad project reference or project state (the request is at fault)."""


class ProjectStore:
    """Read/write the per-project files under ``model_dir/projects/<id>``."""

    def __init__(self, model_dir: str | Path) -> None:
        self.root = Path(model_dir) / "projects"

    def path(self, project_id: str) -> Path:
        return self.root / str(project_id)

    def label_config_xml(self, project_id: str) -> str | None:
        """The stored label config; ProjectError (one project's problem, never a crash) when it is damaged."""
        path = self.path(project_id) / LABEL_CONFIG_FILE
        try:
            return path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8"
            raise ProjectError(
                f"project {project_id}: unreadable {LABEL_CONFIG_FILE} ({reason}): connect the backend again (/setup)"
            ) from None

    def state(self, project_id: str) -> dict:
        try:
            state = json.loads((self.path(project_id) / STATE_FILE).read_bytes().decode("utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ProjectError(f"project {project_id}: unreadable {STATE_FILE}: {exc}") from exc
        if not isinstance(state, dict):
            raise ProjectError(f"project {project_id}: unreadable {STATE_FILE}: not a JSON object")
        return state

    def save(
        self,
        project_id: str,
        xml: str,
        config: Any,
        *,
        strategy: str | None = None,
        strategy_params: dict | None = None,
    ) -> dict:
        """Store the label config (when it changed) and the state; keeps the stored strategy when none is given.
        ``config``: the parsed ``xml`` (``labelstudio.labelconfig.BrushConfig``: mode, from_name, to_name, labels)."""
        folder = self.path(project_id)
        try:
            stored_xml, state = self.label_config_xml(project_id), self.state(project_id)
        except ProjectError:  # damaged files: this save is the repair, so it replaces them
            stored_xml, state = None, {}
        if stored_xml != xml:
            write_atomic(folder / LABEL_CONFIG_FILE, xml)
        new = dict(state)
        if strategy is not None:
            new["strategy"] = strategy
            new["strategy_params"] = strategy_params or {}
        new.update(mode=config.mode, from_name=config.from_name, to_name=config.to_name, labels=list(config.labels))
        if new != state:
            new["updated_at"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
            # allow_nan=False: never write NaN/Infinity, which are not JSON (other readers refuse the file)
            write_atomic(folder / STATE_FILE, json.dumps(new, indent=1, sort_keys=True, allow_nan=False))
        return new
