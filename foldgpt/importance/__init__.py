"""Block-selection methods: each decides which blocks to remove, given a model and calibration data.

One module per method (``bi``, ``angular``, ``sleb``, ``baselines`` for ``last`` and ``random``). Every method has
the signature ``method(model, calibration_windows, n_remove, seed) -> Selection`` and registers itself by name.
"""

from foldgpt.importance import angular, baselines, bi, gates, sleb  # noqa: F401 - importing registers the methods
from foldgpt.importance.base import METHODS, Selection, select_blocks

__all__ = ["METHODS", "Selection", "select_blocks"]
