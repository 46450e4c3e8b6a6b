"""The SLURM launcher: settings, the script, the Trainer's shape, the CLI (fast); and, on a real one-node
cluster started by `slurm_cluster` (conftest.py), a 2-rank DDP job of the demo config that completes, one
that is sent SIGUSR1 mid-run, checkpoints, requeues itself and finishes exactly as the uninterrupted run
does, and one requeued without that signal (`scontrol requeue`, as a node failure or preemption), which
resumes from the run's newest checkpoint with `--ckpt_path=last` in the same run folder (slow)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from src.launch.slurm import SlurmError, SlurmRequeue, SlurmSettings, load_settings, render, submit, trainer_shape
from src.launch.slurm.cli import main

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "lightning_config.yaml")


# ---- settings ------------------------------------------------------------------------------------


def test_settings_defaults() -> None:
    s = load_settings(None)
    assert s == SlurmSettings()
    assert (s.nodes, s.gpus_per_node, s.cpus_per_task, s.time, s.job_name, s.signal_seconds, s.python) == (
        1, 0, 4, "24:00:00", "llava", 90, "python",
    )  # fmt: skip
    assert s.extra_sbatch == [] and s.setup == [] and s.mem is s.partition is s.account is s.qos is None


def test_settings_from_a_slurm_section_in_yaml(tmp_path: Path) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_text(
        textwrap.dedent("""\
        other: ignored            # only the slurm: section is read
        slurm:
          partition: gpu
          account: proj42
          qos: high
          time: 48:00:00          # unquoted: still the string, not base-60 seconds
          gpus_per_node: 8
          cpus_per_task: 12
          mem: 480G
          setup: source /opt/venv/bin/activate
          extra_sbatch: [exclusive, "#SBATCH --constraint=h100"]
        """)
    )
    s = load_settings(path)
    assert (s.partition, s.account, s.qos, s.time, s.gpus_per_node, s.cpus_per_task, s.mem) == (
        "gpu", "proj42", "high", "48:00:00", 8, 12, "480G",
    )  # fmt: skip
    assert s.setup == ["source /opt/venv/bin/activate"]
    assert s.extra_sbatch == ["exclusive", "#SBATCH --constraint=h100"]
    # the settings alone, as a mapping (what a sweep spec's inline `slurm:` gives)
    assert load_settings({"nodes": 2, "mem": 64000}) == SlurmSettings(nodes=2, mem="64000")
    assert load_settings({"slurm": {"job_name": "x"}}).job_name == "x"


def test_unknown_setting_is_an_error_that_names_it(tmp_path: Path) -> None:
    with pytest.raises(SlurmError, match="gpus_per_nod\\b.*valid: nodes, gpus_per_node"):
        load_settings({"gpus_per_nod": 8})
    path = tmp_path / "c.yaml"
    path.write_text("slurm:\n  partition: gpu\n  walltime: '1:00:00'\n")
    with pytest.raises(SlurmError, match=f"{path}.*walltime"):
        load_settings(path)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"nodes": 0}, "nodes must be an integer >= 1"),
        ({"nodes": "two"}, "Parser key \"nodes\": Expected a <class 'int'>. Got value: two"),
        ({"cpus_per_task": True}, "Parser key \"cpus_per_task\": Expected a <class 'int'>"),
        ({"time": 86400}, "Parser key \"time\": Expected a <class 'str'>. Got value: 86400 .*quote it"),
        ({"partition": "a b"}, "partition must be a non-empty string without spaces"),
        ({"setup": ["ok", "two\nlines"]}, "setup: each entry is one non-empty line"),
        ({"extra_sbatch": [1]}, "Parser key \"extra_sbatch\": Expected a <class 'str'>. Got value: 1"),
        ({"mem": [1]}, 'Parser key "mem": Does not validate against any of the Union subtypes'),
        ({"signal_seconds": 0}, "signal_seconds must be an integer >= 1"),
    ],
)
def test_bad_settings_are_errors(values: dict, message: str) -> None:
    with pytest.raises(SlurmError, match=message) as error:
        load_settings(values)
    assert "\n" not in str(error.value)  # one line, naming the key, as the training CLI's parser does


def test_a_wrong_type_in_a_settings_file_is_one_line_naming_file_and_key(tmp_path: Path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("slurm:\n  cpus_per_task: many\n")
    code, out, err = _cli(capsys, "--config", CONFIG, "--slurm-config", str(path), "--dry-run")
    assert code == 2 and out == ""
    assert err == f"error: {path} (slurm:): Parser key \"cpus_per_task\": Expected a <class 'int'>. Got value: many\n"


def test_cli_flags_are_typed_by_jsonargparse(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _cli(capsys, "--config", CONFIG, "--cpus-per-task", "six", "--dry-run")
    assert exit_info.value.code == 2
    assert 'error: Parser key "cpus_per_task":' in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _cli(capsys, "--config", CONFIG, "--partitoin", "gpu")
    assert "unrecognized arguments: --partitoin gpu" in capsys.readouterr().err


def test_cli_print_config_shows_the_file_and_the_flags_merged(tmp_path: Path, capsys) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("slurm:\n  partition: a100\n  time: 48:00:00\n  setup: source venv/bin/activate\n")
    code, out, err = _cli(capsys, "--config", CONFIG, "--slurm-config", str(cluster), "--cpus_per_task", "6",
                          "--setup", "echo ready", "--sbatch", "exclusive", "--print_config")  # fmt: skip
    assert code == 0, err
    printed = yaml.safe_load(out)
    assert printed["partition"] == "a100" and printed["time"] == "48:00:00" and printed["cpus_per_task"] == 6
    assert printed["setup"] == ["source venv/bin/activate", "echo ready"] and printed["extra_sbatch"] == ["exclusive"]
    assert printed["config"] == [CONFIG] and printed["job_name"] == "llava"


def test_missing_settings_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(SlurmError, match="does not exist"):
        load_settings(tmp_path / "nope.yaml")


# ---- the script ----------------------------------------------------------------------------------


def _directives(script: str) -> list[str]:
    return [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH ")]


def _srun(script: str) -> str:
    (line,) = [line for line in script.splitlines() if line.startswith("srun ")]
    return line


def test_render_every_directive_the_srun_line_and_the_signal(tmp_path: Path) -> None:
    settings = SlurmSettings(
        nodes=2, gpus_per_node=8, cpus_per_task=12, mem="480G", partition="gpu", account="proj", qos="high",
        time="2-00:00:00", job_name="stage1", extra_sbatch=["exclusive", "--constraint=h100", "#SBATCH --comment=x"],
        signal_seconds=300, python="/opt/venv/bin/python",
    )  # fmt: skip
    run = tmp_path / "run"
    script = render(settings, run, ["--config", "a b.yaml", "--trainer.max_steps=10"], ntasks_per_node=8)
    assert script.startswith("#!/bin/bash\n")
    assert _directives(script) == [
        "--job-name=stage1",
        "--nodes=2",
        "--ntasks-per-node=8",
        "--cpus-per-task=12",
        "--gpus-per-node=8",
        "--mem=480G",
        "--partition=gpu",
        "--account=proj",
        "--qos=high",
        "--time=2-00:00:00",
        "--signal=SIGUSR1@300",
        "--requeue",
        "--open-mode=append",
        f"--chdir={Path.cwd()}",
        f"--output={run.absolute()}/slurm-%j.out",
        "--exclusive",
        "--constraint=h100",
        "--comment=x",
    ]
    # every directive comes before the first command (sbatch stops reading them there)
    lines = script.splitlines()
    last_directive = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
    first_command = min(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    assert last_directive < first_command
    assert _srun(script) == (
        "srun --kill-on-bad-exit=1 --cpus-per-task=12 /opt/venv/bin/python -m src.cli fit --config 'a b.yaml' "
        '--trainer.max_steps=10 --trainer.callbacks+=src.launch.slurm.SlurmRequeue "${RESUME[@]}"'
    )


def test_render_defaults_leave_out_what_is_not_set(tmp_path: Path) -> None:
    script = render(SlurmSettings(), tmp_path, ["--config", "c.yaml"], ntasks_per_node=1)
    options = {d.split("=")[0] for d in _directives(script)}
    assert not options & {"--gpus-per-node", "--mem", "--partition", "--account", "--qos", "--array"}
    assert "--time=24:00:00" in _directives(script) and "--signal=SIGUSR1@90" in _directives(script)


def test_render_a_job_array(tmp_path: Path) -> None:
    args = ["--config", "runs/sweep/${SLURM_ARRAY_TASK_ID}/config.yaml", "--seed_everything=${SLURM_ARRAY_TASK_ID}"]
    script = render(SlurmSettings(), tmp_path, args, ntasks_per_node=2, array="0-7%4")
    assert "--array=0-7%4" in _directives(script)
    assert f"--output={tmp_path}/slurm-%A_%a.out" in _directives(script)
    srun = _srun(script)
    assert 'runs/sweep/"${SLURM_ARRAY_TASK_ID}"/config.yaml --seed_everything="${SLURM_ARRAY_TASK_ID}"' in srun
    assert "RESUME" not in script  # each task's own default_root_dir: Lightning's rule (its HPC checkpoint)
    with pytest.raises(SlurmError, match="not a SLURM --array range"):
        render(SlurmSettings(), tmp_path, [], 1, array="0-3; rm -rf /")


def test_render_another_program(tmp_path: Path) -> None:
    script = render(SlurmSettings(), tmp_path, ["--index", "${SLURM_ARRAY_TASK_ID}"], 1, array="0-1",
                    command=["-m", "src.launch.sweep", "run-one"])  # fmt: skip
    assert _srun(script).endswith('python -m src.launch.sweep run-one --index "${SLURM_ARRAY_TASK_ID}"')


def test_render_rejects_what_cannot_work(tmp_path: Path) -> None:
    with pytest.raises(SlurmError, match="ntasks_per_node"):
        render(SlurmSettings(), tmp_path, [], 0)
    with pytest.raises(SlurmError, match="line break"):
        render(SlurmSettings(), tmp_path, ["--x=a\nb"], 1)


def _fake_bin(tmp_path: Path, name: str, body: str) -> Path:
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return folder


def _run_script(tmp_path: Path, script: str, **env: str) -> list[str]:
    """Runs the script with a fake `srun` that prints its arguments, one per line."""
    folder = _fake_bin(tmp_path, "srun", 'printf "%s\\n" "$@"\n')
    path = tmp_path / "job.sh"
    path.write_text(script)
    variables = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    done = subprocess.run(["bash", str(path)], env=variables | {"PATH": f"{folder}:{os.environ['PATH']}"} | env,
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_the_script_runs_setup_in_order_then_srun_and_resumes_when_requeued(tmp_path: Path) -> None:
    run = tmp_path / "run dir"
    run.mkdir()
    settings = SlurmSettings(setup=["echo first", "export KIT_X=2", 'echo "second $KIT_X"'], cpus_per_task=3)
    script = render(settings, run, ["--config", "it's.yaml"], ntasks_per_node=2)
    out = _run_script(tmp_path, script, SLURM_JOB_ID="7")
    assert out[:2] == ["first", "second 2"]
    assert out[2].startswith("== SLURM job 7 restart 0 on ")
    srun = ["--kill-on-bad-exit=1", "--cpus-per-task=3", "python", "-m", "src.cli", "fit", "--config", "it's.yaml",
            "--trainer.callbacks+=src.launch.slurm.SlurmRequeue"]  # fmt: skip
    assert out[3:] == srun  # a first start: no --ckpt_path
    # requeued, with or without a checkpoint written on the signal (preempted, node failure): the run's
    # newest valid checkpoint, which the CLI finds (an HPC one competes by its step)
    assert _run_script(tmp_path, script, SLURM_JOB_ID="7", SLURM_RESTART_COUNT="1")[3:] == [*srun, "--ckpt_path=last"]
    (run / "hpc_ckpt_1.ckpt").write_text("")
    assert _run_script(tmp_path, script, SLURM_JOB_ID="7", SLURM_RESTART_COUNT="2")[3:] == [*srun, "--ckpt_path=last"]


def test_the_array_script_expands_the_task_id(tmp_path: Path) -> None:
    script = render(SlurmSettings(), tmp_path, ["--config", "runs/${SLURM_ARRAY_TASK_ID}.yaml"], 1, array="0-3")
    out = _run_script(tmp_path, script, SLURM_JOB_ID="9", SLURM_ARRAY_TASK_ID="3")
    assert "(array task 3)" in out[0]
    assert "runs/3.yaml" in out


def test_a_failing_setup_line_stops_the_script(tmp_path: Path) -> None:
    script = render(SlurmSettings(setup=["false"]), tmp_path, [], 1)
    path = tmp_path / "job.sh"
    path.write_text(script)
    folder = _fake_bin(tmp_path, "srun", "echo SRUN_RAN\n")
    done = subprocess.run(["bash", str(path)], env=os.environ | {"PATH": f"{folder}:{os.environ['PATH']}"},
                          capture_output=True, text=True, timeout=30)  # fmt: skip
    assert done.returncode != 0 and "SRUN_RAN" not in done.stdout


# ---- submitting ----------------------------------------------------------------------------------


def test_submit_writes_the_script_and_returns_the_job_id(tmp_path: Path, monkeypatch) -> None:
    folder = _fake_bin(tmp_path, "sbatch", 'echo "$@" > "$(dirname "$0")/args"; echo "4242;cluster"\n')
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    run = tmp_path / "new" / "run"
    assert submit("#!/bin/bash\necho hi\n", run) == "4242"
    assert (run / "job.sbatch").read_text() == "#!/bin/bash\necho hi\n"
    assert (folder / "args").read_text().split() == ["--parsable", str(run / "job.sbatch")]


def test_submit_reports_sbatch_refusing(tmp_path: Path, monkeypatch) -> None:
    folder = _fake_bin(tmp_path, "sbatch", 'echo "sbatch: error: invalid partition specified: gpux" >&2; exit 1\n')
    monkeypatch.setenv("PATH", f"{folder}:{os.environ['PATH']}")
    with pytest.raises(SlurmError, match="invalid partition specified: gpux"):
        submit("#!/bin/bash\n", tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(SlurmError, match="sbatch is not on PATH"):
        submit("#!/bin/bash\n", tmp_path)


# ---- the Trainer's shape -------------------------------------------------------------------------


def test_trainer_shape_from_the_config_and_overrides() -> None:
    assert trainer_shape([CONFIG], []) == (1, 1)
    assert trainer_shape([CONFIG], ["--trainer.devices=2"]) == (1, 2)
    assert trainer_shape([CONFIG], ["--trainer.num_nodes", "4", "--trainer.devices", "8"]) == (4, 8)
    assert trainer_shape([CONFIG], ["--trainer.devices=[0, 1, 2]"]) == (1, 3)
    # --ckpt_path is not the shape's business (and is never opened)
    assert trainer_shape([Path(CONFIG)], ["--ckpt_path", "/nonexistent.ckpt", "--trainer.devices=2"]) == (1, 2)


def test_trainer_shape_merges_configs_in_order(tmp_path: Path) -> None:
    extra = tmp_path / "nodes.yaml"
    extra.write_text("trainer:\n  num_nodes: 2\n  devices: 4\n")
    assert trainer_shape([CONFIG, extra], []) == (2, 4)
    assert trainer_shape([CONFIG, extra], ["--trainer.devices=2"]) == (2, 2)


def test_trainer_shape_errors() -> None:
    with pytest.raises(SlurmError, match="devices is 'auto'.*set it"):
        trainer_shape([CONFIG], ["--trainer.accelerator=gpu", "--trainer.devices=auto"])
    with pytest.raises(SlurmError, match="does not parse.*max_stepz"):
        trainer_shape([CONFIG], ["--trainer.max_stepz=3"])
    with pytest.raises(SlurmError, match="does not exist"):
        trainer_shape(["nope.yaml"], [])


# ---- the command line ----------------------------------------------------------------------------


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_dry_run_takes_nodes_and_tasks_from_the_config(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    code, out, err = _cli(capsys, "--config", CONFIG, "--time", "01:00:00", "--setup", "module load x", "--dry-run",
                          "--", "--trainer.devices=2", "--trainer.num_nodes=3", f"--trainer.default_root_dir={run}")  # fmt: skip
    assert code == 0, err
    directives = _directives(out)
    assert "--nodes=3" in directives and "--ntasks-per-node=2" in directives and "--time=01:00:00" in directives
    assert f"--output={run}/slurm-%j.out" in directives
    assert "--gpus-per-node" not in out  # a CPU config asks for no GPUs
    assert "module load x" in out.splitlines()
    assert f"--trainer.num_nodes=3 --trainer.default_root_dir={run}" in _srun(out)
    assert not run.exists()  # a dry run creates nothing


def test_cli_settings_file_and_flags_combine(tmp_path: Path, capsys) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("slurm:\n  partition: a100\n  cpus_per_task: 8\n  setup: [source venv/bin/activate]\n")
    code, out, err = _cli(capsys, "--config", CONFIG, "--slurm-config", str(cluster), "--cpus-per-task", "6",
                          "--setup", "echo ready", "--sbatch", "exclusive", "--dry-run", "--",
                          "--trainer.accelerator=gpu", "--trainer.devices=4")  # fmt: skip
    assert code == 0, err
    directives = _directives(out)
    assert {"--partition=a100", "--cpus-per-task=6", "--gpus-per-node=4", "--ntasks-per-node=4"} <= set(directives)
    assert directives[-1] == "--exclusive"
    lines = out.splitlines()
    assert lines.index("source venv/bin/activate") < lines.index("echo ready")  # the file's setup, then the flag's


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--nodes", "2"], "--nodes 2 but the config's trainer.num_nodes is 1"),
        (["--ntasks-per-node", "4"], "--ntasks-per-node 4 but the config's trainer.devices is 1"),
        (["--gpus-per-node", "2", "--", "--trainer.accelerator=gpu", "--trainer.devices=4"], "fewer than"),
        (["--time", "1 day"], "time must be a non-empty string without spaces"),
    ],
)
def test_cli_mismatch_is_an_error_with_a_message(argv: list[str], message: str, capsys) -> None:
    code, out, err = _cli(capsys, "--config", CONFIG, "--dry-run", *argv)
    assert code == 2 and out == ""
    assert message in err


def test_cli_nodes_from_the_settings_file_must_match_too(tmp_path: Path, capsys) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text("nodes: 2\n")
    code, _, err = _cli(capsys, "--config", CONFIG, "--slurm-config", str(cluster), "--dry-run")
    assert code == 2 and "--nodes 2 but the config's trainer.num_nodes is 1" in err
    code, out, err = _cli(capsys, "--config", CONFIG, "--slurm-config", str(cluster), "--dry-run", "--",
                          "--trainer.num_nodes=2")  # fmt: skip
    assert code == 0 and "--nodes=2" in _directives(out), err


# ---- the requeue callback, without SLURM ---------------------------------------------------------


def test_requeue_callback_keeps_the_newest_hpc_checkpoints(tmp_path: Path) -> None:
    for n in (1, 2, 3):
        (tmp_path / f"hpc_ckpt_{n}.ckpt").write_text(str(n))
    (tmp_path / "hpc_ckpt_2.ckpt.other").write_text("")
    SlurmRequeue(keep=2)._prune(tmp_path / "hpc_ckpt_3.ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hpc_ckpt_2.ckpt", "hpc_ckpt_2.ckpt.other", "hpc_ckpt_3.ckpt"]
    with pytest.raises(ValueError, match="every_n_steps and keep"):
        SlurmRequeue(every_n_steps=0)


# ---- without a cluster: skipped on a bare machine, a failure under CI -------------------------------


def _cluster_fixture_module():
    """conftest.py as a plain module (pytest imports it under a name tests cannot rely on)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch_conftest", Path(__file__).with_name("conftest.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _no_slurm_installed(monkeypatch, tmp_path: Path):
    module = _cluster_fixture_module()
    monkeypatch.setattr(module, "_which", lambda name: None)
    return module, module.SlurmCluster(tmp_path)


