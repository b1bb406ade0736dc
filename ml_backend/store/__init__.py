"""All on-disk state of the backend: atomic writes (``atomic``); the model registry, per-project state and the model
cache move here next (today ``ml_backend.registry`` and ``ml_backend.server.projects``)."""
