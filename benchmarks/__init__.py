"""Accuracy and speed measurements of medmem (not tests), run from the repository root as
modules: ``python -m benchmarks.search``, ``python -m benchmarks.nih_first_check``, ...

Shared helpers live in ``benchmarks/_common.py`` and are imported as
``from benchmarks._common import ...`` (no ``sys.path`` edits).
"""
