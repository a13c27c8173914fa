"""``robust compare``: a norms x methods x seeds grid, trained, evaluated and reported."""

from robust.compare.grid import run_compare
from robust.compare.settings import CompareSettings

__all__ = ["CompareSettings", "run_compare"]
