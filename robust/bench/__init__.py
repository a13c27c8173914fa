"""Developer benchmarks, run as ``robust bench`` or ``python -m robust.bench.NAME``: the training step
against a textbook loop, our AutoAttack against the official code, attack-gradient measurements.
They follow the package's rules: bad input is one line and exit code 2, every output is checked
before any work and written atomically."""
