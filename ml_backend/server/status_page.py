"""The backend's status page: server-rendered HTML (no web framework, no JavaScript) from a plain dict.

Why: without a shell nobody on the team can tell whether training runs, which model version is live, or whether
the labels pay off (issue 12). The page shows per project the live version, a running job's progress (step, loss,
validation IoU, ETA), the queue (labelled / unlabelled tasks, tasks holding a prediction of the live version,
annotations waiting for the next training), the learning curve across versions as inline SVG (IoU and Dice), whether
the last trained version was promoted or held back and why, recent per-task errors, and every stored version with
the command that rolls back to it.

Everything that comes from outside (project titles, version ids, error messages, task data) is HTML-escaped; the
page has no script and no external resource, so it can be served behind the backend's auth as is.

Input: ``render_status_page({"title": ..., "generated_at": ..., "projects": [project, ...]})`` where a project is::

    {"id": 3, "title": "...", "label_studio_url": "http://ls/projects/3",      # all keys optional except "id"
     "live_version": "v0004-...",
     "job": {"phase": "train", "step": 120, "steps": 400, "loss": 0.31, "val_iou": 0.61, "seconds": 40.0,
             "eta_s": 93.0, "version": None}          # or the RQ job meta {"phase", "progress": {...}}; None = idle
     "queue": {"labelled": 12, "unlabelled": 488, "with_live_prediction": 480, "total": 500,
               "pending_annotations": 3, "threshold": 5, "queued": [...], "failed": [...]},
     "versions": [registry meta, ...],                 # ModelRegistry.versions(): version, created, n_annotations,
                                                       # metrics {val_iou, val_dice}, parent, ...
     "promotion": {"version": "v0005-...", "promoted": False, "reason": "val IoU 0.58 < live 0.61"},
     "effort": [{"version": "v0004-...", "tiles": 12, "changed_fraction_mean": 0.04, "boundary_edited_mean": 31.0,
                 "boundary_scratch_mean": 120.0, "effort_saved": 0.74, "audit_tiles": 1, "skipped": 0}, ...],
                                                       # active_learning.effort.effort_by_version (issue 17.6)
     "prediction_age": {"live": "v0004-...", "pool": 98000, "scored": 2000, "candidate_pool": 2000,
                        "ages": {"0": 2000, "1": 1980, "never": 94020}},   # active_learning.candidates (issue 20.2)
     "errors": [{"task": 17, "reason": "...", "time": "..."}],
     "problems": ["project 3: CURRENT ... is not text ..."]}   # what is broken on disk (rendered first, in red)

and the status may carry ``"warnings"`` (backend-wide, e.g. an image cache that cannot be written), shown at the top.
A project whose files are damaged (unreadable ``CURRENT``, a missing version) still gets its section, with a note
saying what is wrong; it never takes the page down for the other projects (issue 16).

``collect_project_status`` builds such a dict from a ``ModelRegistry`` and ``queue.queue_state`` output.
"""

from __future__ import annotations

import html
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ml_backend.active_learning.candidates import PredictionAgeLog
from ml_backend.active_learning.effort import effort_by_version
from ml_backend.store.effort import EffortLog

if TYPE_CHECKING:  # the page renders without numpy; the counts' caller hands a ProjectData
    from ml_backend.active_learning.project import ProjectData

__all__ = [
    "ROLLBACK_CLI",
    "collect_project_status",
    "curve_metrics",
    "effort_curve_svg",
    "label_studio_counts",
    "learning_curve_svg",
    "render_not_found",
    "render_status_page",
    "rollback_cli",
]

ROLLBACK_CLI = "python -m ml_backend.cli"  # rollback_cli() prefers the installed console script


def rollback_cli() -> str:
    """``ml-backend`` when the console script is installed (on PATH or beside this interpreter, i.e. in its virtual
    environment), else the module form that always works."""
    import shutil
    import sys
    from pathlib import Path

    installed = shutil.which("ml-backend") or (Path(sys.executable).parent / "ml-backend").is_file()
    return "ml-backend" if installed else ROLLBACK_CLI


