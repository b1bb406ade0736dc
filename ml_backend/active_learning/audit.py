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
* **The gate**: every new version and the live one are measured on the same annotated audit tiles, pixel counts
  of BOTH classes per tile (``Confusion``). Only tiles on which the two versions' counts differ can tell them apart
  ("informative"); over those tiles, pooled, the new version is held back when its foreground IoU (where foreground
  was annotated) or its background IoU is more than PROMOTION_TOLERANCE below the live version's. Why both classes:
  audit tiles re-annotated as empty gave foreground IoU 0.000 to both versions and a poisoned version was promoted
  (issue 16); their background still shows a version that paints foreground where there is none.
* **Undecided**: when no audit tile tells the versions apart (e.g. all annotated empty and both predict nothing),
  the gate has no evidence, which is not a pass: the new version is stored but held back ("undecided, held back"),
  the live one keeps serving until an annotated audit tile tells them apart (one queue place in
  ``audit_every``); ``ml-backend rollback --version`` promotes it by hand. Fewer than AUDIT_MIN_TILES annotated audit
  tiles: promoted, with the reason "not enough audit tiles" (the gate is not active yet). A version that is not
  promoted is stored, the live version keeps serving (and its queue stays); the reason and the evidence (measures
  of both versions, informative tiles, ``decision``) are written into the version's metadata (``meta["promotion"]``,
  ``meta["audit"]``, which the status page reads) and into the job's status.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ml_backend.active_learning.round import Evaluation, LabelledTile
from ml_backend.config import torch_device
from ml_backend.inference.tiling import predict_tiled
from ml_backend.strategies import cold_start_scores
from ml_backend.training.metrics import IGNORE, confusion_counts, dice_from_counts, iou_from_counts

log = logging.getLogger(__name__)

_AUDIT_KEY = 0xA0D17  # mixed into SEED: the audit hash is independent of the cold-start queue hash


def audit_every(fraction: float) -> int:
    """Queue places per audit place (0: no audit)."""
    return 0 if fraction <= 0 else max(1, int(round(1.0 / fraction)))


def audit_task_ids(task_ids: Sequence[int], fraction: float, seed: int = 0) -> list[int]:
    """The audit tasks among ``task_ids`` (deterministic in (seed, task id)), in their serving order (hash order)."""
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


@dataclass(frozen=True)
class Confusion:
    """Pixel counts of one audit tile (or of pooled tiles) for BOTH classes over its known pixels.

    Why both: a tile annotated as empty has no foreground, so foreground IoU is 0 (or 0/0) for every version and
    cannot rank them (issue 16: five tiles re-annotated as empty made the gate compare 0.000 with 0.000); its
    background pixels still can (false positives)."""

    tp: int = 0
    fp: int = 0
    fn: int = 0
    tn: int = 0

    @classmethod
    def of(cls, pred: np.ndarray, target: np.ndarray, ignore: int | None = IGNORE) -> Confusion:
        """Counts of a predicted class map against an annotated mask (class > 0 = foreground, ``ignore`` skipped)."""
        tp, fp, fn = confusion_counts(pred, target, ignore)
        target = np.asarray(target)
        known = int(target.size if ignore is None else np.count_nonzero(target != ignore))
        return cls(tp, fp, fn, known - tp - fp - fn)

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn)

    @property
    def pixels(self) -> int:
        return self.tp + self.fp + self.fn + self.tn

    @property
    def foreground(self) -> int:
        """Annotated foreground pixels (the same for every version measured on the tile)."""
        return self.tp + self.fn

    @property
    def background(self) -> int:
        """Annotated background pixels."""
        return self.tn + self.fp


def pooled(counts: Iterable[Confusion]) -> Confusion:
    """The counts of several tiles summed (one global score, far less noisy than a mean of per-tile scores)."""
    total = Confusion()
    for c in counts:
        total = total + c
    return total


def class_measures(c: Confusion) -> dict[str, float | None]:
    """The audit measures of (pooled) counts; None where the annotation makes a measure meaningless.

    ``fg_iou``: foreground IoU, None without annotated foreground (0 for anyone predicting anything there, 0/0 for
    a version predicting nothing: it cannot tell versions apart). ``bg_iou``: background IoU, None without annotated
    background. ``miou``: mean of the defined class IoUs. ``error``: wrong pixels / known pixels. ``bg_fp_rate``:
    background pixels predicted as foreground / annotated background (None without background).
    """
    fg = c.tp / (c.tp + c.fp + c.fn) if c.foreground else None
    bg = c.tn / (c.tn + c.fp + c.fn) if c.background else None
    defined = [v for v in (fg, bg) if v is not None]
    return {
        "fg_iou": fg,
        "bg_iou": bg,
        "miou": sum(defined) / len(defined) if defined else None,
        "error": (c.fp + c.fn) / c.pixels if c.pixels else None,
        "bg_fp_rate": c.fp / c.background if c.background else None,
    }


GATE_MEASURES = ("fg_iou", "bg_iou")  # the candidate may be worse on neither (by more than the tolerance)
_NAMES = {"fg_iou": "foreground IoU", "bg_iou": "background IoU"}


@dataclass
class Verdict:
    """The gate's comparison of the new version with the live one on the same audit tiles.

    ``decision``: "promote", "hold" (worse on a gate measure) or "undecided" (no tile tells them apart).
    ``informative``: indices of the tiles on which the two versions' counts differ; the measures are pooled over
    those tiles only (a tile scored identically adds the same counts to both and only dilutes the difference).
    """

    decision: str
    tiles: int
    informative: list[int]
    new: dict[str, float | None] = field(default_factory=dict)
    live: dict[str, float | None] = field(default_factory=dict)
    worse_on: list[str] = field(default_factory=list)

    def evidence(self) -> dict[str, Any]:
        """JSON-ready: what the version's metadata and the job status record."""
        return {
            "decision": self.decision,
            "informative_tiles": len(self.informative),
            "gate_measures": {k: {"new": _r(self.new.get(k)), "live": _r(self.live.get(k))} for k in self.new},
            "worse_on": list(self.worse_on),
        }


