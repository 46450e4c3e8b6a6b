"""`python -m src.launch.sweep plan|run|run-one|collect`: see `src.launch.sweep.cli`."""

import sys

from src.launch.sweep.cli import main

sys.exit(main())
