"""2.5D neighbour reading: channel order, stack edges (nearest existing slice), missing neighbours (centre)."""

from __future__ import annotations

import numpy as np
import pytest

from ml_backend.data.context import context_batch, read_context, resolve_offsets, slice_reader


def _stack(z: int = 5, size: int = 8) -> np.ndarray:
    """Slice k is filled with the value k (so each channel shows which slice it came from)."""
    return np.broadcast_to(np.arange(z, dtype=np.float32)[:, None, None], (z, size, size)).copy()


def test_interior_tile_reads_neighbours_in_offset_order():
    vol = _stack()
    vol[2, 1, 1] = 99  # inside the window: the window is read, not the whole slice
    t = read_context(vol, 2, 1, 1, 4, offsets=(-1, 0, 1))
    assert t.image.shape == (3, 4, 4)
    assert [float(c[1, 1]) for c in t.image] == [1.0, 2.0, 3.0] and t.image[1, 0, 0] == 99
    assert t.source_z == (1, 2, 3) and t.filled == ("", "", "")
    t2 = read_context(vol, 2, 0, 0, (3, 5), offsets=(2, 0, -2))
    assert t2.image.shape == (3, 3, 5)
    assert t2.source_z == (4, 2, 0)


def test_stack_edges_replicate_the_nearest_existing_slice():
    vol = _stack(5)
    first = read_context(vol, 0, 0, 0, 4, offsets=(-2, -1, 0, 1))
    assert first.source_z == (0, 0, 0, 1)
    assert first.filled == ("edge", "edge", "", "")
    np.testing.assert_array_equal(first.image[0], vol[0, :4, :4])
    last = read_context(vol, 4, 0, 0, 4, offsets=(-1, 0, 1, 3))
    assert last.source_z == (3, 4, 4, 4)
    assert last.filled == ("", "", "edge", "edge")
    near_edge = read_context(vol, 1, 0, 0, 4, offsets=(-3, 0))
    assert near_edge.source_z == (0, 1)  # clamped to slice 0, which exists: a real neighbour, not the centre


def test_missing_neighbours_replicate_the_centre():
    vol = _stack(5)
    present = np.array([True, True, True, False, True])
    t = read_context(slice_reader(vol, present=present), 2, 0, 0, 4, offsets=(-1, 0, 1))
    assert t.source_z == (1, 2, 2)
    assert t.filled == ("", "", "missing")
    np.testing.assert_array_equal(t.image[2], vol[2, :4, :4])


def test_mapping_and_list_readers_with_holes():
    vol = _stack(4)
    as_map = {0: vol[0], 1: vol[1], 3: vol[3]}  # slice 2 never imported
    t = read_context(as_map, 1, 0, 0, 2, offsets=(-1, 0, 1))
    assert t.source_z == (0, 1, 1) and t.filled == ("", "", "missing")
    as_list = [vol[0], None, vol[2], vol[3]]
    t = read_context(as_list, 2, 0, 0, 2, offsets=(-1, 0, 1))
    assert t.source_z == (2, 2, 3) and t.filled == ("missing", "", "")
    # Edge first, then missing: clamping lands on an absent slice -> centre.
    t = read_context({1: vol[1], 2: vol[2]}, 1, 0, 0, 2, offsets=(-2, 0))
    assert t.filled[0] == "missing" and t.source_z == (1, 1)


def test_single_slice_stack_is_all_centre():
    vol = _stack(1)
    t = read_context(vol, 0, 0, 0, 4)
    assert t.filled == ("edge", "", "edge")
    np.testing.assert_array_equal(t.image, np.repeat(vol[:1, :4, :4], 3, axis=0))


def test_context_batch_holds_the_neighbouring_slices_pixels_clamped_at_the_edges():
    vol = np.random.default_rng(0).random((3, 16, 16)).astype(np.float32)  # every pixel of every slice distinct
    pos = np.array([[0, 0, 0], [1, 8, 8], [2, 4, 0]])
    out = context_batch(vol, pos, 8)
    assert out.shape == (3, 3, 8, 8)
    sources = [(0, 0, 1), (0, 1, 2), (1, 2, 2)]  # z-1, z, z+1 clamped into the stack at the first and last slice
    for i, ((_, y, x), source) in enumerate(zip(pos, sources, strict=True)):
        for c, k in enumerate(source):
            np.testing.assert_array_equal(out[i, c], vol[k, y : y + 8, x : x + 8])
    wide = context_batch(vol, pos[1:2], 8, offsets=(-2, 0, 2))
    for c, k in enumerate((0, 1, 2)):  # 1-2 and 1+2 clamp to the first and last slice
        np.testing.assert_array_equal(wide[0, c], vol[k, 8:16, 8:16])
    assert context_batch(vol, np.zeros((0, 3), np.int64), 8).shape == (0, 3, 8, 8)


def test_errors():
    vol = _stack(3)
    with pytest.raises(ValueError, match="offsets"):
        resolve_offsets((-1, 1))  # the centre is required
    with pytest.raises(ValueError, match="offsets"):
        resolve_offsets((0, 1, 1))
    with pytest.raises(ValueError, match="absent"):
        read_context(slice_reader(vol, present=[True, False, True]), 1, 0, 0, 2)
    with pytest.raises(ValueError, match="outside"):
        read_context(vol, 3, 0, 0, 2)
    with pytest.raises(ValueError, match="leaves"):
        read_context(vol, 1, 6, 0, 4)
    with pytest.raises(ValueError, match="one shape"):
        read_context([vol[0], np.zeros((4, 4))], 0, 0, 0, 2, offsets=(0, 1))


def test_unet_reads_every_context_channel():
    """The model side of 2.5D: UNet(in_channels=C) runs on context_batch's (C, h, w) tiles, and what a neighbouring
    slice shows changes its output (the extra channels are not dropped)."""
    import torch

    from ml_backend.model import build_model

    vol = np.random.default_rng(1).random((3, 32, 32)).astype(np.float32)
    torch.manual_seed(0)
    model = build_model("unet", in_channels=3, width=4, depth=2).eval()

    def predict(stack: np.ndarray) -> torch.Tensor:
        with torch.no_grad():
            return model(torch.from_numpy(context_batch(stack, np.array([[1, 0, 0]]), 32))).softmax(dim=1)

    out = predict(vol)
    assert out.shape == (1, 2, 32, 32)
    torch.testing.assert_close(out.sum(dim=1), torch.ones(1, 32, 32))
    for k in (0, 2):  # the slice above and the slice below
        changed = vol.copy()
        changed[k, 8:24, 8:24] = 1.0 - changed[k, 8:24, 8:24]
        assert (predict(changed) - out).abs().amax() > 1e-4, f"slice {k} does not reach the model"