MISSING = (
    "not installed: slurmctld, slurmd, munged, sbatch, scontrol, sinfo, squeue, scancel, srun, munge "
    "(apt-get install -y slurm-wlm munge; .ci/run does it)"
)


@pytest.mark.parametrize("ci", [None, "", "false"])
def test_without_slurm_the_cluster_tests_skip_saying_why(monkeypatch, tmp_path: Path, ci: str | None) -> None:
    module, cluster = _no_slurm_installed(monkeypatch, tmp_path)
    if ci is None:
        monkeypatch.delenv("CI", raising=False)
    else:
        monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.skip.Exception) as skipped:
        module.start_or_skip(cluster)
    assert str(skipped.value) == f"no SLURM cluster for the tests: {MISSING}; under CI=true this fails"


@pytest.mark.parametrize("ci", ["true", "TRUE", "1"])
def test_under_ci_a_missing_slurm_fails(monkeypatch, tmp_path: Path, ci: str) -> None:
    module, cluster = _no_slurm_installed(monkeypatch, tmp_path)
    monkeypatch.setenv("CI", ci)
    with pytest.raises(pytest.fail.Exception) as failed:
        module.start_or_skip(cluster)
    assert str(failed.value) == f"could not start a SLURM cluster for the tests: {MISSING}"


