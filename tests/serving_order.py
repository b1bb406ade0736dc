"""The order in which Label Studio serves a project's unlabelled tasks, read back from its tasks (integration tests)."""

from __future__ import annotations


def serving_order(tasks: dict[int, dict], version: str, *, sample: bool = False) -> list[int]:
    """Unlabelled tasks (no annotation that is not cancelled) by ascending score of ``version``'s prediction, lowest
    first: Label Studio's serving order. Every one of them must hold exactly one prediction of ``version``; with
    ``sample`` (a round that scored a candidate sample), at most one, and the tasks without one are left out (Label
    Studio serves them only after the others)."""
    scored = []
    for tid, t in tasks.items():
        if any(not a.get("was_cancelled") for a in t.get("annotations") or []):
            continue
        preds = [p for p in t.get("predictions") or [] if p.get("model_version") == version]
        assert len(preds) == 1 or (sample and not preds), f"task {tid}: {len(preds)} predictions of {version}"
        scored.extend((p["score"], tid) for p in preds)
    return [tid for _, tid in sorted(scored)]
