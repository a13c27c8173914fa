"""``robust compare``: a norms x methods x seeds grid, trained, evaluated and reported."""

from robust.lab.compare.grid import run_compare
from robust.lab.compare.settings import CompareSettings

__all__ = ["CompareSettings", "run_compare"]
