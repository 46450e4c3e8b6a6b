"""`python -m src.launch.slurm`: one training run as a SLURM batch job that checkpoints and requeues
itself before its time limit.

    python -m src.launch.slurm --config experiments/llava15_7b/stage1_align.yaml \\
        --slurm-config cluster.yaml --partition gpu --time 48:00:00 [--dry-run] [-- --trainer.max_steps 100]

From the training config(s) and a few settings (flags, or a `slurm:` section in YAML: `SlurmSettings`)
it writes an sbatch script whose `--nodes` / `--ntasks-per-node` are the Trainer's `num_nodes` /
`devices` (one task per device, as Lightning's SLURM environment requires), which runs
`srun python -m src.cli fit --config ...` and asks for `--signal=SIGUSR1@90`. Logs go to the run
folder (the Trainer's `default_root_dir`) as `slurm-<jobid>.out`; the script is kept there as
`job.sbatch`. `--dry-run` prints the script instead of submitting it; otherwise the job id is printed.

Time limits and preemption: SLURM sends SIGUSR1 `signal_seconds` before the limit; `SlurmRequeue`
(added to every run the script starts) checkpoints at the end of the step, requeues the job, and the
requeued job resumes with `--ckpt_path=last` (`requeue.py` says how; docs/slurm.md).

The API (used by `src.launch.sweep`): `SlurmSettings`, `load_settings`, `render`, `submit`,
`trainer_shape`.

What lives where:

- `settings.py`: `SlurmSettings`, `load_settings` (YAML / mapping), `SlurmError`.
- `script.py`: `render` (the sbatch script), `submit` (`sbatch --parsable`), `REQUEUE_ARGS`.
- `shape.py`: `trainer_shape` / `trainer_config`, the Trainer's nodes and devices as the CLI parses them.
- `requeue.py`: `SlurmRequeue`, the in-run callback (what runs inside the job, not at submission).
- `cli.py`: `python -m src.launch.slurm`.

`src.launch.slurm.SlurmRequeue` is the class path the scripts and configs name
(`--trainer.callbacks+=src.launch.slurm.SlurmRequeue`); it stays importable from here.
"""

from src.launch.slurm.requeue import SlurmRequeue
from src.launch.slurm.script import ARRAY_TASK_ID, REQUEUE_ARGS, render, submit
from src.launch.slurm.settings import SlurmError, SlurmSettings, load_settings
from src.launch.slurm.shape import trainer_shape

__all__ = [
    "ARRAY_TASK_ID",
    "REQUEUE_ARGS",
    "SlurmError",
    "SlurmRequeue",
    "SlurmSettings",
    "load_settings",
    "render",
    "submit",
    "trainer_shape",
]
