"""The audit split and the promotion gate: an honest quality estimate, and no harmful updates (issue 11).

Why: the validation split of a round is drawn from the tiles selection picked, so it is biased exactly when
selection goes wrong (issue 11: entropy's first batch lowered test IoU from 0.67 to 0.49 while validation read
0.84). A quality estimate must come from tiles selection did NOT choose: a fixed uniform random sample of the
project's tasks.

* **Which tasks**: a task is an audit task iff ``splitmix64(seed', task id) / 2**64 < AUDIT_FRACTION`` (the cold
  start's hash, with its own key): deterministic, independent of the model and of the order of import, and stable
  when tasks are added.
* **Served at a documented rate**: the queue puts one unlabelled audit task at every ``round(1 / AUDIT_FRACTION)``-th
  place (``plan.interleave_audit``), so about AUDIT_FRACTION of the annotations are audit annotations, from the
  first queue on. Audit tasks get no pre-annotation (an empty result): an annotator correcting the model's own
  mask would anchor the estimate on the model.
* **Kept out of training**: the job trains on the non-audit annotations only.
* **The gate**: every new version and the live one are measured on the same annotated audit tiles (foreground IoU
  and Dice over all their pixels, ``training.metrics``); the new version is promoted unless its audit IoU is more
  than PROMOTION_TOLERANCE below the live version's. Fewer than AUDIT_MIN_TILES annotated audit tiles: promoted,
  with the reason "not enough audit tiles". A version that is not promoted is stored, the live version keeps
  serving (and its queue stays); the reason is written into the version's metadata (``meta["promotion"]``,
  ``meta["audit"]``, which the status page reads) and into the job's status.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ml_backend.active_learning.round import Evaluation, LabelledTile

log = logging.getLogger(__name__)

_AUDIT_KEY = 0xA0D17  # mixed into SEED: the audit hash is independent of the cold-start queue hash


def audit_every(fraction: float) -> int:
    """Queue places per audit place (0: no audit)."""
    return 0 if fraction <= 0 else max(1, int(round(1.0 / fraction)))


def audit_task_ids(task_ids: Sequence[int], fraction: float, seed: int = 0) -> list[int]:
    """The audit tasks among ``task_ids`` (deterministic in (seed, task id)), in their serving order (hash order)."""
    from ml_backend.strategies import cold_start_scores

    ids = [int(t) for t in task_ids]
    if fraction <= 0 or not ids:
        return []
    u = cold_start_scores(ids, seed=int(seed) ^ _AUDIT_KEY)
    chosen = [(float(u[i]), tid) for i, tid in enumerate(ids) if u[i] < fraction]
    return [tid for _, tid in sorted(chosen)]


def split_audit(tiles: Sequence[LabelledTile], audit: set[int]) -> tuple[list[LabelledTile], list[LabelledTile]]:
    """(training tiles, audit tiles) of a labelled set."""
    train = [t for t in tiles if int(t.task_id) not in audit]
    held = [t for t in tiles if int(t.task_id) in audit]
    return train, held


def audit_metrics(model: Any, tiles: Sequence[LabelledTile], settings: Any) -> dict[str, float]:
    """{"iou", "dice", "tiles", "pixels"}: foreground IoU/Dice of ``model`` over all pixels of the audit tiles
    (counts summed over tiles: one global score, far less noisy than a mean of per-tile scores)."""
    from ml_backend.config import torch_device
    from ml_backend.inference.tiling import predict_tiled
    from ml_backend.training.metrics import confusion_counts, dice_from_counts, iou_from_counts

    device = torch_device(settings.device)
    tp = fp = fn = 0
    pixels = 0
    for t in tiles:
        probs = predict_tiled(
            model, t.image, tile=settings.tile_size, overlap=settings.tile_overlap,
            batch_size=settings.inference_batch, device=device,
        )  # fmt: skip
        a, b, c = confusion_counts(np.argmax(probs, axis=0), t.mask)
        tp, fp, fn = tp + a, fp + b, fn + c
        pixels += int(t.mask.size)
    return {
        "iou": round(iou_from_counts(tp, fp, fn), 6),
        "dice": round(dice_from_counts(tp, fp, fn), 6),
        "tiles": len(tiles),
        "pixels": pixels,
    }


@dataclass
class AuditGate:
    """The round's evaluator (``run_round(evaluate=...)``): the new version against the live one on the audit tiles.

    ``live()`` returns (live model, its version) or None when nothing serves yet.
    """

    tiles: list[LabelledTile]
    live: Callable[[], tuple[Any, str] | None]
    settings: Any
    min_tiles: int = 4
    tolerance: float = 0.02

    def __call__(self, trained: Any) -> Evaluation:
        n = len(self.tiles)
        audit = audit_metrics(trained.model, self.tiles, self.settings) if n else {"tiles": 0}
        if n < self.min_tiles:
            return self._result(True, f"promoted: not enough audit tiles ({n} annotated, {self.min_tiles} needed)",
                                audit)  # fmt: skip
        current = self.live()
        if current is None:
            return self._result(True, "promoted: first version (no live version to compare with)", audit)
        live_model, live_version = current
        try:
            live = audit_metrics(live_model, self.tiles, self.settings)
        except Exception as exc:  # a live model that cannot predict these tiles cannot veto the new one
            log.warning("audit: live version %s could not be measured (%s)", live_version, exc)
            return self._result(True, f"promoted: live version {live_version} could not be measured ({exc})", audit)
        audit["live_version"], audit["live_iou"], audit["live_dice"] = live_version, live["iou"], live["dice"]
        if audit["iou"] < live["iou"] - self.tolerance:
            reason = (f"not promoted: audit IoU {audit['iou']:.3f} is below the live version {live_version}'s "
                      f"{live['iou']:.3f} by more than the tolerance {self.tolerance:g} ({n} audit tiles); "
                      f"{live_version} keeps serving")  # fmt: skip
            return self._result(False, reason, audit)
        reason = (f"promoted: audit IoU {audit['iou']:.3f} vs live {live_version} {live['iou']:.3f} "
                  f"(tolerance {self.tolerance:g}, {n} audit tiles)")  # fmt: skip
        return self._result(True, reason, audit)

    @staticmethod
    def _result(promote: bool, reason: str, audit: dict) -> Evaluation:
        log.info("audit gate: %s", reason)
        return Evaluation(
            metrics={"audit": audit},
            promote=promote,
            reason=reason,
            meta={"audit": audit, "promotion": {"promoted": promote, "reason": reason}},
        )
