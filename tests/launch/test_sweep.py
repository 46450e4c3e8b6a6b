"""Sweeps (src/launch/sweep/): specs, names, run configs, SLURM arrays through a fake launcher, and
the demo sweep end to end on the CPU: plan, run --local, a rerun that skips every run, collect."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from src.launch.sweep import (
    Sweep,
    SweepError,
    collect,
    load_spec,
    plan,
    prepare,
    run_config,
    run_one,
    run_slurm,
    status,
)
from src.launch.sweep.array import array_ranges
from src.launch.sweep.cli import main
from src.launch.sweep.names import column_labels, compact, value_labels
from src.launch.sweep.plan import wants_test
from src.launch.sweep.results import NUMERIC, run_result
from src.launch.sweep.stats import t_quantile, t_two_sided_p, welch

ROOT = Path(__file__).resolve().parents[2]
DEMO_SPEC = ROOT / "experiments/sweeps/demo_projectors.yaml"
PROJECTORS_SPEC = ROOT / "experiments/sweeps/projectors.yaml"
ALL_PROJECTORS = {"linear", "mlp", "pixel_shuffle", "avgpool", "resampler", "c_abstractor", "ldp"}


def _spec(tmp_path: Path, **extra) -> Sweep:
    raw = {
        "base": ["lightning_config.yaml"],
        "grid": {
            "model.projector": [
                {"name": "linear"},
                {"name": "pixel_shuffle", "kwargs": {"factor": 2}},
                {"name": "ldp"},
            ],
            "seed_everything": [0, 1],
        },
        "overrides": {"trainer": {"max_steps": 5}, "data.seed": "${seed_everything}"},
        "out": str(tmp_path / "sweep"),
        **extra,
    }
    return load_spec(raw, cwd=ROOT)


def test_plan_is_the_grid_in_order_named_by_its_values(tmp_path: Path) -> None:
    sweep = _spec(tmp_path)
    runs = plan(sweep)
    assert [r.name for r in runs] == [
        f"projector={p}-seed={s}" for p in ("linear", "pixel_shuffle", "ldp") for s in (0, 1)
    ]
    assert [r.index for r in runs] == list(range(6))
    assert runs[2].labels == {"projector": "pixel_shuffle", "seed": "0"}
    assert runs[2].path == tmp_path / "sweep" / "projector=pixel_shuffle-seed=0"
    assert plan(sweep) == runs  # stable


def test_names_tell_apart_values_that_share_a_name_and_stay_filesystem_safe() -> None:
    values = [{"name": "mlp", "kwargs": {"depth": 1}}, {"name": "mlp", "kwargs": {"depth": 3}}, {"name": "linear"}]
    assert value_labels(values) == ["mlp_depth1", "mlp_depth3", "linear"]
    assert value_labels([[0.9, 0.95], [0.9, 0.999]]) == ["0.9_0.95", "0.9_0.999"]
    assert value_labels(["a/b c", "a/b c"]) == ["a_b_c_0", "a_b_c_1"]
    assert column_labels(["model.optimizer.lr", "seed_everything", "a.width", "b.width"]) == {
        "model.optimizer.lr": "lr",
        "seed_everything": "seed",
        "a.width": "a.width",  # two keys would share `width`: both keep their whole key
        "b.width": "b.width",
    }


def test_random_draws_are_reproducible_in_range_and_crossed_with_the_grid(tmp_path: Path) -> None:
    space = {
        "model.optimizer.lr": {"log_uniform": [1e-5, 1e-3]},
        "model.optimizer.warmup_steps": {"int_uniform": [1, 9]},
    }
    sweep = _spec(tmp_path, random={"n": 3, "seed": 7, "space": space})
    runs = plan(sweep)
    assert len(runs) == 6 * 3
    first = [r.values for r in runs[:3]]
    assert [r.values["model.optimizer.lr"] for r in runs[3:6]] == [v["model.optimizer.lr"] for v in first]
    for r in runs:
        assert 1e-5 <= r.values["model.optimizer.lr"] <= 1e-3
        assert 1 <= r.values["model.optimizer.warmup_steps"] <= 9
        assert f"lr={compact(r.values['model.optimizer.lr'])}" in r.name
    assert [r.values for r in plan(sweep)] == [r.values for r in runs]
    other = plan(_spec(tmp_path, random={"n": 3, "seed": 8, "space": space}))
    assert [r.values for r in other] != [r.values for r in runs]


def test_run_config_replaces_swept_keys_and_points_into_the_run_folder(tmp_path: Path) -> None:
    sweep = _spec(tmp_path)
    run = plan(sweep)[5]  # ldp, seed 1
    config = run_config(sweep, run)
    assert config["model"]["projector"] == {"name": "ldp"}  # replaced: the base mlp's kwargs are gone
    assert config["seed_everything"] == 1 and config["data"]["seed"] == 1  # the interpolation resolved
    assert config["trainer"]["max_steps"] == 5
    assert config["trainer"]["default_root_dir"] == str(run.path)
    checkpoints = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    assert checkpoints and all(c["init_args"]["dirpath"] == str(run.path / "checkpoints") for c in checkpoints)
    assert config["trainer"]["logger"]["init_args"] == {"save_dir": str(run.path), "name": "logs", "version": "fit"}
    assert wants_test(None, config) and not wants_test(False, config)


def test_spec_errors_say_what_to_change(tmp_path: Path) -> None:
    ok = {"base": "lightning_config.yaml", "grid": {"seed_everything": [0]}, "out": str(tmp_path)}
    cases = [
        ({**ok, "gird": {}}, "unknown sweep spec key"),
        ({**ok, "base": "nope.yaml"}, "not found"),
        ({**ok, "grid": {"seed_everything": []}}, "non-empty list"),
        ({**ok, "grid": {}}, "needs `grid` or `random`"),
        ({**ok, "random": {"n": 2, "space": {"x": {"normal": [0, 1]}}}}, "one of"),
        ({**ok, "random": {"n": 2, "space": {"x": {"log_uniform": [0, 1]}}}}, "low > 0"),
        ({k: v for k, v in ok.items() if k != "out"}, "needs `out`"),
    ]
    for raw, message in cases:
        with pytest.raises(SweepError, match=message):
            load_spec(raw, cwd=ROOT)
    typo = load_spec({**ok, "grid": {"modle.projector": [{"name": "linear"}]}}, cwd=ROOT)
    with pytest.raises(SweepError, match="modle"):
        prepare(typo, plan(typo))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"gird": {"x": [1]}},
            "the sweep spec: Option 'gird.x' is not accepted \\(unknown sweep spec key\\); a sweep spec has base",
        ),
        ({"test": "maybe"}, 'the sweep spec: Parser key "test": Does not validate against any of the Union subtypes'),
        ({"grid": [1]}, "the sweep spec: Parser key \"grid\": .*Expected a <class 'dict'>.* Given value: \\[1\\]"),
    ],
)
def test_spec_keys_and_types_are_checked_by_jsonargparse_in_one_line(tmp_path: Path, extra: dict, message: str) -> None:
    ok = {"base": "lightning_config.yaml", "grid": {"seed_everything": [0]}, "out": str(tmp_path)}
    with pytest.raises(SweepError, match=message) as error:
        load_spec({**ok, **extra}, cwd=ROOT)
    assert "\n" not in str(error.value)


def test_print_config_prints_the_parsed_spec(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(ROOT)
    assert main(["plan", str(DEMO_SPEC), "--out", str(tmp_path / "demo"), "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    written = yaml.safe_load(DEMO_SPEC.read_text())
    assert printed["base"] == [str(ROOT / b) for b in written["base"]] and printed["out"] == str(tmp_path / "demo")
    assert printed["grid"] == written["grid"] and printed["overrides"] == written["overrides"]  # values as written
    assert printed["test"] == written.get("test", "auto")
    assert not (tmp_path / "demo").exists()  # printing plans nothing


def test_array_ranges() -> None:
    assert array_ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"
    assert array_ranges([3]) == "3"
    assert array_ranges([4, 2, 3, 3]) == "2-4"


def test_prepare_writes_the_folders_and_guards_changed_configs(tmp_path: Path, capsys) -> None:
    sweep = _spec(tmp_path)
    runs = plan(sweep)
    statuses = prepare(sweep, runs)
    assert set(statuses.values()) == {"pending"}
    assert (sweep.out / "runs.txt").read_text().splitlines() == [str(r.path) for r in runs]
    assert yaml.safe_load((runs[0].path / "config.yaml").read_text())["model"]["projector"] == {"name": "linear"}
    (runs[0].path / "DONE").write_text("{}")
    (runs[1].path / "checkpoints").mkdir()
    (runs[1].path / "checkpoints" / "last.ckpt").write_text("")
    assert status(runs[0].path) == "done" and status(runs[1].path) == "partial"
    changed = _spec(tmp_path, overrides={"trainer": {"max_steps": 7}})
    with pytest.raises(SweepError, match="checkpoints of a different config"):
        prepare(changed, plan(changed))
    assert "is done with a different config" in capsys.readouterr().out
    assert "max_steps: 5" in (runs[0].path / "config.yaml").read_text()  # a finished run's config is kept


# ---- SLURM: src.launch.slurm's render, with submit replaced ---------------------------------------


def _srun_line(script: str) -> str:
    (line,) = [line for line in script.splitlines() if line.startswith("srun ")]
    return line


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_slurm_submits_one_array_over_the_unfinished_runs(tmp_path: Path, monkeypatch) -> None:
    from src.launch import slurm

    submitted = []
    monkeypatch.setattr(slurm, "submit", lambda script, run_dir: submitted.append((script, run_dir)) or "4242")
    sweep = _spec(tmp_path, overrides={"trainer": {"devices": 2, "num_nodes": 2}})
    runs = plan(sweep)
    prepare(sweep, runs)
    for done in (runs[1], runs[2]):
        (done.path / "DONE").write_text("{}")
    assert run_slurm(sweep, runs, {"partition": "big", "time": "02:00:00"}) == ["4242"]
    ((script, run_dir),) = submitted
    assert run_dir == sweep.out
    for line in ("--array=0,3-5", "--nodes=2", "--ntasks-per-node=2", "--partition=big", "--time=02:00:00"):
        assert f"#SBATCH {line}" in script
    assert "4242\t0,3-5" in (sweep.out / "slurm_jobs.txt").read_text()
    # the array task's command: its index picks line i of runs.txt, whatever the shell quoting
    srun = _srun_line(script)
    assert "src.launch.sweep run-one" in srun and "src.cli" not in srun
    words = srun.split(" python ", 1)[1]
    echoed = subprocess.run(
        ["bash", "-c", f"printf '%s\\n' {words}"], env={**os.environ, "SLURM_ARRAY_TASK_ID": "3"},
        capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    assert echoed == ["-m", "src.launch.sweep", "run-one", "--sweep", str(sweep.out), "--index", "3"]
    assert (sweep.out / "runs.txt").read_text().splitlines()[3] == str(runs[3].path)
    assert run_one(sweep.out, 1) == "done"  # a finished run: nothing to do

    # --dry-run through the command line: the script is printed, nothing is submitted
    settings = tmp_path / "cluster.yaml"
    settings.write_text("slurm:\n  partition: small\n  setup: [source .venv/bin/activate]\n")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), monkeypatch.context() as m:
        m.chdir(ROOT)
        code = main(["run", str(DEMO_SPEC), "--slurm", "--slurm-config", str(settings), "--dry-run",
                        "--out", str(tmp_path / "demo"), "--max-parallel", "3"])  # fmt: skip
    printed = out.getvalue()
    assert code == 0 and len(submitted) == 1, printed
    for line in ("--array=0-7%3", "--nodes=1", "--ntasks-per-node=1", "--partition=small", "--job-name=sweep-demo"):
        assert f"#SBATCH {line}" in printed
    assert "source .venv/bin/activate" in printed and "run-one --sweep" in printed


@pytest.mark.filterwarnings("ignore:LightningCLI's args parameter")
def test_the_projector_ablation_spec_plans_7_projectors_x_3_seeds_and_every_config_parses(tmp_path: Path) -> None:
    from src.cli import main as cli_main

    sweep = load_spec(PROJECTORS_SPEC, out=tmp_path / "projectors", cwd=ROOT)
    runs = plan(sweep)
    assert len(runs) == 21
    assert {r.labels["projector"] for r in runs} == ALL_PROJECTORS
    assert {r.labels["seed"] for r in runs} == {"0", "1", "2"}
    prepare(sweep, runs)
    for run in runs:
        if run.labels["seed"] != "0":
            continue
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            cli_main(["fit", "--config", str(run.path / "config.yaml"), "--print_config"])
        assert exit_info.value.code in (0, None), out.getvalue()[-2000:]
        config = yaml.safe_load(out.getvalue())
        assert config["model"]["projector"]["name"] == run.labels["projector"]
        assert config["data"]["seed"] == 0 and config["data"]["val_shards"]
        dirs = [c["init_args"]["dirpath"] for c in config["trainer"]["callbacks"] if "dirpath" in c["init_args"]]
        assert dirs and all(d == str(run.path / "checkpoints") for d in dirs)  # not the recipe's shared folder


def test_the_projector_ablation_runs_are_those_of_the_whole_recipe_file_it_replaced(tmp_path: Path) -> None:
    """The spec names the 7B stage-1 recipe, whose own `base:` brings the LLaVA-1.5 base and stage overlay:
    every run's config equal to the one planned on the whole file the recipe was before it was composed
    (tests/fixtures/recipes/), and to the three parts named in the spec's `base:` one by one."""
    raw = yaml.safe_load(PROJECTORS_SPEC.read_text())
    assert raw["base"] == ["experiments/llava15_7b/stage1_align.yaml"]
    whole = ["tests/fixtures/recipes/llava15_7b/stage1_align.yaml"]
    parts = ["experiments/llava15/base.yaml", "experiments/llava15/stage1_align.yaml", *raw["base"]]
    configs = {}
    for name, base in (("spec", raw["base"]), ("whole", whole), ("parts", parts)):
        sweep = load_spec({**raw, "base": base}, out=tmp_path / "projectors", cwd=ROOT)
        configs[name] = [run_config(sweep, run) for run in plan(sweep)]
    assert len(configs["spec"]) == 21 and "base" not in configs["spec"][0]
    assert configs["spec"][0]["model"]["llm"]["name"] == "lmsys/vicuna-7b-v1.5"  # the size file's
    assert configs["spec"][0]["model"]["optimizer"]["lr"] == 1.0e-3  # the stage overlay's
    assert configs["spec"] == configs["whole"] == configs["parts"]