def compare(new: Sequence[Confusion], live: Sequence[Confusion], tolerance: float) -> Verdict:
    """The gate rule: hold the new version back when it is worse than the live one by more than ``tolerance`` on
    any informative gate measure (foreground IoU where foreground was annotated, background IoU), pooled over the
    tiles that tell the two apart; "undecided" when no tile does."""
    informative = [i for i, (a, b) in enumerate(zip(new, live, strict=True)) if a != b]
    if not informative:
        return Verdict("undecided", len(new), [])
    m_new = class_measures(pooled(new[i] for i in informative))
    m_live = class_measures(pooled(live[i] for i in informative))
    worse = [
        k for k in GATE_MEASURES
        if m_new[k] is not None and m_live[k] is not None and m_new[k] < m_live[k] - tolerance
    ]  # fmt: skip
    return Verdict("hold" if worse else "promote", len(new), informative, m_new, m_live, worse)


def _r(x: float | None) -> float | None:
    return None if x is None else round(float(x), 6)


def tile_confusions(model: Any, tiles: Sequence[LabelledTile], settings: Any) -> list[Confusion]:
    """``model``'s counts on each audit tile (tiled inference, as served)."""
    device = torch_device(settings.device)
    out = []
    for t in tiles:
        probs = predict_tiled(
            model, t.image, tile=settings.tile_size, overlap=settings.tile_overlap,
            batch_size=settings.inference_batch, device=device,
        )  # fmt: skip
        out.append(Confusion.of(np.argmax(probs, axis=0), t.mask))
    return out


def summarise(counts: Sequence[Confusion]) -> dict[str, Any]:
    """{"iou", "dice", "tiles", "pixels", "miou", "bg_iou", "error", "empty_tiles"} over all audit tiles.

    ``iou``/``dice`` stay foreground IoU/Dice (0/0 = 1), the learning curve's figures; the others are informative
    when tiles hold no foreground; ``empty_tiles``: tiles annotated without foreground."""
    total = pooled(counts)
    m = class_measures(total)
    return {
        "iou": round(iou_from_counts(total.tp, total.fp, total.fn), 6),
        "dice": round(dice_from_counts(total.tp, total.fp, total.fn), 6),
        "tiles": len(counts),
        "pixels": total.pixels,
        "miou": _r(m["miou"]),
        "bg_iou": _r(m["bg_iou"]),
        "error": _r(m["error"]),
        "empty_tiles": sum(1 for c in counts if c.foreground == 0),
    }


def audit_metrics(model: Any, tiles: Sequence[LabelledTile], settings: Any) -> dict[str, Any]:
    """``summarise`` of ``model`` on the audit tiles."""
    return summarise(tile_confusions(model, tiles, settings))


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
        new_counts = tile_confusions(trained.model, self.tiles, self.settings) if n else []
        audit: dict[str, Any] = summarise(new_counts)
        if n < self.min_tiles:
            return self._result(True, f"promoted: not enough audit tiles ({n} annotated, {self.min_tiles} needed)",
                                audit)  # fmt: skip
        current = self.live()
        if current is None:
            return self._result(True, "promoted: first version (no live version to compare with)", audit)
        live_model, lv = current
        try:
            live_counts = tile_confusions(live_model, self.tiles, self.settings)
        except Exception as exc:  # a live model that cannot predict these tiles cannot veto the new one
            log.warning("audit: live version %s could not be measured (%s)", lv, exc)
            return self._result(True, f"promoted: live version {lv} could not be measured ({exc})", audit)
        live = summarise(live_counts)
        audit.update(live_version=lv, live_iou=live["iou"], live_dice=live["dice"], live_miou=live["miou"],
                     live_bg_iou=live["bg_iou"], live_error=live["error"])  # fmt: skip
        verdict = compare(new_counts, live_counts, self.tolerance)
        audit.update(verdict.evidence())
        k, empty = len(verdict.informative), audit["empty_tiles"]
        if verdict.decision == "undecided":
            both_blank = sum(1 for a, b in zip(new_counts, live_counts, strict=True)
                             if a.foreground == 0 and a.fp == 0 and b.fp == 0)  # fmt: skip
            reason = (f"undecided, held back: none of the {n} audit tiles tells the new version from the live "
                      f"version {lv} (they score the same on every one; {both_blank} annotated without foreground "
                      f"and predicted empty by both); {lv} keeps serving until an annotated audit tile tells them "
                      "apart")  # fmt: skip
            return self._result(False, reason, audit)
        measures = ", ".join(
            f"{_NAMES[m]} {verdict.new[m]:.3f} vs {verdict.live[m]:.3f}" for m in GATE_MEASURES
            if verdict.new.get(m) is not None
        )  # fmt: skip
        where = f"on the {k} of {n} audit tiles that tell the versions apart ({empty} annotated without foreground)"
        if verdict.decision == "hold":
            worse = " and ".join(_NAMES[m] for m in verdict.worse_on)
            reason = (f"not promoted: {where}, its {worse} is below the live version {lv}'s by more than the "
                      f"tolerance {self.tolerance:g} ({measures}, new vs live); {lv} keeps serving")  # fmt: skip
            return self._result(False, reason, audit)
        reason = f"promoted: {where}, {measures} (new vs live {lv}; tolerance {self.tolerance:g})"
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
