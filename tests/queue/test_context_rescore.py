"""Re-scoring the pool with a 2.5D-context model (real Redis): each task's neighbour URLs, found in the project's
task list, travel in the chunk context, the chunk reads them as channels, and a gone neighbour fails no task."""

from __future__ import annotations

import json

import numpy as np
import pytest
import redis
import tifffile
import torch

from ml_backend.config import Settings
from ml_backend.data.context import model_offsets
from ml_backend.labelstudio.importing import make_tiles
from ml_backend.labelstudio.labelconfig import parse_label_config
from ml_backend.labelstudio.project_data import ChunkInputs
from ml_backend.model import build_model
from ml_backend.queue.keys import rescore_ctx_key
from ml_backend.queue.rescoring import RedisPoolScorer, RescoreJob, collect_rescore, start_rescore
from ml_backend.strategies import get_strategy
from ml_backend.training.recipe import ModelState, TrainedModel

XML = """<View><Image name="image" value="$image"/><BrushLabels name="tag" toName="image">
<Label value="Mitochondria"/></BrushLabels></View>"""


@pytest.mark.parametrize("offsets", [(-1, 0, 1), (0,)])
def test_rescore_reads_the_neighbouring_slices_of_the_models_offsets(tmp_path, redis_url, offsets):
    root = tmp_path / "root"
    root.mkdir()
    stack = (np.random.default_rng(0).random((3, 64, 64)) * 255).astype(np.uint8)
    tifffile.imwrite(tmp_path / "stack.tif", stack, photometric="minisblack")
    tiles = make_tiles([tmp_path / "stack.tif"], root / "tiles", root, tile=32, progress=False)
    tasks = {i + 1: {"id": i + 1, "data": dict(t.data)} for i, t in enumerate(tiles)}
    for t in tasks.values():  # neighbours from the task list (index), one of them gone from disk
        t["data"].pop("image_prev")
        t["data"].pop("image_next")
    gone = root / tasks[1]["data"]["image"].split("?d=")[1]
    settings = Settings.from_env(
        model_dir=tmp_path / "models", local_files_root=str(root), label_studio_url="http://127.0.0.1:9",
        redis_url=redis_url, device="cpu", rescore_chunk=4, context_offsets=",".join(map(str, offsets)),
    )  # fmt: skip
    torch.manual_seed(0)
    context = {} if offsets == (0,) else {"context_offsets": list(offsets)}
    model = build_model("unet", in_channels=len(offsets), width=4, depth=2, **context).eval()
    config = parse_label_config(XML)
    ids = [k for k in sorted(tasks) if k != 1]  # task 1 (slice 0) is labelled; its tile is task 5's neighbour
    gone.unlink()
    conn = redis.Redis.from_url(redis_url)
    strategy = get_strategy("entropy")
    inputs = ChunkInputs(config, settings, tasks)  # the loaders the training job hands queue/
    rnd = start_rescore(RescoreJob(3, "v1", XML, inputs, settings, conn), strategy, ids, helpers=False,
                        offsets=model_offsets(model))  # fmt: skip
    ctx = json.loads(conn.get(rescore_ctx_key(3, "v1")))  # what a helper worker reads
    scored = collect_rescore(rnd, model, inputs, settings, conn)
    assert sorted(scored.ids) == ids  # every task scored, the one with a gone neighbour included
    scorer = RedisPoolScorer(3, XML, inputs, settings, conn, helpers=False)  # the product's scorer, same answer
    trained = TrainedModel(ModelState(model, "v2", "kept"))
    assert sorted(scorer.score(trained, "v2", strategy, ids, 0).ids) == ids
    if offsets == (0,):
        assert "neighbours" not in ctx  # 2-D: the chunk context as before
        return
    assert ctx["context_offsets"] == [-1, 0, 1]
    task5 = tasks[5]["data"]  # slice 1, same window as task 1
    assert (task5["slice"], task5["tile_y"], task5["tile_x"]) == (1, 0, 0)
    assert ctx["neighbours"]["5"] == [tasks[1]["data"]["image"], task5["image"], tasks[9]["data"]["image"]]