def test_a_cluster_that_breaks_fails_even_outside_ci(monkeypatch, tmp_path: Path) -> None:
    module = _cluster_fixture_module()
    monkeypatch.delenv("CI", raising=False)

    class Broken(module.SlurmCluster):
        def start(self) -> None:
            raise module.ClusterError("slurmctld exited during start-up")

    with pytest.raises(pytest.fail.Exception, match="^could not start a SLURM cluster for the tests: slurmctld exited"):
        module.start_or_skip(Broken(tmp_path))


def test_ci_run_sets_ci_so_a_missing_slurm_fails_there() -> None:
    script = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    assert 'export CI="${CI:-true}"' in script
    assert script.index('export CI="${CI:-true}"') < script.index("nox -s tests")


# ---- a real cluster ------------------------------------------------------------------------------

STEPS = 12
SMALL = [
    "--trainer.devices=2", "--trainer.strategy=ddp", f"--trainer.max_steps={STEPS}", "--trainer.log_every_n_steps=1",
    "--trainer.val_check_interval=6", "--trainer.limit_val_batches=1", "--data.batch_size=4",
    "--data.samples_per_epoch=16",
]  # fmt: skip  # 2 ranks x 1 CPU, a few seconds of compute; data.num_workers stays the demo's 1

PROBE = '''\
"""Written by tests/launch/test_slurm.py: each optimizer step's loss (rank 0), and a pause per step."""
import json
import time

from lightning.pytorch import Callback


class Probe(Callback):
    def __init__(self, path: str, delay: float = 0.0) -> None:
        self.path, self.delay = path, delay

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        time.sleep(self.delay)
        if trainer.is_global_zero and not trainer.fit_loop._should_accumulate():
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": trainer.global_step, "loss": float(loss)}) + "\\n")
'''


