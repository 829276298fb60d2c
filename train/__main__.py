"""`python -m train ...` / `torchrun --nproc_per_node=N -m train ...`."""
from .trainer import main

raise SystemExit(main())
