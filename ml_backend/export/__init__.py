"""Whole-stack export (issue 21): a model version applied to every slice of a stack, annotators' masks winning,
the segmentation written as TIFF or OME-Zarr, and every 3-D object measured in per-class tables.

``source`` reads a stack slice by slice (checked up front), ``annotations`` places Label Studio annotations at their
tiles, ``objects`` labels chunks and merges objects across chunk borders, ``run`` the resumable stages, ``driver``
runs them (``export_stack``), ``jobs`` the RQ chunk jobs, ``cli`` ``ml-backend export``.
"""

from .driver import export_stack
from .run import ExportError, ExportWriteError
from .source import ExportInputError, open_stack

__all__ = ["ExportError", "ExportInputError", "ExportWriteError", "export_stack", "open_stack"]
