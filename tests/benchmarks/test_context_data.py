"""The benchmark's 2.5D-context option: the protocol's context_offsets (default [0]: the 2-D arrays exactly as
before), pool tiles and test slices read as (C, ...) from the volume, and the --context option."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ml_backend.benchmarks.cli import build_protocol, parse_args
from ml_backend.benchmarks.data import build_dataset
from ml_backend.benchmarks.protocol import Protocol


def test_pool_and_test_slices_carry_the_neighbouring_slices():
    rng = np.random.default_rng(0)
    raw = rng.random((5, 64, 48)).astype(np.float32)
    masks = (rng.random((5, 64, 48)) > 0.5).astype(np.uint8)
    p = replace(Protocol(), tile=16, pool_size=12, test_every=2)
    flat = build_dataset(raw, masks, p, seed=0)
    ctx = build_dataset(raw, masks, replace(p, context_offsets=[-1, 0, 1]), seed=0)
    assert flat.pool_images.shape == (12, 16, 16) and ctx.pool_images.shape == (12, 3, 16, 16)
    np.testing.assert_array_equal(ctx.pool_images[:, 1], flat.pool_images)  # the centre is the 2-D tile
    np.testing.assert_array_equal(ctx.pool_masks, flat.pool_masks)
    for (z, y, x), img in zip(ctx.pool_positions, ctx.pool_images, strict=True):
        np.testing.assert_array_equal(img[0], raw[max(z - 1, 0), y : y + 16, x : x + 16])  # clamped at z = 0
        np.testing.assert_array_equal(img[2], raw[min(z + 1, 4), y : y + 16, x : x + 16])
    assert [t.shape for t in ctx.test_images] == [(3, 32, 48)] * 3
    np.testing.assert_array_equal(ctx.test_images[1][0], raw[1, 32:])  # test slice z = 2: channel 0 is slice 1
    np.testing.assert_array_equal(ctx.test_images[1][1], flat.test_images[1])


def test_context_option():
    p, _ = build_protocol(parse_args(["--synthetic", "--preset", "quick", "--context", "-1,0,1"]))
    assert p.context_offsets == [-1, 0, 1]
    p, _ = build_protocol(parse_args(["--synthetic", "--preset", "quick"]))
    assert p.context_offsets == [0]
