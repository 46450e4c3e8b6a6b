"""A sweep as SLURM job arrays through `src.launch.slurm`: task i of an array runs line i of runs.txt."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterable, Sequence
from typing import Any

from omegaconf import OmegaConf

from src.launch.sweep.folders import prepare
from src.launch.sweep.names import safe
from src.launch.sweep.plan import Run
from src.launch.sweep.spec import Sweep, absolute_path


def array_ranges(indices: Iterable[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> `0-2,5,7-8`, SLURM's --array syntax."""
    parts: list[str] = []
    ordered = sorted(set(indices))
    start = prev = None
    for i in [*ordered, None]:
        if i is not None and prev is not None and i == prev + 1:
            prev = i
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = i
    return ",".join(parts)


def run_slurm(
    sweep: Sweep,
    runs: Sequence[Run],
    settings_source: str | dict | None = None,
    dry_run: bool = False,
    max_parallel: int | None = None,
) -> list[str]:
    """Submits the unfinished runs as a SLURM job array through `src.launch.slurm`: task i runs line i of
    runs.txt (`python -m src.launch.sweep run-one --sweep OUT --index ${SLURM_ARRAY_TASK_ID}` on each of
    its ranks), so the array lists the unfinished indices (`0-3,6`). The job's nodes and tasks per node
    are the runs' `trainer.num_nodes` and `trainer.devices` (runs of different shapes go in one array
    each); `gpus_per_node`, when the settings leave it at 0 on a GPU run, is `devices`. `max_parallel`
    caps the tasks running at once (`--array=0-20%4`). Returns the job ids (the scripts, with `dry_run`)."""
    from src.launch import slurm  # here: planning and collecting need neither it nor Lightning

    statuses = prepare(sweep, runs)
    todo = [r for r in runs if statuses[r.name] != "done"]
    print(f"{sweep.out}: {len(runs)} runs, {len(runs) - len(todo)} done, {len(todo)} to submit")
    if not todo:
        return []
    source = settings_source if settings_source is not None else sweep.slurm
    if isinstance(source, str):
        source = str(absolute_path(source, sweep.cwd))
    settings = slurm.load_settings(source)
    if settings.job_name == slurm.SlurmSettings().job_name:
        settings = dataclasses.replace(settings, job_name=safe(f"sweep-{sweep.out.name}"))
    groups: dict[tuple[Any, ...], list[Run]] = {}  # by the trainer keys the shape comes from
    for run in todo:
        trainer = OmegaConf.to_container(OmegaConf.load(run.path / "config.yaml")).get("trainer") or {}
        key = tuple(json.dumps(trainer.get(k), sort_keys=True) for k in ("num_nodes", "devices", "accelerator"))
        groups.setdefault(key, []).append(run)
    results = []
    for group in groups.values():
        nodes, devices = slurm.trainer_shape([group[0].path / "config.yaml"], [])
        accelerator = (OmegaConf.load(group[0].path / "config.yaml").get("trainer") or {}).get("accelerator")
        job_settings = dataclasses.replace(settings, nodes=nodes)
        if not settings.gpus_per_node and accelerator in ("gpu", "cuda"):
            job_settings = dataclasses.replace(job_settings, gpus_per_node=devices)
        array = array_ranges(r.index for r in group) + (f"%{max_parallel}" if max_parallel else "")
        script = slurm.render(
            job_settings,
            sweep.out,
            ["--sweep", str(sweep.out), "--index", slurm.ARRAY_TASK_ID],
            devices,
            array=array,
            command=["-m", "src.launch.sweep", "run-one"],
        )
        shape = f"{len(group)} runs, {nodes} node(s) x {devices} task(s)"
        if dry_run:
            print(f"# array {array}: {shape}\n{script}")
            results.append(script)
            continue
        job = str(slurm.submit(script, sweep.out))
        print(f"submitted job array {job}: tasks {array} ({shape}); logs {sweep.out}/slurm-{job}_<task>.out")
        with open(sweep.out / "slurm_jobs.txt", "a") as jobs:
            jobs.write(f"{job}\t{array}\t{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        results.append(job)
    return results
