"""The package's version, in a module that imports nothing: `robust --version` and ``import robust`` read it
without loading torch (pyproject.toml reads it from here too)."""

__version__ = "0.1.0"
