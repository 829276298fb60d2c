"""`python -m tmfast …` = the `tmfast` command."""
import sys

from .cli import main

sys.exit(main())
