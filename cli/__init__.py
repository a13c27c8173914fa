"""The `robust` command line: a thin layer over :mod:`robust` and :mod:`attacks`."""
