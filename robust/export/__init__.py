"""Export formats beyond robust's own checkpoint: RobustBench's model zoo (``robust export --robustbench``)."""
