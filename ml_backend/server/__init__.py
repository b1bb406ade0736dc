"""HTTP side of the backend: the Label Studio ML-backend protocol on Flask (``create_app``), served by gunicorn."""

from ml_backend.server.app import create_app

__all__ = ["create_app"]