def _launch(cluster, tmp: Path, run: Path, delay: float) -> str:
    """Submits the demo config through the launcher's command line (in this process: the config parse is
    then quick); returns the job id. The job inherits this environment: SLURM_CONF, PYTHONPATH."""
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "slurm_probe.py").write_text(PROBE)
    probe = tmp / "probe.yaml"
    probe.write_text(
        "trainer:\n  callbacks+:\n    - class_path: slurm_probe.Probe\n"
        f"      init_args: {{path: '{run / 'losses.jsonl'}', delay: {delay}}}\n"
    )
    argv = ["--config", CONFIG, "--config", str(probe), "--cpus-per-task", "1", "--time", "00:15:00",
            "--job-name", "kit-test", "--python", sys.executable, "--", f"--trainer.default_root_dir={run}", *SMALL]  # fmt: skip
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(ROOT)
        patch.syspath_prepend(str(tmp))
        for name, value in (cluster.env | {"PYTHONPATH": f"{tmp}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1"}).items():
            patch.setenv(name, value)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(argv)
    assert code == 0, err.getvalue()[-3000:]
    job = out.getvalue().strip().splitlines()[-1]
    assert job.isdigit(), out.getvalue()
    return job


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows]
    assert len(steps) == len(set(steps)), f"a step trained twice: {steps}"
    return {row["step"]: row["loss"] for row in rows}


