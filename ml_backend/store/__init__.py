"""All on-disk state of the backend, under ``MODEL_DIR``: the versioned model registry (``registry``), the serving
processes' model cache (``cache``), per-project label config and strategy (``projects``) and atomic writes
(``atomic``). The round's publisher into the registry is ``active_learning.publisher`` (it names the round's types).
"""
