"""`python -m evals …`: the quality table (evals.cli)."""
from .cli import main

raise SystemExit(main())
