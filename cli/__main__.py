"""`python -m cli ...` (also what torchrun starts: `torchrun --nproc_per_node N -m cli train ...`)."""

from cli.main import main

main()
