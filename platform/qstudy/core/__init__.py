"""The bottom layer: errors, paths, config validation and model shapes; no torch, no other qstudy module."""
