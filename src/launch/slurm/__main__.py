"""`python -m src.launch.slurm`: see `src.launch.slurm.cli`."""

import sys

from src.launch.slurm.cli import main

sys.exit(main())
