"""Sweeps: one YAML spec -> many runs, each in its own folder; run them here or as one SLURM job array;
collect their TensorBoard scalars and benchmark reports into tables (95% confidence intervals over seeds,
differences beyond the seed noise) and plots.

    python -m src.launch.sweep plan experiments/sweeps/demo_projectors.yaml
    python -m src.launch.sweep run experiments/sweeps/demo_projectors.yaml --local
    python -m src.launch.sweep run experiments/sweeps/projectors.yaml --slurm [--slurm-config cluster.yaml] [--dry-run]
    python -m src.launch.sweep collect experiments/sweeps/demo_projectors.yaml   # or the sweep's folder

A spec (see docs/sweeps.md):

    base: [lightning_config.yaml]          # configs merged in order (omegaconf), like repeated --config
    overrides: {trainer: {max_steps: 6}}   # merged into every run (nested or dotted keys)
    grid:                                  # the cartesian product; each value replaces its key
      model.projector: [{name: linear}, {name: mlp, kwargs: {depth: 2}}]
      seed_everything: [0, 1]
    random:                                # optional: n draws, crossed with the grid
      n: 4
      seed: 0
      space: {model.optimizer.lr: {log_uniform: [1.0e-5, 1.0e-3]}}
    out: runs/sweeps/projectors            # the sweep's folder
    test: auto                             # test each run after fit: auto (when data.test_shards is set) | true | false
    slurm: cluster.yaml                    # optional: settings for --slurm (src.launch.slurm.load_settings)

Each run is `OUT/<name>/` with `config.yaml`, the resolved, merged config (default_root_dir, the
checkpoint folder and the TensorBoard logger pointing into the run folder). A run is what
`python -m src.cli fit --config RUN/config.yaml` then `python -m src.cli test --config RUN/config.yaml
--ckpt_path RUN/checkpoints/last.ckpt` do, done in one process by `run-one`, which also writes
`facts.json` (trainable and total parameters per part, image tokens per view) from the built model,
and `DONE` at the end; a run with `DONE` is skipped when the sweep runs again, a run that stopped
part-way resumes from its `last.ckpt` (or the `hpc_ckpt_N.ckpt` a SLURM requeue wrote).

Paths in a spec (base, out, slurm) and inside the configs are relative to the directory the command
runs from (the repository root), as for `python -m src.cli`; the sweep records that directory and
every run starts there.

What lives where (one concern per module; `cli.py` ties them together):

- `spec.py`: the spec file -> a checked `Sweep`; the random search's draws.
- `names.py`: run, column and value names (short, stable, filesystem-safe).
- `plan.py`: the runs (`Run`, `plan`) and each run's resolved config (`run_config`).
- `folders.py`: the sweep's folder on disk (`prepare`), a run's status and checkpoints.
- `run.py`: `run_one` (what one run, or one array task, does) and `run_local`.
- `array.py`: `run_slurm`, the unfinished runs as SLURM job arrays (through `src.launch.slurm`).
- `results.py`: one run's row (scalars, facts, benchmark scores) and how columns are written.
- `stats.py`: t quantiles, confidence intervals and Welch's test, without scipy.
- `summary.py`: the per-setting table over seeds (`summary.md`).
- `plots.py`: `loss_curves.png` and `scores.png`.
- `collect.py`: `collect`, which writes the results tables, the summary and the plots.
- `cli.py`: `python -m src.launch.sweep plan|run|run-one|collect`.
"""

from src.launch.sweep.array import run_slurm
from src.launch.sweep.collect import collect
from src.launch.sweep.folders import prepare, status
from src.launch.sweep.plan import Run, plan, run_config
from src.launch.sweep.run import run_local, run_one
from src.launch.sweep.spec import Sweep, SweepError, load_spec

__all__ = [
    "Run",
    "Sweep",
    "SweepError",
    "collect",
    "load_spec",
    "plan",
    "prepare",
    "run_config",
    "run_local",
    "run_one",
    "run_slurm",
    "status",
]
