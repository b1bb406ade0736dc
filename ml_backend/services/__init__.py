"""Local services for the quick start and the tests: a real Label Studio (own venv) and free ports."""
