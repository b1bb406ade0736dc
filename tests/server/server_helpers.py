"""Shared constants and helpers of the server tests (imported by module name, as tests/strategies does)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DENSE_XML = (REPO / "label_config" / "dense.xml").read_text()
SPARSE_XML = (REPO / "label_config" / "sparse.xml").read_text()
# Different names everywhere: proves nothing is hard-coded.
CUSTOM_XML = """<View><Image name="em" value="$tile"/>
<BrushLabels name="seg" toName="em"><Label value="Mito"/><Label value="Background"/></BrushLabels></View>"""


def task(task_id: int, name: str, key: str = "image") -> dict:
    return {"id": task_id, "data": {key: f"/data/local-files/?d={name}"}}
