"""A project as the training job reads it from Label Studio: its label config (else the one /setup stored), and
"this project does not exist" as an error no retry can fix; the label config /setup and /predict stored
(``stored_label_config``: ``store/projects.py`` keeps the XML, this module parses it)."""

from __future__ import annotations

import logging
from typing import Any

from ml_backend.active_learning.project import ProjectNotFound
from ml_backend.active_learning.round import TrainingError
from ml_backend.config import Settings
from ml_backend.labelstudio.client import LabelStudioError, call
from ml_backend.labelstudio.labelconfig import BrushConfig, parse_label_config
from ml_backend.store.projects import ProjectError, ProjectStore

log = logging.getLogger(__name__)

__all__ = ["ProjectNotFound", "project_label_config", "stored_label_config"]


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status behind a Label Studio error (the SDK's ApiError is its cause)."""
    for err in (exc, exc.__cause__):
        status = getattr(err, "status_code", None)
        if isinstance(status, int):
            return status
    return None


def project_label_config(ls: Any, project_id: int, settings: Settings) -> tuple[Any, str]:
    """(BrushConfig, XML): the project's label config from Label Studio, else the one /setup stored."""
    xml = None
    try:
        project = call(ls, ls.projects.get, id=int(project_id), what=f"reading project {project_id}")
        xml = getattr(project, "label_config", None)
    except LabelStudioError as exc:  # e.g. no permission on the project: fall back to the stored /setup config
        if _http_status(exc) == 404:
            raise ProjectNotFound(f"project {project_id} does not exist in Label Studio (HTTP 404): {exc}") from exc
        log.warning("project %s: cannot read the label config from Label Studio: %s", project_id, exc)
    if not xml:
        xml = ProjectStore(settings.model_dir).label_config_xml(str(project_id))  # written by /setup
    if not xml:
        raise TrainingError(f"project {project_id}: no label config (neither in Label Studio nor stored by /setup)")
    return parse_label_config(xml), xml


def stored_label_config(store: ProjectStore, project_id: str, xml: str | None = None) -> tuple[BrushConfig, str]:
    """(parsed config, XML): the given XML (stored when new) or the stored one; ProjectError when neither."""
    if xml:
        config = parse_label_config(xml)
        if store.label_config_xml(project_id) != xml:
            store.save(project_id, xml, config)
        return config, xml
    stored = store.label_config_xml(project_id)
    if not stored:
        raise ProjectError(
            f"project {project_id} has no label config: send 'label_config' or connect the backend (/setup) first"
        )
    return parse_label_config(stored), stored
