"""The Label Studio implementation's errors, light to import (no SDK): ``client`` raises them, and callers outside
``labelstudio/`` (the cold start's publishing, the tools) catch them without importing the client."""

from __future__ import annotations

__all__ = ["LabelStudioAuthError", "LabelStudioError", "LabelStudioUnavailable"]


class LabelStudioError(RuntimeError):
    """A Label Studio call failed for a reason retrying does not fix (bad request, missing project, ...)."""


class LabelStudioUnavailable(LabelStudioError):
    """Label Studio cannot be reached (or keeps failing) after retries with backoff."""


class LabelStudioAuthError(LabelStudioUnavailable):
    """Label Studio rejected the API token (401/403)."""
