"""Everything that speaks Label Studio: label-config parsing, brush RLE, media fetching, SDK client helpers.

Submodules are imported directly (``from ml_backend.labelstudio.rle import mask_to_results``) so that importing one
does not pull in the others' dependencies (the SDK client is heavy; RLE and config parsing are light).
"""
