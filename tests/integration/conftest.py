"""Fixtures for the integration tests (``label_studio``, ``ls``, ``start_backend``, ``scripts``, ``load_script``)
live in tests/conftest.py, shared with tests/faults so that a session runs ONE Label Studio server."""