def _scalar_steps(events: Path, tag: str = "train/loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events))
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def _global_step(checkpoint: Path) -> int:
    import torch

    return torch.load(checkpoint, map_location="cpu", weights_only=False)["global_step"]


def _log(run: Path, job: str) -> str:
    return (run / f"slurm-{job}.out").read_text(errors="replace")


@pytest.fixture(scope="module")
def straight_run(slurm_cluster, tmp_path_factory) -> tuple[Path, str, dict[str, str]]:
    """The demo config as a 2-task DDP job, left alone: (run folder, job id, its scontrol fields)."""
    tmp = tmp_path_factory.mktemp("straight")
    run = tmp / "run"
    job = _launch(slurm_cluster, tmp, run, delay=0.0)
    return run, job, slurm_cluster.wait(job)


@pytest.mark.slow
def test_a_ddp_job_of_the_demo_config_completes(straight_run) -> None:
    run, job, info = straight_run
    log = _log(run, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-4000:]}"
    assert info["Restarts"] == "0" and info["NumNodes"] == "1" and info["NumTasks"] == "2"
    assert (run / "job.sbatch").is_file()
    assert f"== SLURM job {job} restart 0" in log and "Starting with 2 processes" in log
    version = run / "lightning_logs" / f"version_{job}"  # Lightning names the version after the job
    assert _global_step(version / "checkpoints" / "last.ckpt") == STEPS
    (events,) = version.glob("events.out.tfevents.*")
    assert _scalar_steps(events) == list(range(STEPS))
    assert sorted(_losses(run)) == list(range(1, STEPS + 1))
    assert not list(run.glob("hpc_ckpt_*"))


