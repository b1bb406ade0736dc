"""Data sources: generated EM-like tiles with masks, and readers for real EM stacks."""

from ml_backend.data.stacks import Slice, read_labelled_stack, read_stack
from ml_backend.data.synthetic import generate_em_like

__all__ = ["Slice", "generate_em_like", "read_labelled_stack", "read_stack"]
