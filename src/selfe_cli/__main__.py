"""`python -m selfe_cli ...` (used by torchrun: `torchrun --nproc_per_node=N -m selfe_cli train RECIPE`)."""

from selfe_cli.cli import main

main()
