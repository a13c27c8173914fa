"""`python -m robust.cli ...` (also what torchrun starts: `torchrun --nproc_per_node N -m robust.cli train ...`)."""

from robust.cli.main import main

main()