@pytest.mark.slow
def test_sigusr1_checkpoints_requeues_and_the_job_resumes_to_max_steps(slurm_cluster, straight_run, tmp_path) -> None:
    run = tmp_path / "run"
    job = _launch(slurm_cluster, tmp_path, run, delay=0.4)
    losses = run / "losses.jsonl"
    deadline = time.monotonic() + 300
    while not (losses.exists() and len(losses.read_text().splitlines()) >= 4):
        state = slurm_cluster.job(job)["JobState"]
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} is {state} before the signal"
        assert time.monotonic() < deadline, "the job trained no 4 steps in 300 s"
        time.sleep(0.2)
    # to every task of the job's steps (srun's ranks), as --signal=SIGUSR1@90 does; `--batch` would
    # signal only the batch shell, which dies of it
    slurm_cluster.run(["scancel", "--signal=USR1", job])
    info = slurm_cluster.wait(job)
    log = _log(run, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-6000:]}"
    assert info["Restarts"] == "1", info

    # the first start checkpointed at a step boundary and requeued; the second resumed from it
    first, _, second = log.partition(f"== SLURM job {job} restart 1")
    assert f"== SLURM job {job} restart 0" in first and second, log[-6000:]
    hpc = run / "hpc_ckpt_1.ckpt"
    assert f"SIGUSR1 from SLURM: saving {hpc}" in first and f"requeued SLURM job {job}" in first
    assert "Traceback" not in first, first[-6000:]  # the ranks left quietly
    assert f"Restoring states from the checkpoint path at {hpc}" in second, second[-6000:]
    assert "data stream resumes" in second, second[-6000:]
    saved = _global_step(hpc)
    assert 4 <= saved < STEPS
    version = run / "lightning_logs" / f"version_{job}"
    assert _global_step(version / "checkpoints" / "last.ckpt") == STEPS

    # the loss logs go on from the checkpoint's step, in a second event file of the same version
    before, after = sorted(version.glob("events.out.tfevents.*"), key=lambda p: int(p.name.split(".")[3]))
    assert _scalar_steps(before) == list(range(saved)), (saved, _scalar_steps(before))
    assert _scalar_steps(after) == list(range(saved, STEPS)), (saved, _scalar_steps(after))

    # every step trained once, and exactly as in the run that was never interrupted
    losses = _losses(run)
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert losses == _losses(straight_run[0])


