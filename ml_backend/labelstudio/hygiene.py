"""Prediction hygiene: after a version's predictions are delivered, delete older versions' predictions, by id.

Every retraining adds a prediction to every unlabelled task; without this, after ten rounds a task carries eleven and
the Data Manager serialises all of them on every page. ``KEEP_PREDICTION_VERSIONS`` says how many versions keep their
predictions: 1 (default) only the live one, 2 also the previous one, 0 keeps everything.

Safety rules (issue 16: deleting a whole version in one call took the only prediction of a task added after the
job's listing, which the new version had not reached):

* runs only after the new version's predictions are in and the project's ``model_version`` names it (the sink calls
  it last), so a crash before or during it leaves every task with at least the predictions it had;
* a prediction is deleted only when its task already holds a newer one: a prediction of the version just published
  (pushed by this round, or listed on the task before it). Tasks the round did not reach, tasks created after the
  job's listing and labelled tasks keep what they have (a labelled task keeps its last prediction: one per task);
* always by prediction id (``DELETE /api/predictions/{id}/``), never by version alone: only ids read from the job's
  own listing are deleted, so a prediction created after it is never touched, whatever the per-version counts say.

Cost: Label Studio 1.23.2 has no endpoint that deletes a list of prediction ids (``DELETE
/api/projects/{id}/model-versions/`` deletes a whole version; the Data Manager action ``delete_tasks_predictions``
every prediction of the selected tasks, the new one included), so the ids go in batches of ``workers`` concurrent
single deletions, at most ``max_deletes`` per round (HYGIENE_DELETE_WORKERS, HYGIENE_MAX_DELETES; the rest are found
again by the next round's listing). The listing itself is the job's own (paged, ``client.list_tasks``): pruning adds
one ``GET model-versions`` call.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ml_backend.config import get_settings
from ml_backend.labelstudio.client import delete_prediction, model_version_counts

log = logging.getLogger(__name__)


@dataclass
class PruneReport:
    """What one pruning did: versions kept, predictions deleted (per version), predictions left, API calls."""

    kept: list[str] = field(default_factory=list)
    deleted_by_version: dict[str, int] = field(default_factory=dict)
    left: int = 0  # predictions of old versions still in the project (not deletable yet, or over the budget)
    deferred: int = 0  # deletable ones left for the next round (over ``max_deletes``)
    calls: int = 0

    @property
    def deleted(self) -> int:
        return sum(self.deleted_by_version.values())


def kept_versions(live: str, versions_latest_first: Iterable[str], keep: int) -> list[str]:
    """The live version and the ``keep - 1`` most recent others (``keep=0``: all of them)."""
    ordered = [str(v) for v in versions_latest_first]
    if keep <= 0:
        return [live] + [v for v in ordered if v != live]
    return [live] + [v for v in ordered if v != live][: keep - 1]


def deletable_predictions(
    tasks: dict[int, dict], live: str, old: Iterable[str], covered: Iterable[int]
) -> list[tuple[int, int, str]]:
    """``(task id, prediction id, version)`` of the listed predictions of ``old`` versions whose task holds a
    prediction of ``live`` (``covered``: pushed by this round; or listed), in task order."""
    old = {str(v) for v in old}
    newer = {int(t) for t in covered}
    out = []
    for tid in sorted(int(t) for t in tasks):
        preds = [p for p in tasks[tid].get("predictions") or [] if isinstance(p, dict)]
        if tid not in newer and not any(str(p.get("model_version")) == live for p in preds):
            continue
        out += [(tid, int(p["id"]), str(p.get("model_version"))) for p in preds
                if str(p.get("model_version")) in old and p.get("id") is not None]  # fmt: skip
    return out


def prune_predictions(
    ls: Any,
    project_id: int,
    live: str,
    tasks: dict[int, dict],
    covered: Iterable[int],
    *,
    keep: int = 1,
    max_deletes: int | None = None,
    workers: int | None = None,
) -> PruneReport:
    """Delete, by id, the predictions of versions older than the ``keep`` most recent ones (the live one always
    kept) on tasks that hold a prediction of ``live``.

    ``tasks``: the project's tasks with their predictions as listed before the delivery (``fields="all"``);
    ``covered``: the tasks that now hold a prediction of ``live`` (this round's push). ``max_deletes`` /
    ``workers``: None reads HYGIENE_MAX_DELETES / HYGIENE_DELETE_WORKERS.
    """
    report = PruneReport()
    if keep <= 0:
        return report
    if max_deletes is None or workers is None:
        settings = get_settings()
        max_deletes = settings.hygiene_max_deletes if max_deletes is None else max_deletes
        workers = settings.hygiene_delete_workers if workers is None else workers
    counts = model_version_counts(ls, project_id)
    report.calls += 1
    report.kept = kept_versions(live, counts, keep)
    old = [v for v, n in counts.items() if v not in report.kept and n > 0]
    if not old:
        return report
    doomed = deletable_predictions(tasks, live, old, covered)
    now = doomed[: max(0, int(max_deletes))]
    report.deferred = len(doomed) - len(now)
    with ThreadPoolExecutor(max_workers=max(1, int(workers)), thread_name_prefix="hygiene") as pool:
        gone = list(pool.map(lambda d: delete_prediction(ls, d[1]), now))  # raises the first failure
    report.calls += len(now)
    for (_, _, version), ok in zip(now, gone, strict=True):
        report.deleted_by_version[version] = report.deleted_by_version.get(version, 0) + int(ok)
    report.left = sum(counts[v] for v in old) - report.deleted
    log.info(
        "project %s: prediction hygiene kept %s; deleted %d prediction(s) of %s by id in %d call(s); %d of old "
        "versions left (on tasks without a %s prediction, created after the listing, labelled, or %d over this "
        "round's %d deletions)",
        project_id, report.kept, report.deleted, sorted(report.deleted_by_version), report.calls, report.left, live,
        report.deferred, max_deletes,
    )  # fmt: skip
    return report
