"""Checkpoint I/O that is safe to load (``weights_only=True``) and atomic to write.

A checkpoint is a plain dict ``{"arch", "hparams", "state_dict", "extra"}``: only tensors and builtin types, so
``torch.load(weights_only=True)`` can read it without executing pickled code. Writes go to a temporary file in the
same directory followed by ``os.replace``, so a reader (e.g. the serving process polling for a new version) never
sees a half-written file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ml_backend.data.atomic import open_atomic
from ml_backend.model.unet import UNet

MODELS: dict[str, type[nn.Module]] = {"unet": UNet}

_SAFE_TYPES = (type(None), bool, int, float, str, torch.Tensor)


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not describe a registered model."""


def register_model(name: str, cls: type[nn.Module]) -> type[nn.Module]:
    """Add an architecture to ``MODELS``; it must take its hyper-parameters as kwargs and expose ``hparams``."""
    if name in MODELS and MODELS[name] is not cls:
        raise ValueError(f"model name {name!r} is already registered to {MODELS[name].__name__}")
    MODELS[name] = cls
    return cls


def build_model(name: str = "unet", **hparams: Any) -> nn.Module:
    """Instantiate a registered architecture by name (like ``segmentation_models_pytorch.create_model``)."""
    try:
        cls = MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {sorted(MODELS)}") from None
    return cls(**hparams)


def _arch_of(model: nn.Module) -> str:
    for name, cls in MODELS.items():
        if type(model) is cls:
            return name
    raise TypeError(f"{type(model).__name__} is not a registered model; registered: {sorted(MODELS)}")


def _check_safe(value: Any, where: str) -> None:
    """Reject what ``weights_only`` loading would refuse, at save time rather than at the reader."""
    if isinstance(value, _SAFE_TYPES):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_safe(item, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint {where}: dict key {k!r} must be str or int")
            _check_safe(v, f"{where}[{k!r}]")
        return
    raise TypeError(
        f"checkpoint {where} has type {type(value).__name__}, which torch.load(weights_only=True) cannot read; "
        "convert it to builtin types (numbers, strings, lists, dicts) or tensors"
    )


def save_checkpoint(model: nn.Module, path: str | Path, extra: dict | None = None) -> None:
    """Write ``model`` (architecture name, hyper-parameters, CPU weights) and ``extra`` atomically to ``path``."""
    path = Path(path)
    extra = {} if extra is None else extra
    _check_safe(extra, "extra")
    hparams = dict(getattr(model, "hparams", {}))
    _check_safe(hparams, "hparams")
    payload = {
        "arch": _arch_of(model),
        "hparams": hparams,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "extra": extra,
    }
    with open_atomic(path, durable=True) as fh:
        torch.save(payload, fh)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the model from ``path`` with ``torch.load(weights_only=True)``; returns (model in eval mode, extra)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt/truncated/unsafe pickle: one clear error type for callers
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(payload, dict) or not {"arch", "hparams", "state_dict"} <= payload.keys():
        raise CheckpointError(f"{path} is not a model checkpoint (expected keys arch, hparams, state_dict)")
    try:
        model = build_model(payload["arch"], **payload["hparams"])
        model.load_state_dict(payload["state_dict"], strict=True)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {path} does not match architecture {payload['arch']!r}: {exc}") from exc
    model.to(map_location).eval()
    return model, dict(payload.get("extra") or {})