def test_a_base_configs_own_base_error_stops_the_spec_naming_the_file(tmp_path: Path) -> None:
    config = tmp_path / "configs/run.yaml"
    config.parent.mkdir()
    config.write_text("base: [missing.yaml]\ntrainer: {max_steps: 1}\n")
    raw = {"base": str(config), "grid": {"seed_everything": [0]}, "out": str(tmp_path / "out")}
    with pytest.raises(SweepError, match=re.escape(f"{config}: `base` entry 'missing.yaml' is not a file")):
        load_spec(raw, cwd=ROOT)


# ---- end to end on the CPU ----------------------------------------------------------------------


def _sweep_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # one thread per run: tiny models on a shared 2-core machine run about twice as fast so
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "src.launch.sweep", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env=env,
    )  # fmt: skip


@pytest.mark.slow
def test_demo_sweep_runs_skips_when_rerun_and_collects(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    planned = _sweep_cli("plan", str(DEMO_SPEC), "--out", str(out))
    assert planned.returncode == 0, planned.stderr
    names = [line.split()[1] for line in planned.stdout.splitlines()[1:]]
    assert len(names) == 8 and all(n.startswith("projector=") for n in names)

    ran = _sweep_cli("run", str(DEMO_SPEC), "--local", "--out", str(out))
    assert ran.returncode == 0, ran.stdout[-3000:] + ran.stderr[-3000:]
    for name in names:
        assert (out / name / "DONE").is_file(), (out / name / "run.log").read_text()[-3000:]
        assert (out / name / "config.yaml").is_file() and (out / name / "facts.json").is_file()

    started = time.perf_counter()
    again = _sweep_cli("run", str(DEMO_SPEC), "--local", "--out", str(out))
    assert again.returncode == 0 and "8 done, 0 to run" in again.stdout, again.stdout + again.stderr
    assert time.perf_counter() - started < 30  # no run started: no model, no Lightning

    collected = _sweep_cli("collect", str(out))
    assert collected.returncode == 0, collected.stderr
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == names
    assert {r["projector"] for r in rows} >= {"linear", "mlp", "pixel_shuffle"} and len(
        {r["projector"] for r in rows}
    ) == 4
    assert {r["seed"] for r in rows} == {"0", "1"}
    for row in rows:
        assert row["status"] == "done"
        for column in NUMERIC:
            assert row[column] != "", (row["run"], column)
            value = float(row[column])
            assert value == value and value >= 0, (row["run"], column)
        assert 0.0 <= float(row["test_accuracy"]) <= 1.0 and float(row["train_loss"]) > 0
        tokens = {"linear": 4, "mlp": 4, "pixel_shuffle": 1, "ldp": 1}[row["projector"]]  # a 2x2 patch grid
        assert float(row["image_tokens_per_sample"]) == pytest.approx(tokens)
        assert int(row["steps"]) == 6
    by_projector = {r["projector"]: int(r["trainable_params"]) for r in rows}
    assert by_projector["linear"] < by_projector["mlp"]  # a second layer of 128 x 128
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| run | projector | seed |") and len(table) == 2 + len(names)
    assert "± " in (out / "summary.md").read_text()
    with Image.open(out / "loss_curves.png") as image:
        image.load()
        assert image.size[0] >= 600 and image.size[1] >= 300
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50  # curves, bands, text: not blank


@pytest.mark.slow
def test_a_failing_run_is_recorded_and_the_table_shows_it(tmp_path: Path) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(
        "base: [lightning_config.yaml]\n"
        "grid: {model.projector: [{name: pixel_shuffle, kwargs: {factor: 3}}]}\n"  # 3 does not divide 2x2
        f"out: {tmp_path / 'bad'}\n"
    )
    ran = _sweep_cli("run", str(spec), "--local")
    assert ran.returncode == 1 and "FAILED" in ran.stdout, ran.stdout + ran.stderr
    run_dir = tmp_path / "bad" / "projector=pixel_shuffle"
    assert "does not divide" in (run_dir / "FAILED").read_text()
    assert status(run_dir) == "failed"
    collect(tmp_path / "bad", plot=False)
    with open(tmp_path / "bad" / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["status"] == "failed" and row["train_loss"] == ""


# ---- statistics and benchmark columns on synthetic run folders ------------------------------------

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        20: 2.086, 30: 2.042}  # t(0.975, df), printed tables (e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2)  # fmt: skip


def test_t_quantiles_equal_the_printed_table_and_scipy_where_installed() -> None:
    for df, value in T975.items():
        assert t_quantile(0.975, df) == pytest.approx(value, abs=5e-4), df
    assert t_quantile(0.95, 4) == pytest.approx(2.132, abs=5e-4)
    try:
        from scipy import stats
    except ImportError:
        return
    for df in (1, 2, 3.5, 7, 29.2, 200):
        assert t_quantile(0.975, df) == pytest.approx(stats.t.ppf(0.975, df), rel=1e-9)
        assert t_two_sided_p(1.7, df) == pytest.approx(2 * stats.t.sf(1.7, df), rel=1e-9)


def _closed_form_p(t: float, df: int) -> float:
    """P(|T| >= t) for even df (Abramowitz & Stegun 26.7.4), independent of the incomplete beta."""
    theta = math.atan(abs(t) / math.sqrt(df))
    term, total = 1.0, 1.0
    for k in range(1, df // 2):
        term *= (2 * k - 1) / (2 * k) * math.cos(theta) ** 2
        total += term
    return 1.0 - math.sin(theta) * total


def test_welch_equals_the_closed_form_where_its_degrees_of_freedom_are_whole() -> None:
    a, b = [1.0, 2.0, 3.0], [2.5, 3.5, 4.5]  # equal n and variance: Welch's df = 2 (n - 1) = 4
    t = (2.0 - 3.5) / math.sqrt(1.0 / 3 + 1.0 / 3)
    assert welch(a, b) == pytest.approx(_closed_form_p(t, 4), rel=1e-10)
    assert t_two_sided_p(2.0, 6) == pytest.approx(_closed_form_p(2.0, 6), rel=1e-10)
    assert welch([1.0], [2.0, 3.0]) is None
    assert welch([1.0, 1.0], [1.0, 1.0]) == 1.0 and welch([1.0, 1.0], [2.0, 2.0]) == 0.0


def _write_run(run_dir: Path, scalars: dict[str, list[tuple[int, float]]]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "logs" / "fit"))
    for tag, points in scalars.items():
        for step, value in points:
            writer.add_scalar(tag, value, global_step=step)
    writer.close()
    (run_dir / "DONE").write_text("{}")


ACCURACY = {"linear": [60.0, 62.0, 61.0], "mlp": [70.0, 71.5, 69.0], "ldp": [61.0, 59.0, 63.5]}
MME = {"linear": [900.0, 950.0, 925.0], "mlp": [1000.0, 990.0, 1010.0], "ldp": [940.0, 935.0, 960.0]}


def test_collect_adds_benchmark_columns_confidence_intervals_and_marks_real_differences(tmp_path: Path) -> None:
    raw = {"base": ["lightning_config.yaml"], "grid": {"model.projector": [{"name": p} for p in ACCURACY],
           "seed_everything": [0, 1, 2]}, "out": str(tmp_path / "sweep")}  # fmt: skip
    sweep = load_spec(raw, cwd=ROOT)
    runs = plan(sweep)
    prepare(sweep, runs)
    for run in runs:
        projector, seed = run.labels["projector"], int(run.labels["seed"])
        accuracy = ACCURACY[projector][seed]
        _write_run(run.path, {"train/loss": [(0, 2.0), (5, 1.0 + seed / 10)],
                              "bench/pope/all/accuracy": [(3, accuracy - 20), (6, accuracy)],
                              "bench/pope/failures": [(6, 3.0)]})  # fmt: skip
        report = {"benchmark": "mme", "method": "m", "rows": {"Perception": {"score": MME[projector][seed]}}}
        (run.path / "eval" / "mme").mkdir(parents=True)
        (run.path / "eval" / "mme" / "report.json").write_text(json.dumps(report))
        stale = {"benchmark": "pope", "step": 3, "rows": {"all": {"accuracy": -1.0}}}  # BenchmarkEval's own file
        (run.path / "logs" / "fit" / "bench").mkdir(parents=True)
        (run.path / "logs" / "fit" / "bench" / "report.json").write_text(json.dumps(stale))
    written = collect(sweep.out)
    with open(sweep.out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[-2:] == ["bench/pope/all/accuracy", "bench/mme/Perception/score"]  # no failure counts
    for row in rows:
        accuracy = ACCURACY[row["projector"]][int(row["seed"])]
        assert float(row["bench/pope/all/accuracy"]) == pytest.approx(accuracy, abs=1e-4)  # the last step's
        assert float(row["bench/mme/Perception/score"]) == MME[row["projector"]][int(row["seed"])]

    text = (sweep.out / "summary.md").read_text()
    lines = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| projector=")}
    header = [c.strip() for c in text.splitlines()[0].strip("|").split("|")]
    for projector, values in ACCURACY.items():
        mean, sd = statistics.fmean(values), statistics.stdev(values)
        half = T975[2] * sd / math.sqrt(3)  # the printed t table, not the code's quantile
        cells = [c.strip() for c in lines[f"projector={projector}"].strip("|").split("|")]
        cell = cells[header.index("bench/pope/all/accuracy")]
        numbers = [float(x) for x in re.findall(r"-?\d+\.\d+", cell)]
        assert numbers == pytest.approx([mean, sd, mean - half, mean + half], abs=0.006), cell
    # mlp is best on both benchmarks and clearly above; linear and ldp overlap: not told apart
    assert "**" in lines["projector=mlp"].split(" | ")[-2]
    assert lines["projector=linear"].split(" | ")[-2].endswith("*") and lines["projector=ldp"].split(" | ")[
        -2
    ].endswith("*")
    p = welch(ACCURACY["mlp"], ACCURACY["linear"])
    assert f"- bench/pope/all/accuracy: projector=mlp > projector=linear (Welch p = {p:.3g})" in text
    assert "projector=linear > projector=ldp" not in text and "projector=ldp > projector=linear" not in text
    assert welch(ACCURACY["linear"], ACCURACY["ldp"]) > 0.05
    with Image.open(written["scores"]) as image:
        image.load()
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 50

    collect(sweep.out, plot=False, bench="mme")
    with open(sweep.out / "results.csv") as f:
        assert [c for c in next(csv.reader(f)) if c.startswith("bench/")] == ["bench/mme/Perception/score"]
    with pytest.raises(SweepError, match="not a regular expression"):
        collect(sweep.out, plot=False, bench="(")


def test_the_cpu_ablation_spec_plans_4_projectors_x_3_seeds_tested(tmp_path: Path) -> None:
    sweep = load_spec(ROOT / "experiments/sweeps/demo_ablation.yaml", out=tmp_path / "ablation", cwd=ROOT)
    runs = plan(sweep)
    assert {(r.labels["projector"], r.labels["seed"]) for r in runs} == {
        (p, s) for p in ("linear", "mlp", "pixel_shuffle", "ldp") for s in ("0", "1", "2")
    }
    config = run_config(sweep, runs[-1])
    assert wants_test(sweep.test, config) and config["data"]["seed"] == 2
    assert config["trainer"]["limit_test_batches"] == 1.0 and config["trainer"]["max_steps"] == 1000


def test_image_tokens_per_sample_is_the_counted_placeholders_when_logged(tmp_path: Path) -> None:
    """anyres unpad: an image's tokens follow its size, so views x tokens per view overcounts; the
    telemetry's `perf/image_tokens_per_sample` (placeholders counted in the batch) wins when logged."""
    raw = {"base": ["lightning_config.yaml"], "grid": {"seed_everything": [0]}, "out": str(tmp_path / "sweep")}
    sweep = load_spec(raw, cwd=ROOT)
    (run,) = plan(sweep)
    prepare(sweep, [run])
    (run.path / "facts.json").write_text(json.dumps({"image_tokens_per_view": 576}))
    views = {"perf/images_per_s": [(1, 5.0), (2, 5.0)], "perf/samples_per_s": [(1, 1.0), (2, 1.0)]}
    _write_run(run.path, views)
    assert run_result(run.path, run.name, run.labels).values["image_tokens_per_sample"] == 576 * 5
    _write_run(run.path, {**views, "perf/image_tokens_per_sample": [(1, 2340.0), (2, 1306.0)]})
    assert run_result(run.path, run.name, run.labels).values["image_tokens_per_sample"] == (2340 + 1306) / 2
