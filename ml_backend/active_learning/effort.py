"""Label efficiency where it happens (issue 17.6): how much an annotator changed the pre-annotation served.

Why: the point of pre-annotating with the U-Net is that correcting a mask costs less than painting it. The learning
curve shows the model getting better; this shows whether the annotators' work gets smaller. Both the product (each
submitted annotation against the prediction it was made from) and the benchmark (the oracle's mask against the
model's prediction of the tiles it picked) measure it with ``edit_effort``, so their numbers compare.

The measure, on two label maps of one tile (class index per pixel; ``IGNORE`` = unpainted in sparse configs, a
label of its own here: painting background is work too):

* ``changed_pixels``: pixels whose label differs (``changed_fraction`` = over the tile's pixels);
* ``boundary_edited``: the outline the annotator traced to make the change, i.e. the boundary of every patch painted
  over the pre-annotation, split by the annotation's labels (the map "annotation label where changed, else
  untouched"), in unit pixel edges between 4-neighbours, edges on the image frame not counted;
* ``boundary_scratch``: the boundary of the annotation itself, the outline of painting the tile from scratch
  (for two labels it equals ``training.metrics.boundary_length``, the benchmark's effort proxy);
* ``effort_saved`` = 1 - edited / scratch: 1 = accepted as served, 0 = as much as painting from scratch, negative =
  correcting cost more than painting would have (e.g. every outline moved by a pixel).

Identical maps give 0 and 0; an empty pre-annotation gives exactly the from-scratch figures. The comparison is pixel
exact on purpose: Label Studio copies the served regions into the annotation bit for bit, so whatever the annotator
left alone compares equal, and only what they repainted counts.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["EditEffort", "edit_effort", "effort_by_version", "label_boundary"]

_UNTOUCHED = np.iinfo(np.int64).min  # a label no class map uses (IGNORE is -1)


def label_boundary(labels: np.ndarray) -> float:
    """Unit edges between 4-neighbours with different labels, edges on the image frame excluded."""
    m = np.asarray(labels)
    if m.ndim != 2:
        raise ValueError(f"label_boundary expects a 2-D label map, got shape {m.shape}")
    return float(np.count_nonzero(m[1:, :] != m[:-1, :]) + np.count_nonzero(m[:, 1:] != m[:, :-1]))


@dataclass(frozen=True)
class EditEffort:
    """What turning the served pre-annotation into the submitted annotation took, on one tile."""

    pixels: int
    changed_pixels: int
    boundary_edited: float
    boundary_scratch: float

    @property
    def changed_fraction(self) -> float:
        return self.changed_pixels / self.pixels if self.pixels else 0.0

    @property
    def effort_saved(self) -> float | None:
        """1 - edited / scratch; None when the annotation has no outline to paint (nothing to save on)."""
        return None if self.boundary_scratch <= 0 else 1.0 - self.boundary_edited / self.boundary_scratch

    def as_dict(self) -> dict[str, Any]:
        return {
            "pixels": int(self.pixels),
            "changed_pixels": int(self.changed_pixels),
            "changed_fraction": float(self.changed_fraction),
            "boundary_edited": float(self.boundary_edited),
            "boundary_scratch": float(self.boundary_scratch),
            "effort_saved": self.effort_saved,
        }


def edit_effort(served: np.ndarray, annotated: np.ndarray) -> EditEffort:
    """The effort of turning ``served`` into ``annotated`` (two (H, W) label maps of one tile; see the module)."""
    p, a = np.asarray(served), np.asarray(annotated)
    if p.ndim != 2 or p.shape != a.shape:
        raise ValueError(f"served and annotated must be (H, W) maps of one size, got {p.shape} and {a.shape}")
    changed = p != a
    edited = np.where(changed, a.astype(np.int64, copy=False), _UNTOUCHED)
    return EditEffort(int(a.size), int(np.count_nonzero(changed)), label_boundary(edited), label_boundary(a))


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def effort_by_version(records: Iterable[Mapping], order: Iterable[str] = ()) -> list[dict]:
    """Effort per tile per model version that served the pre-annotation (the status page's curve and JSON).

    ``records``: one per annotation (``store.effort.EffortLog.latest``). Measured tiles count in their version's
    means unless they were audit tiles (served without a mask on purpose: counted apart); skipped ones are counted
    with their version when known. Versions follow ``order`` (the registry's), then the order they first served in.
    """
    groups: dict[str, dict[str, Any]] = {}
    for rec in records:
        if not isinstance(rec, Mapping):
            continue
        version = str(rec.get("model_version") or "(none)")
        g = groups.setdefault(version, {"first": "~", "m": [], "audit": 0, "skipped": 0})  # "~" sorts after dates
        if rec.get("created_at"):
            g["first"] = min(g["first"], str(rec["created_at"]))
        if rec.get("skipped"):
            g["skipped"] += 1
        elif rec.get("audit"):
            g["audit"] += 1
        elif _finite(rec.get("changed_fraction")) is not None and _finite(rec.get("boundary_edited")) is not None:
            g["m"].append(rec)
    rank = {v: i for i, v in enumerate(order)}
    out = []
    for version, g in sorted(groups.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[1]["first"], kv[0])):
        m = g["m"]
        edited = [float(r["boundary_edited"]) for r in m]
        scratch = [float(_finite(r.get("boundary_scratch")) or 0.0) for r in m]
        out.append({
            "version": version,
            "tiles": len(m),
            "audit_tiles": g["audit"],
            "skipped": g["skipped"],
            "changed_fraction_mean": _mean([float(r["changed_fraction"]) for r in m]),
            "boundary_edited_mean": _mean(edited),
            "boundary_scratch_mean": _mean(scratch),
            # ratio of sums: tiles without an outline (empty annotations) add nothing to either side
            "effort_saved": (1.0 - sum(edited) / sum(scratch)) if sum(scratch) > 0 else None,
        })  # fmt: skip
    return out


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        return None
    return float(value)
