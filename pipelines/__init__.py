"""Notebook-first research-to-production toolkit for a click-through model.

Every piece of logic used by the stage notebooks, the BentoML service and the
CLI lives in this package; notebooks only wire parameters to these functions.
"""

from __future__ import annotations

__all__ = ["__version__"]
__version__ = "0.1.0"
