"""Prediction hygiene: after a version's predictions are delivered, delete older versions' predictions.

Every retraining adds a prediction to every unlabelled task; without this, after ten rounds a task carries eleven and
the Data Manager serialises all of them on every page. ``KEEP_PREDICTION_VERSIONS`` says how many versions keep their
predictions: 1 (default) only the live one, 2 also the previous one, 0 keeps everything.

Safety rules:

* runs only after the new version's predictions are in and the project's ``model_version`` names it (the sink calls
  it last), so a crash before or during it leaves every task with at least the predictions it had;
* a prediction is deleted only from a task that now holds a prediction of the live version, or that is labelled
  (its annotation no longer needs a pre-annotation; Label Studio sets ``parent_prediction`` to null);
* bounded calls: a version whose every prediction sits on such a task, and whose count in Label Studio matches the
  task listing (nothing arrived since), goes in ONE call (``DELETE /api/projects/{id}/model-versions/``); otherwise its
  deletable predictions are deleted one by one, at most ``max_calls`` per round (the rest wait for the next round).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

MAX_SINGLE_DELETES = 500


@dataclass
class PruneReport:
    """What one pruning did: versions kept, versions deleted in bulk, single deletions, predictions left."""

    kept: list[str] = field(default_factory=list)
    bulk: dict[str, int] = field(default_factory=dict)
    single: int = 0
    left: int = 0
    calls: int = 0

    @property
    def deleted(self) -> int:
        return sum(self.bulk.values()) + self.single


def kept_versions(live: str, versions_latest_first: Iterable[str], keep: int) -> list[str]:
    """The live version and the ``keep - 1`` most recent others (``keep=0``: all of them)."""
    ordered = [str(v) for v in versions_latest_first]
    if keep <= 0:
        return [live] + [v for v in ordered if v != live]
    return [live] + [v for v in ordered if v != live][: keep - 1]


def _labelled(task: dict) -> bool:
    anns = task.get("annotations")
    if isinstance(anns, list):
        return any(isinstance(a, dict) and not a.get("was_cancelled") for a in anns)
    return bool(task.get("total_annotations") or task.get("is_labeled"))


def prune_predictions(
    ls: Any,
    project_id: int,
    live: str,
    tasks: dict[int, dict],
    covered: Iterable[int],
    *,
    keep: int = 1,
    max_calls: int = MAX_SINGLE_DELETES,
) -> PruneReport:
    """Delete the predictions of versions older than the ``keep`` most recent ones (the live one always kept).

    ``tasks``: the project's tasks with their predictions as listed before the delivery (``fields="all"``);
    ``covered``: the tasks that now hold a prediction of ``live``.
    """
    from ml_backend.labelstudio.client import delete_prediction, delete_version_predictions, model_version_counts

    report = PruneReport()
    if keep <= 0:
        return report
    counts = model_version_counts(ls, project_id)
    report.calls += 1
    report.kept = kept_versions(live, counts, keep)
    old = [v for v, n in counts.items() if v not in report.kept and n > 0]
    if not old:
        return report
    safe = {int(t) for t in covered} | {int(tid) for tid, task in tasks.items() if _labelled(task)}
    listed: dict[str, list[tuple[int, int]]] = {v: [] for v in old}
    for tid, task in tasks.items():
        for p in task.get("predictions") or []:
            if isinstance(p, dict) and str(p.get("model_version")) in listed and p.get("id") is not None:
                listed[str(p.get("model_version"))].append((int(tid), int(p["id"])))
    budget = max(0, int(max_calls))
    for version in old:
        preds = listed[version]
        if len(preds) == counts[version] and all(tid in safe for tid, _ in preds):
            report.bulk[version] = delete_version_predictions(ls, project_id, version)
            report.calls += 1
            continue
        deletable = [pid for tid, pid in preds if tid in safe]
        now, later = deletable[:budget], deletable[budget:]
        for prediction_id in now:
            report.single += int(delete_prediction(ls, prediction_id))
        report.calls += len(now)
        budget -= len(now)
        report.left += counts[version] - len(now)
        if later or len(preds) != counts[version] or len(deletable) < len(preds):
            log.info(
                "project %s: %s keeps %d prediction(s) (on tasks without a %s prediction, listed after the job "
                "started, or beyond this round's %d single deletions)",
                project_id, version, counts[version] - len(now), live, max_calls,
            )  # fmt: skip
    log.info(
        "project %s: prediction hygiene kept %s; deleted %d prediction(s) (%d in bulk over %d version(s), %d one by "
        "one) in %d call(s); %d left",
        project_id, report.kept, report.deleted, sum(report.bulk.values()), len(report.bulk), report.single,
        report.calls, report.left,
    )  # fmt: skip
    return report