@pytest.mark.slow
def test_a_job_requeued_without_its_signal_checkpoint_resumes_from_the_runs_newest_one(
    slurm_cluster, straight_run, tmp_path
) -> None:
    run = tmp_path / "run"
    job = _launch(slurm_cluster, tmp_path, run, delay=0.4)
    version = run / "lightning_logs" / f"version_{job}"
    last = version / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists():  # written at the first validation (step 6)
        state = slurm_cluster.job(job)["JobState"]
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {job} is {state} before the requeue"
        assert time.monotonic() < deadline, "the job wrote no last.ckpt in 300 s"
        time.sleep(0.2)
    # as a node failure or a preemption would: the job is stopped (SIGTERM, SIGKILL KillWait later) and
    # queued again, with no SIGUSR1 and so no hpc_ckpt_N.ckpt
    slurm_cluster.run(["scontrol", "requeue", job])
    info = slurm_cluster.wait(job)
    log = _log(run, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log[-6000:]}"
    assert info["Restarts"] == "1", info
    assert not list(run.glob("hpc_ckpt_*"))

    # the second start resumed with --ckpt_path=last from the first start's folder, and logged into it
    first, _, second = log.partition(f"== SLURM job {job} restart 1")
    assert f"== SLURM job {job} restart 0" in first and second, log[-6000:]
    resumed = re.search(r"--ckpt_path last: resuming from (\S+) \(step (\d+)\)", second)
    assert resumed, second[-6000:]
    assert Path(resumed.group(1)).parent == version / "checkpoints"
    assert 6 <= int(resumed.group(2)) < STEPS
    assert f"Restoring states from the checkpoint path at {resumed.group(1)}" in second, second[-6000:]
    assert sorted(p.name for p in (run / "lightning_logs").iterdir()) == [version.name]
    assert _global_step(last) == STEPS

    # every step trained (those after the checkpoint maybe twice), each as in the uninterrupted job
    rows = [json.loads(line) for line in (run / "losses.jsonl").read_text().splitlines()]
    reference = _losses(straight_run[0])
    assert {row["step"] for row in rows} == set(range(1, STEPS + 1))
    differ = [row for row in rows if row["loss"] != reference[row["step"]]]
    assert not differ, f"steps whose loss differs from the uninterrupted job's: {differ}"
