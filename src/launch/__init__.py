"""Launchers: `src.launch.slurm` (one run as a SLURM batch job, with checkpoint-and-requeue on the time
limit's warning signal) and `src.launch.sweep` (many runs, here or as SLURM job arrays)."""
