"""Compatibility shim: the model registry lives in ``ml_backend.store.registry``, its cache in ``store.cache``."""

from ml_backend.store.cache import ModelCache
from ml_backend.store.registry import VERSION_RE, ModelRegistry, RegistryError, RegistryWriteError

__all__ = ["VERSION_RE", "ModelCache", "ModelRegistry", "RegistryError", "RegistryWriteError"]
