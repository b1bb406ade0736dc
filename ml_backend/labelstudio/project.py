"""A project as the training job reads it from Label Studio: its label config (else the one /setup stored), and
"this project does not exist" as an error no retry can fix."""

from __future__ import annotations

import logging
from typing import Any

from ml_backend.active_learning.project import ProjectNotFound
from ml_backend.active_learning.round import TrainingError
from ml_backend.config import Settings

log = logging.getLogger(__name__)

__all__ = ["ProjectNotFound", "project_label_config"]


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status behind a Label Studio error (the SDK's ApiError is its cause)."""
    for err in (exc, exc.__cause__):
        status = getattr(err, "status_code", None)
        if isinstance(status, int):
            return status
    return None


def project_label_config(ls: Any, project_id: int, settings: Settings) -> tuple[Any, str]:
    """(BrushConfig, XML): the project's label config from Label Studio, else the one /setup stored."""
    from ml_backend.labelstudio.client import LabelStudioError, call
    from ml_backend.labelstudio.labelconfig import parse_label_config

    xml = None
    try:
        project = call(ls, ls.projects.get, id=int(project_id), what=f"reading project {project_id}")
        xml = getattr(project, "label_config", None)
    except LabelStudioError as exc:  # e.g. no permission on the project: fall back to the stored /setup config
        if _http_status(exc) == 404:
            raise ProjectNotFound(f"project {project_id} does not exist in Label Studio (HTTP 404): {exc}") from exc
        log.warning("project %s: cannot read the label config from Label Studio: %s", project_id, exc)
    if not xml:
        from ml_backend.store.projects import ProjectStore

        xml = ProjectStore(settings.model_dir).label_config_xml(str(project_id))  # written by /setup
    if not xml:
        raise TrainingError(f"project {project_id}: no label config (neither in Label Studio nor stored by /setup)")
    return parse_label_config(xml), xml