MAX_ERRORS = 20

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#1d1d1f;background:#fafafa}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:0 0 8px}h3{font-size:14px;margin:14px 0 6px}
.meta{color:#666;font-size:12px}.project{background:#fff;border:1px solid #ddd;border-radius:8px;padding:16px;
margin:16px 0}table{border-collapse:collapse;font-size:13px}td,th{padding:3px 10px 3px 0;text-align:left;
vertical-align:top}th{color:#555;font-weight:600}.num{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#0a7d32}.warn{color:#b25b00}.err{color:#b00020}code{background:#f0f0f0;padding:1px 4px;border-radius:3px;
font-size:12px}.bar{display:inline-block;width:200px;height:10px;background:#eee;border-radius:5px;vertical-align:middle}
.bar span{display:block;height:10px;background:#3d7bff;border-radius:5px}.live{font-weight:700}
.grid{display:flex;flex-wrap:wrap;gap:24px}
"""


def _e(value: Any) -> str:
    """HTML-escaped text of any value (None -> '-')."""
    return "-" if value is None else html.escape(str(value), quote=True)


def _num(value: Any, digits: int = 3) -> str:
    """A finite number formatted, anything else escaped (a hostile 'metric' string stays text)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _e(value)
    if not math.isfinite(float(value)):
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        return None
    return float(value)


def _duration(seconds: Any) -> str:
    s = _finite(seconds)
    if s is None or s < 0:
        return "-"
    s = int(round(s))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {(s % 3600) // 60:02d} min"


def _metric(meta: Mapping, name: str) -> float | None:
    metrics = meta.get("metrics")
    return _finite(metrics.get(name)) if isinstance(metrics, Mapping) else None


# --------------------------------------------------------------------------------------------------- chart frame
@dataclass(frozen=True)
class _ChartFrame:
    """The frame both inline-SVG charts share: a 240 px high plot area, y = 0..1 (clamped), n points spread over x.

    ``open`` gives the opening lines (svg header, plot rectangle, horizontal ticks at 0, .25, .5, .75, 1 with
    their labels, the message shown when there is nothing to plot); ``y_of`` and ``x_of`` map values and point
    indices to pixels.
    """

    width: int
    right: int
    n: int
    height: int = 240
    left: int = 44
    top: int = 14
    bottom: int = 46

    @property
    def plot_w(self) -> int:
        return self.width - self.left - self.right

    @property
    def plot_h(self) -> int:
        return self.height - self.top - self.bottom

    def y_of(self, value: float) -> float:
        return self.top + self.plot_h * (1.0 - min(1.0, max(0.0, value)))

    def x_of(self, i: int) -> float:
        return self.left + (self.plot_w / 2 if self.n <= 1 else self.plot_w * i / (self.n - 1))

    def open(
        self, css_class: str, aria_label: str, empty: str, right_tick: Callable[[float], str] | None = None
    ) -> list[str]:
        """The opening lines; ``right_tick(tick)``, when given, labels each tick on the right axis too."""
        width, height, left, top = self.width, self.height, self.left, self.top
        plot_w, plot_h = self.plot_w, self.plot_h
        out = [
            f'<svg xmlns="http://www.w3.org/2000/svg" class="{css_class}" width="{width}" height="{height}" '
            f'viewBox="0 0 {width} {height}" role="img" aria-label="{aria_label}">',
            f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#ccc"/>',
        ]
        for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
            y = self.y_of(tick)
            out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>')
            out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="10" text-anchor="end">{tick:.2f}</text>')
            if right_tick is not None:
                out.append(f'<text x="{left + plot_w + 6}" y="{y + 4:.1f}" font-size="10">{right_tick(tick)}</text>')
        if self.n == 0:
            out.append(
                f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" font-size="13" text-anchor="middle" '
                f'fill="#888">{empty}</text>'
            )
        return out


# --------------------------------------------------------------------------------------------------- learning curve
def learning_curve_svg(versions: Sequence[Mapping], live_version: str | None = None, *, width: int = 560) -> str:
    """Inline SVG: validation IoU and Dice per version (x = version order), one marker per version and metric.

    Markers carry a <title> (version, annotations, value) so hovering shows the numbers; the live version's markers
    are ringed. A version without a metric gets no marker for it (the line skips it).
    """
    metas = [v for v in versions if isinstance(v, Mapping)]
    frame = _ChartFrame(width=width, right=16, n=len(metas))
    height, left, top, plot_h, y_of, x_of = frame.height, frame.left, frame.top, frame.plot_h, frame.y_of, frame.x_of
    out = frame.open("learning-curve", "learning curve: validation IoU and Dice per version", "no trained version yet")
    series = (("val_iou", "IoU", "#3d7bff", "pt-iou"), ("val_dice", "Dice", "#e8590c", "pt-dice"))
    for key, label, colour, css in series:
        points = [
            (x_of(i), y_of(value), i, value) for i, m in enumerate(metas) if (value := _metric(m, key)) is not None
        ]
        if len(points) > 1:
            coords = " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in points)
            out.append(
                f'<polyline class="line-{css[3:]}" points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>'
            )
        for x, y, i, value in points:
            meta = metas[i]
            live = meta.get("version") == live_version and live_version is not None
            tip = f"{meta.get('version')}: {label} {value:.3f}, {meta.get('n_annotations', '?')} annotations"
            ring = ' stroke="#000" stroke-width="2"' if live else ""
            out.append(
                f'<circle class="{css}" cx="{x:.1f}" cy="{y:.1f}" r="{5 if live else 3.5}" fill="{colour}"{ring}>'
                f"<title>{_e(tip)}</title></circle>"
            )
    for i, meta in enumerate(metas):  # x labels: version number and annotations used
        version = str(meta.get("version", ""))
        short = version.split("-")[0] or f"#{i + 1}"
        n_ann = meta.get("n_annotations")
        out.append(
            f'<text x="{x_of(i):.1f}" y="{top + plot_h + 14}" font-size="10" text-anchor="middle">{_e(short)}</text>'
        )
        if n_ann is not None:
            out.append(
                f'<text x="{x_of(i):.1f}" y="{top + plot_h + 26}" font-size="9" fill="#666" '
                f'text-anchor="middle">{_e(n_ann)} ann.</text>'
            )
    legend_y = height - 6
    out.append(f'<rect x="{left}" y="{legend_y - 8}" width="10" height="3" fill="#3d7bff"/>')
    out.append(f'<text x="{left + 14}" y="{legend_y}" font-size="11">IoU</text>')
    out.append(f'<rect x="{left + 110}" y="{legend_y - 8}" width="10" height="3" fill="#e8590c"/>')
    out.append(f'<text x="{left + 124}" y="{legend_y}" font-size="11">Dice</text>')
    out.append(f'<text x="{left + 230}" y="{legend_y}" font-size="11" fill="#666">ringed = live version</text>')
    out.append("</svg>")
    return "".join(out)


# --------------------------------------------------------------------------------------------------- effort curve
def effort_curve_svg(rows: Sequence[Mapping], live_version: str | None = None, *, width: int = 560) -> str:
    """Inline SVG: effort per tile across the versions that served pre-annotations (issue 17.6).

    Left axis: mean fraction of pixels the annotators changed (blue). Right axis, pixels: mean outline edited per
    tile (orange) against the outline of painting the tile from scratch (grey, dashed). x = serving version, with
    the number of measured tiles; markers carry a <title> with the numbers; the live version's are ringed.
    """
    rows = [r for r in rows if isinstance(r, Mapping) and (r.get("tiles") or 0) > 0]
    frame = _ChartFrame(width=width, right=52, n=len(rows))
    height, left, top, plot_h, y_of, x_of = frame.height, frame.left, frame.top, frame.plot_h, frame.y_of, frame.x_of
    peak = max([_finite(r.get(k)) or 0.0 for r in rows for k in ("boundary_edited_mean", "boundary_scratch_mean")]
               + [1.0])  # fmt: skip
    scale = 10 ** math.floor(math.log10(peak))
    peak = math.ceil(peak / scale) * scale  # a round number on top of the right axis
    out = frame.open(
        "effort-curve",
        "annotation effort per tile by serving version",
        "no annotation measured against a pre-annotation yet",
        right_tick=lambda tick: _num(round(tick * peak, 1), 1),
    )
    series = (
        ("changed_fraction_mean", 1.0, "pixels changed", "#3d7bff", "pt-changed", ""),
        ("boundary_edited_mean", peak, "outline edited (px)", "#e8590c", "pt-edited", ""),
        ("boundary_scratch_mean", peak, "outline from scratch (px)", "#888", "pt-scratch", ' stroke-dasharray="4 3"'),
    )
    for key, full, label, colour, css, dash in series:
        points = [(x_of(i), y_of(v / full), i, v) for i, r in enumerate(rows) if (v := _finite(r.get(key))) is not None]
        if len(points) > 1:
            coords = " ".join(f"{x:.1f},{y:.1f}" for x, y, _, _ in points)
            out.append(f'<polyline class="line-{css[3:]}" points="{coords}" fill="none" stroke="{colour}" '
                       f'stroke-width="2"{dash}/>')  # fmt: skip
        for x, y, i, value in points:
            row = rows[i]
            live = live_version is not None and row.get("version") == live_version
            tip = f"{row.get('version')}: {label} {value:.3f} per tile, {row.get('tiles')} tiles"
            ring = ' stroke="#000" stroke-width="2"' if live else ""
            out.append(f'<circle class="{css}" cx="{x:.1f}" cy="{y:.1f}" r="{5 if live else 3.5}" fill="{colour}"'
                       f"{ring}><title>{_e(tip)}</title></circle>")  # fmt: skip
    for i, row in enumerate(rows):
        short = str(row.get("version", "")).split("-")[0] or f"#{i + 1}"
        out.append(f'<text x="{x_of(i):.1f}" y="{top + plot_h + 14}" font-size="10" '
                   f'text-anchor="middle">{_e(short)}</text>')  # fmt: skip
        out.append(f'<text x="{x_of(i):.1f}" y="{top + plot_h + 26}" font-size="9" fill="#666" '
                   f'text-anchor="middle">{_e(row.get("tiles"))} tiles</text>')  # fmt: skip
    legend_y, x = height - 6, left
    for _key, _full, label, colour, _css, _dash in series:
        out.append(f'<rect x="{x}" y="{legend_y - 8}" width="10" height="3" fill="{colour}"/>')
        out.append(f'<text x="{x + 14}" y="{legend_y}" font-size="11">{_e(label)}</text>')
        x += 160
    out.append("</svg>")
    return "".join(out)


def _effort_section(effort: Any, live: str | None) -> str:
    """The effort curve and its table (served version, tiles, means, effort saved, audit and skipped counts)."""
    rows = [r for r in effort if isinstance(r, Mapping)] if isinstance(effort, (list, tuple)) else []
    if not rows:
        return '<p class="meta">No submitted annotation measured against the pre-annotation it was made from yet.</p>'
    body = []
    for r in rows:
        saved = _finite(r.get("effort_saved"))
        body.append(
            f"<tr><td>{_e(r.get('version'))}</td><td class='num'>{_num(r.get('tiles'))}</td>"
            f"<td class='num'>{_num(r.get('changed_fraction_mean'))}</td>"
            f"<td class='num'>{_num(r.get('boundary_edited_mean'), 1)}</td>"
            f"<td class='num'>{_num(r.get('boundary_scratch_mean'), 1)}</td>"
            f"<td class='num'>{'-' if saved is None else f'{saved:.0%}'}</td>"
            f"<td class='num'>{_num(r.get('audit_tiles'))}</td><td class='num'>{_num(r.get('skipped'))}</td></tr>"
        )
    heads = ("served by", "tiles", "pixels changed", "outline edited (px)", "from scratch (px)", "effort saved",
             "audit tiles", "not measurable")  # fmt: skip
    head = "".join(f"<th>{h}</th>" for h in heads)
    caption = (
        "Per tile, what annotators changed in the pre-annotation they were served, by the version that served it: "
        "fraction of pixels changed and outline edited, against the outline of painting the tile from scratch "
        "(effort saved = 1 - edited / from scratch). Audit tiles are served without a mask (not in the means)."
    )
    return (
        f"{effort_curve_svg(rows, live)}<p class='meta effort-caption'>{_e(caption)}</p>"
        f'<table class="effort"><tr>{head}</tr>{"".join(body)}</table>'
    )


# --------------------------------------------------------------------------------------------------- sections
def _age_section(age: Any) -> str:
    """How old each unlabelled tile's prediction is after the last delivery (issue 20.2: each training scores a
    CANDIDATE_POOL sample; the other tiles keep their last prediction and queue after the sample)."""
    ages = age.get("ages") if isinstance(age, Mapping) else None
    if not isinstance(ages, Mapping) or not ages:
        return '<p class="meta">No delivery recorded yet.</p>'
    counts = {str(k): int(v) for k, v in ages.items() if isinstance(v, int) and not isinstance(v, bool)}
    backs = sorted(int(k) for k in counts if k.isdigit())
    labels = [(str(b), "live version" if b == 0 else f"{b} version{'s' if b > 1 else ''} back") for b in backs]
    labels += [("older", "an older version"), ("cold-start", "cold-start order only (no mask)"),
               ("never", "never predicted")]  # fmt: skip
    total = max(1, sum(counts.values()))
    rows = []
    for key, label in labels:
        if key not in counts:
            continue
        n = counts[key]
        bar = f'<span class="bar"><span style="width:{100 * n / total:.1f}%"></span></span>'
        rows.append(f'<tr class="age-{_e(key)}"><th>{_e(label)}</th><td class="num">{_num(n)}</td><td>{bar}</td></tr>')
    caption = (
        f"Unlabelled tiles by the age of their prediction after {_e(age.get('live'))} was delivered "
        f"({_e(age.get('time'))}): it scored {_num(age.get('scored'))} of {_num(age.get('pool'))} "
        f"(CANDIDATE_POOL {_num(age.get('candidate_pool'))}, 0 = all); the others keep their last prediction and "
        "Label Studio serves them after the scored ones."
    )
    return f'<table class="prediction-age">{"".join(rows)}</table><p class="meta age-caption">{caption}</p>'


def _job_section(job: Any) -> str:
    if not isinstance(job, Mapping) or not job:
        return '<p class="meta job-idle">No training job running.</p>'
    info = dict(job)
    if isinstance(job.get("progress"), Mapping):  # RQ job meta: {"phase", "progress": {...}}
        info = {**info, **job["progress"]}
    step, steps, seconds = _finite(info.get("step")), _finite(info.get("steps")), _finite(info.get("seconds"))
    eta = _finite(info.get("eta_s"))
    if eta is None and step and steps and seconds is not None and steps >= step:
        eta = seconds / step * (steps - step)
    fraction = (step / steps) if step is not None and steps else None
    bar = ""
    if fraction is not None:
        pct = max(0.0, min(1.0, fraction)) * 100
        bar = f' <span class="bar"><span style="width:{pct:.0f}%"></span></span> {pct:.0f}%'
    rows = [
        ("phase", _e(info.get("phase") or "running")),
        ("step", f"{_num(info.get('step'))} / {_num(info.get('steps'))} {_e(info.get('unit') or '')}{bar}"),
        ("loss", _num(info.get("loss"), 4)),
        ("validation IoU", _num(info.get("val_iou"))),
        ("elapsed", _duration(seconds)),
        ("ETA", _duration(eta)),
    ]
    phases = job.get("phases")  # the cold start's phases (issue 18): each has its own step and ETA above
    if isinstance(phases, Sequence) and not isinstance(phases, str):
        cells = [
            f"{_e(p.get('name'))} ({_e(p.get('state'))}"
            + (f", {_duration(p.get('seconds'))})" if _finite(p.get("seconds")) is not None else ")")
            for p in phases
            if isinstance(p, Mapping)
        ]
        rows.insert(1, ("phases", " &rarr; ".join(cells)))
    body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return f'<table class="job-running">{body}</table>'


def _queue_section(queue: Any) -> str:
    if not isinstance(queue, Mapping) or not queue:
        return '<p class="meta">Queue state unavailable.</p>'
    labelled, unlabelled = queue.get("labelled"), queue.get("unlabelled")
    rows = [
        ("labelled tasks", _num(labelled)),
        ("unlabelled tasks", _num(unlabelled)),
        ("tasks with a prediction of the live version", _num(queue.get("with_live_prediction"))),
        ("tasks in the project", _num(queue.get("total"))),
    ]
    if queue.get("pending_annotations") is not None:
        rows.append(
            (
                "new annotations since the last training",
                f"{_num(queue.get('pending_annotations'))} / {_num(queue.get('threshold'))} (training starts at the "
                "threshold)",
            )
        )
    for key, label in (("queued", "training jobs queued"), ("failed", "failed training jobs")):
        value = queue.get(key)
        if isinstance(value, (list, tuple)):
            rows.append((label, _num(len(value))))
    if queue.get("error"):
        rows.append(("queue error", f'<span class="err">{_e(queue.get("error"))}</span>'))
    body = "".join(f'<tr><th>{k}</th><td class="num">{v}</td></tr>' for k, v in rows)
    note = f'<p class="warn ls-note">{_e(queue.get("note"))}</p>' if queue.get("note") else ""
    return f'<table class="queue">{body}</table>{note}'


def _promotion_section(promotion: Any) -> str:
    if not isinstance(promotion, Mapping) or not promotion:
        return '<p class="meta">No training finished yet.</p>'
    version = _e(promotion.get("version"))
    reason = promotion.get("reason")
    if promotion.get("promoted"):
        text = f'<span class="ok">promoted</span>: {version} is live'
    elif promotion.get("decision") == "undecided":  # the audit tiles could not tell it from the live version
        text = f'<span class="warn">undecided</span>: {version} was held back'
    else:
        text = f'<span class="warn">held back</span>: {version} was not promoted'
    if reason:
        text += f" — {_e(reason)}"
    return f'<p class="promotion">Last trained version {text}.</p>'


def _errors_section(errors: Any) -> str:
    items = [e for e in errors if isinstance(e, Mapping)] if isinstance(errors, (list, tuple)) else []
    if not items:
        return '<p class="meta">No recent per-task errors.</p>'
    rows = "".join(
        f"<tr><td>{_e(e.get('time'))}</td><td class='num'>{_e(e.get('task'))}</td>"
        f"<td class='err'>{_e(e.get('reason') or e.get('error'))}</td></tr>"
        for e in items[-MAX_ERRORS:][::-1]
    )
    more = f'<p class="meta">{len(items) - MAX_ERRORS} older error(s) not shown.</p>' if len(items) > MAX_ERRORS else ""
    return f'<table class="errors"><tr><th>time</th><th>task</th><th>reason</th></tr>{rows}</table>{more}'


def _versions_section(project_id: Any, versions: Sequence[Mapping], live: str | None, cli: str) -> str:
    if not versions:
        return '<p class="meta">No stored version.</p>'
    rows = []
    for meta in reversed(versions):  # newest first
        version = meta.get("version")
        is_live = version == live and live is not None
        hint = (
            "live" if is_live else f"<code>{_e(cli)} rollback --project {_e(project_id)} --version {_e(version)}</code>"
        )
        row_class = ' class="live"' if is_live else ""
        iou, dice = _num(_metric(meta, "val_iou")), _num(_metric(meta, "val_dice"))
        rows.append(
            f"<tr{row_class}><td>{_e(version)}</td><td>{_e(meta.get('created'))}</td>"
            f"<td class='num'>{_num(meta.get('n_annotations'))}</td><td class='num'>{iou}</td>"
            f"<td class='num'>{dice}</td><td>{hint}</td></tr>"
        )
    head = "".join(f"<th>{h}</th>" for h in ("version", "created", "annotations", "val IoU", "val Dice", "rollback"))
    head = f"<tr>{head}</tr>"
    return f'<table class="versions">{head}{"".join(rows)}</table>'


def _export_section(project_id: Any, live: str | None, cli: str) -> str:
    """The command that segments the project's whole stacks with the live version (issue 21, ml_backend.export)."""
    if not live:
        return '<p class="meta">No live version to export with yet.</p>'
    cmd = f"{cli} export --project {project_id} --from-label-studio -o exports/project-{project_id}"
    return (
        f'<p class="export">Segment the imported stacks with {_e(live)} (annotations win over predictions) and '
        f"measure every 3-D object: <code>{_e(cmd)}</code></p>"
    )


def _curve_caption(versions: Sequence[Mapping]) -> str:
    sources = {str(v.get("curve_source") or "validation") for v in versions}
    if not versions:
        return ""
    if sources == {"audit"}:
        text = "IoU and Dice on audit tiles (tiles selection did not choose)"
    elif "audit" in sources:
        text = "IoU and Dice on audit tiles where the version recorded them, else on its validation tiles"
    else:
        text = "IoU and Dice on the validation split of the labelled tiles (chosen by selection: optimistic)"
    return f'<p class="meta curve-source">{_e(text)}</p>'


def _problems_section(problems: Any) -> str:
    """What is broken in a project's files, first in its section: the team lead sees it without a shell."""
    items = [p for p in problems if p] if isinstance(problems, (list, tuple)) else []
    if not items:
        return ""
    rows = "".join(f"<li>{_e(p)}</li>" for p in items)
    return f'<div class="err problems"><strong>Problem:</strong><ul>{rows}</ul></div>'


def _project_section(project: Mapping, cli: str) -> str:
    pid = project.get("id")
    title = project.get("title")
    live = project.get("live_version")
    live = str(live) if live is not None else None
    versions = [v for v in project.get("versions") or [] if isinstance(v, Mapping)]
    heading = f"Project {_e(pid)}" + (f" — {_e(title)}" if title else "")
    link = project.get("label_studio_url")
    link_html = ""
    if isinstance(link, str) and link.lower().startswith(("http://", "https://", "/")):
        link_html = f' <a class="meta" href="{_e(link)}">open in Label Studio</a>'
    live_html = f'<span class="live live-version">{_e(live)}</span>' if live else "none (not trained yet)"
    return (
        f'<section class="project" id="project-{_e(pid)}"><h2>{heading}{link_html}</h2>'
        f"{_problems_section(project.get('problems'))}"
        f"<p>Live version: {live_html}</p>"
        f'<div class="grid"><div><h3>Training job</h3>{_job_section(project.get("job"))}</div>'
        f"<div><h3>Queue</h3>{_queue_section(project.get('queue'))}</div></div>"
        f"<h3>Learning curve</h3>{learning_curve_svg(versions, live)}{_curve_caption(versions)}"
        f"<h3>Annotation effort</h3>{_effort_section(project.get('effort'), live)}"
        f"<h3>Prediction age</h3>{_age_section(project.get('prediction_age'))}"
        f"<h3>Last training</h3>{_promotion_section(project.get('promotion'))}"
        f"<h3>Recent errors</h3>{_errors_section(project.get('errors'))}"
        f"<h3>Versions</h3>{_versions_section(pid, versions, live, cli)}"
        f"<h3>Export</h3>{_export_section(pid, live, cli)}</section>"
    )


def _document(title: str, body: str, generated_at: Any = None, refresh_s: int | None = None) -> str:
    refresh = f'<meta http-equiv="refresh" content="{int(refresh_s)}">' if refresh_s else ""
    stamp = f'<p class="meta">Generated {_e(generated_at)}</p>' if generated_at else ""
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{refresh}<title>{_e(title)}</title><style>{_CSS}</style></head>"
        f"<body><h1>{_e(title)}</h1>{stamp}{body}</body></html>"
    )


def render_status_page(status: Mapping, *, cli: str = ROLLBACK_CLI, refresh_s: int | None = 15) -> str:
    """The whole page (one section per project); missing keys render as '-' or a short note, never fail.

    ``refresh_s`` adds a meta refresh so an open page follows a running job (None: no refresh).
    """
    if not isinstance(status, Mapping):
        raise TypeError(f"status must be a mapping, got {type(status).__name__}")
    projects = [p for p in status.get("projects") or [] if isinstance(p, Mapping)]
    title = str(status.get("title") or "ML backend status")
    body = "".join(_project_section(p, cli) for p in projects) or '<p class="meta">No project set up yet.</p>'
    warnings = status.get("warnings")
    if isinstance(warnings, (list, tuple)) and warnings:
        body = "".join(f'<p class="warn page-warning">{_e(w)}</p>' for w in warnings) + body
    return _document(title, body, status.get("generated_at"), refresh_s)


def render_not_found(project_id: Any, known: Iterable[Any] = ()) -> str:
    """Body of the 404 answer for an unknown project: says which projects exist."""
    known_ids = ", ".join(_e(k) for k in known) or "none"
    body = (
        f'<p class="err">No project {_e(project_id)} on this backend: it has no model version and no queue state.</p>'
        f"<p>Known projects: {known_ids}.</p>"
    )
    return _document("Unknown project", body, refresh_s=None)


# --------------------------------------------------------------------------------------------------- data
def _audit_pair(audit: Any) -> tuple[float | None, float | None]:
    """(IoU, Dice) of a version's audit record, whatever nesting issue 11 settles on; (None, None) without one."""
    if not isinstance(audit, Mapping):
        return None, None
    sources = [audit] + [audit[k] for k in ("metrics", "summary") if isinstance(audit.get(k), Mapping)]
    iou = dice = None
    for src in sources:
        for key in ("iou", "audit_iou", "val_iou", "mean_iou"):
            iou = iou if iou is not None else _finite(src.get(key))
        for key in ("dice", "audit_dice", "val_dice", "mean_dice"):
            dice = dice if dice is not None else _finite(src.get(key))
    return iou, dice


def curve_metrics(meta: Mapping) -> dict:
    """A version's metadata with the learning curve's IoU/Dice: the audit split's (``meta["audit"]``, or the round
    evaluator's ``meta["evaluation"]``: tiles selection did not choose) when recorded, else the validation metrics;
    ``curve_source`` says which."""
    out = dict(meta)
    metrics = dict(meta.get("metrics") or {}) if isinstance(meta.get("metrics"), Mapping) else {}
    iou, dice = _audit_pair(meta.get("audit"))
    if iou is None and isinstance(metrics.get("audit"), Mapping):
        iou, dice = _audit_pair(metrics.get("audit"))
    if iou is None:  # the round's Evaluator (active_learning.publisher writes its metrics as meta["evaluation"])
        iou, dice = _audit_pair(meta.get("evaluation"))
    if iou is not None:
        metrics["val_iou"], metrics["val_dice"] = iou, dice
        out["curve_source"] = "audit"
    else:
        out["curve_source"] = "validation"
    out["metrics"] = metrics
    return out


def collect_project_status(
    registry: Any,
    *,
    queue_state: Mapping | None = None,
    counts: Mapping | None = None,
    errors: Sequence[Mapping] | None = None,
    title: str | None = None,
    label_studio_url: str | None = None,
) -> dict:
    """A project dict for ``render_status_page`` from a ``ModelRegistry`` and ``queue.queue_state`` output.

    ``counts``: {"labelled", "unlabelled", "with_live_prediction", ...} from Label Studio (the caller asks it).
    The last trained version is "held back" when it is not the live one; the reason comes from its metadata
    (``meta["promotion"]["reason"]`` or ``meta["held_back_reason"]``) when the training job recorded one.
    Damaged files (``CURRENT`` unreadable or pointing at a missing version, unreadable versions) become
    ``problems``, never an exception: one broken project must not take the page down for the others.
    """
    problems: list[str] = []
    try:
        versions = [curve_metrics(v) for v in registry.versions()]
    except Exception as exc:  # e.g. an unreadable versions/ directory
        versions = []
        problems.append(f"stored versions cannot be listed: {type(exc).__name__}: {exc}")
    live_problem: str | None = None
    try:
        live = registry.current_version()
    except Exception as exc:  # RegistryError says what is wrong with CURRENT and how to fix it
        live = None
        live_problem = f"live version unknown: {exc}"
        problems.append(live_problem)
    queue: dict[str, Any] = dict(counts or {})
    job = None
    if queue_state:
        queue.update(
            pending_annotations=queue_state.get("pending_annotations"),
            threshold=queue_state.get("threshold"),
            queued=list(queue_state.get("queued") or []),
            failed=list(queue_state.get("failed") or []),
        )
        if queue_state.get("running"):
            job = dict(queue_state.get("running_progress") or {"phase": "starting"})
    try:  # issue 20.2: how old each unlabelled tile's prediction is (the training job's record)
        prediction_age = PredictionAgeLog(Path(registry.root).parents[1], registry.project_id).read()
    except Exception as exc:  # a report: never takes the project's section down
        prediction_age = {}
        problems.append(f"prediction age unreadable: {type(exc).__name__}: {exc}")
    effort: list[dict] = []
    try:  # issue 17.6: what the annotators changed, per version that served the pre-annotation
        records = EffortLog(Path(registry.root).parents[1], registry.project_id).latest()
        effort = effort_by_version(records, order=[str(v.get("version")) for v in versions])
    except Exception as exc:  # a damaged effort record must not take the project's section down
        problems.append(f"annotation effort unreadable: {type(exc).__name__}: {exc}")
    promotion = None
    if versions:
        last = versions[-1]
        recorded = last.get("promotion") if isinstance(last.get("promotion"), Mapping) else {}
        promoted = last.get("version") == live
        reason = recorded.get("reason") or last.get("held_back_reason")
        if live_problem:
            reason = "the live version is unknown (see the problem above)"
        elif not promoted and not reason:
            reason = "not the live version (rolled back or not promoted; no reason recorded)"
        promotion = {"version": last.get("version"), "promoted": promoted, "reason": reason}
        audit = last.get("audit") if isinstance(last.get("audit"), Mapping) else {}
        if audit.get("decision"):  # the audit gate's "promote" / "hold" / "undecided"
            promotion["decision"] = audit["decision"]
    return {
        "id": registry.project_id,
        "title": title,
        "label_studio_url": label_studio_url,
        "live_version": live,
        "job": job,
        "queue": queue,
        "versions": versions,
        "effort": effort,
        "prediction_age": prediction_age,
        "promotion": promotion,
        "errors": list(errors or []),
        "problems": problems,
    }


def label_studio_counts(project: ProjectData, live_version: str | None) -> dict:
    """{"title", "labelled", "unlabelled", "total", "with_live_prediction"} from the project's ``ProjectData``: two
    requests, no retry (the caller bounds the time; a slow or absent Label Studio must never hold the page)."""
    record = project.record(retry=False)
    total = int(record.get("task_number") or 0)
    labelled = int(record.get("num_tasks_with_annotations") or 0)
    out: dict[str, Any] = {
        "title": record.get("title"),
        "total": total,
        "labelled": labelled,
        "unlabelled": max(0, total - labelled),
    }
    if live_version:
        counts = project.counts(attempts=1, timeout=5)
        out["with_live_prediction"] = int(counts.get(live_version) or 0)
    else:
        out["with_live_prediction"] = 0
    return out
