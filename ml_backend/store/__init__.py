"""All on-disk state of the backend, under ``MODEL_DIR``: the versioned model registry (``registry``), the serving
processes' model cache (``cache``), per-project label config and strategy (``projects``), the round's publisher into
the registry (``publisher``) and atomic writes (``atomic``)."""
