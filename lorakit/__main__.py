"""`python -m lorakit ...` (what torchrun runs: `torchrun --nproc_per_node N -m lorakit train ...`)."""
from lorakit.cli import main

raise SystemExit(main())
