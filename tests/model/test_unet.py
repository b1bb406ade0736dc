"""Contract tests every registered architecture must pass (shapes, encode/decode, MC dropout, checkpoints)."""

from __future__ import annotations

import pickle

import pytest
import torch

from ml_backend.model import MODELS, CheckpointError, UNet, build_model, load_checkpoint, save_checkpoint

CONFIGS = [
    {"width": 4, "depth": 2, "num_classes": 2},
    {"width": 4, "depth": 3, "num_classes": 3},
    {"width": 6, "depth": 1, "num_classes": 2, "norm": "batch"},
]


@pytest.fixture(params=[(name, cfg) for name in sorted(MODELS) for cfg in CONFIGS], ids=lambda p: f"{p[0]}-{p[1]}")
def model(request) -> torch.nn.Module:
    name, cfg = request.param
    torch.manual_seed(0)
    return build_model(name, dropout=0.3, **cfg).eval()


def _x(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, h, w, generator=torch.Generator().manual_seed(seed))


class TestModelContract:
    @pytest.mark.parametrize("hw", [(32, 32), (37, 50), (1, 1), (9, 64)])
    def test_forward_any_size(self, model, hw):
        out = model(_x(2, *hw))
        assert out.shape == (2, model.hparams["num_classes"], *hw)
        assert torch.isfinite(out).all()

    def test_decode_of_encode_equals_forward(self, model):
        x = _x(2, 32, 48)
        with torch.no_grad():
            feats = model.encode(x)
            assert len(feats) == model.hparams["depth"] + 1
            assert feats[-1].shape[-2:] == (32 // 2 ** model.hparams["depth"], 48 // 2 ** model.hparams["depth"])
            torch.testing.assert_close(model.decode(feats), model(x))

    def test_encode_rejects_non_multiple(self, model):
        with pytest.raises(ValueError, match="multiples of"):
            model.encode(_x(1, 33, 32))

    def test_mc_dropout(self, model):
        x = _x(1, 32, 32)
        with torch.no_grad():
            feats = model.encode(x)
            det = [model.decode(feats) for _ in range(2)]
            torch.testing.assert_close(det[0], det[1], rtol=0, atol=0)
            torch.manual_seed(1)
            mc = [model.decode(feats, mc_dropout=True) for _ in range(2)]
        assert not torch.allclose(mc[0], mc[1])
        assert not model.training, "MC dropout must not switch the model to train mode"

    def test_output_is_a_per_sample_distribution_that_follows_the_input(self, model):
        x = _x(2, 32, 32)
        y = x.clone()
        y[1] = _x(1, 32, 32, seed=1)[0]  # only the second sample changes
        with torch.no_grad():
            px, py = model(x).softmax(dim=1), model(y).softmax(dim=1)
        torch.testing.assert_close(px.sum(dim=1), torch.ones(2, 32, 32))
        assert ((px >= 0) & (px <= 1)).all()
        torch.testing.assert_close(py[0], px[0])  # each sample's output depends on that sample only (eval mode)
        assert (py[1] - px[1]).abs().amax() > 1e-4, "the output does not depend on the input"

    def test_embed_is_the_mean_bottleneck_of_each_input(self, model):
        x = torch.cat([_x(1, 32, 48, seed=s) for s in range(3)])
        with torch.no_grad():
            emb = model.embed(x)
            bottleneck = model.encode(x)[-1]
            alone = model.embed(x[1:2])
        assert emb.shape == (3, model.hparams["width"] * 2 ** model.hparams["depth"])
        assert emb.shape[1] == model.embedding_dim
        torch.testing.assert_close(emb, bottleneck.mean(dim=(2, 3)))
        torch.testing.assert_close(alone[0], emb[1])  # independent of the rest of the batch
        assert torch.cdist(emb, emb)[~torch.eye(3, dtype=torch.bool)].min() > 0  # different tiles, different vectors
        assert model.embed(_x(3, 20, 28)).shape == emb.shape  # any size (padded like forward)

    def test_checkpoint_round_trip(self, model, tmp_path):
        path = tmp_path / "sub" / "model.pt"
        save_checkpoint(model, path, extra={"version": "v1", "metrics": {"iou": 0.5}, "steps": [1, 2]})
        assert [p.name for p in path.parent.iterdir()] == ["model.pt"], "temporary file left behind"
        loaded, extra = load_checkpoint(path)
        assert not loaded.training
        assert type(loaded) is type(model)
        assert loaded.hparams == model.hparams
        assert extra == {"version": "v1", "metrics": {"iou": 0.5}, "steps": [1, 2]}
        x = _x(2, 24, 40)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

    def test_checkpoint_is_weights_only_loadable(self, model, tmp_path):
        path = tmp_path / "model.pt"
        save_checkpoint(model, path)
        payload = torch.load(path, weights_only=True)
        assert set(payload) == {"arch", "hparams", "state_dict", "extra"}
        assert payload["arch"] in MODELS


def test_build_model_unknown_name():
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        build_model("nope")


def test_default_hparams_and_groupnorm():
    model = build_model()
    assert isinstance(model, UNet)
    assert model.hparams == {
        "in_channels": 1,
        "num_classes": 2,
        "width": 16,
        "depth": 4,
        "dropout": 0.2,
        "norm": "group",
    }
    assert any(isinstance(m, torch.nn.GroupNorm) for m in model.modules())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())


def test_dropout_only_in_decoder():
    """Encoder output must be deterministic in train mode too (the encoder runs once for MC dropout)."""
    model = UNet(width=4, depth=2, dropout=0.5, norm="group").train()
    x = _x(1, 16, 16)
    with torch.no_grad():
        a, b = model.encode(x), model.encode(x)
    for fa, fb in zip(a, b, strict=True):
        torch.testing.assert_close(fa, fb, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [{"width": 0}, {"depth": 0}, {"num_classes": 1}, {"dropout": 1.0}, {"norm": "x"}])
def test_invalid_hparams(bad):
    with pytest.raises(ValueError):
        UNet(**bad)


def test_save_rejects_unsafe_extra(tmp_path):
    model = UNet(width=4, depth=1)
    with pytest.raises(TypeError, match="weights_only"):
        save_checkpoint(model, tmp_path / "m.pt", extra={"path": tmp_path})
    assert not any(tmp_path.iterdir())


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    """A failing write leaves the previous checkpoint intact and no temporary file behind."""
    model = UNet(width=4, depth=1)
    path = tmp_path / "m.pt"
    save_checkpoint(model, path, extra={"v": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, path, extra={"v": 2})
    monkeypatch.undo()
    assert load_checkpoint(path)[1] == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(corrupt)
    # A pickle with arbitrary objects is refused by weights_only loading.
    evil = tmp_path / "evil.pt"
    with evil.open("wb") as fh:
        pickle.dump({"arch": "unet", "hparams": {}, "state_dict": {}, "obj": object()}, fh, protocol=2)
    with pytest.raises(CheckpointError):
        load_checkpoint(evil)
    wrong = tmp_path / "wrong.pt"
    torch.save({"arch": "unet", "hparams": {"width": 8, "depth": 1}, "state_dict": {}, "extra": {}}, wrong)
    with pytest.raises(CheckpointError, match="does not match"):
        load_checkpoint(wrong)
