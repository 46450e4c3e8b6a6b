"""`python -m src.launch.sweep plan|run|run-one|collect`: the command line over the sweep package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from src.launch.sweep import __doc__ as PACKAGE_DOC
from src.launch.sweep.array import run_slurm
from src.launch.sweep.collect import collect
from src.launch.sweep.folders import prepare, status
from src.launch.sweep.plan import Run, base_config, plan, run_config, wants_test
from src.launch.sweep.run import run_local, run_one
from src.launch.sweep.spec import Sweep, SweepError, dump_spec, load_spec


def _print_plan(sweep: Sweep, runs: Sequence[Run]) -> None:
    base = base_config(sweep)
    print(f"sweep {sweep.spec_path or ''} -> {sweep.out}: {len(runs)} runs")
    for run in runs:
        config = run_config(sweep, run, base)
        tested = "fit+test" if wants_test(sweep.test, config) else "fit"
        print(f"  {run.index:>3}  {run.name:<50} {status(run.path):<8} {tested}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.launch.sweep", description=PACKAGE_DOC.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plan", help="list the runs and their status")
    p.add_argument("spec")
    p.add_argument("--out", help="the sweep's folder (default: the spec's `out`)")
    p.add_argument("--write", action="store_true", help="also write the run folders and configs")
    p.add_argument("--print_config", action="store_true", help="print the parsed spec as YAML and exit")
    p = sub.add_parser("run", help="run the unfinished runs: here (--local) or as a SLURM job array (--slurm)")
    p.add_argument("spec")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--local", action="store_true", help="one after another on this machine")
    where.add_argument("--slurm", action="store_true", help="one job array through src.launch.slurm")
    p.add_argument("--slurm-config", help="SLURM settings (YAML) for src.launch.slurm.load_settings")
    p.add_argument("--max-parallel", type=int, help="--slurm: array tasks running at once (--array=...%%N)")
    p.add_argument("--out", help="the sweep's folder (default: the spec's `out`)")
    p.add_argument("--dry-run", action="store_true", help="write the run folders, print what would run")
    p.add_argument("--stream", action="store_true", help="--local: runs' output here, not in RUN/run.log")
    p.add_argument("--print_config", action="store_true", help="print the parsed spec as YAML and exit")
    p = sub.add_parser("run-one", help="run line INDEX of SWEEP/runs.txt in this process (what array tasks do)")
    p.add_argument("--sweep", required=True, help="the sweep's folder")
    p.add_argument("--index", required=True, type=int)
    p = sub.add_parser("collect", help="results.csv/.md, summary.md, loss_curves.png and scores.png of a sweep")
    p.add_argument("target", help="a sweep spec, or a sweep's folder")
    p.add_argument("--out", help="the sweep's folder when a spec is given (default: the spec's `out`)")
    p.add_argument("--bench", help="regular expression: the benchmark columns kept (default: all), e.g. '/all/'")
    p.add_argument("--no-plot", action="store_true", help="tables only (no matplotlib needed)")
    args = parser.parse_args(argv)
    try:
        if args.command == "run-one":
            run_one(args.sweep, args.index)
            return 0
        if args.command == "collect":
            collect(args.target, out=args.out, plot=not args.no_plot, bench=args.bench)
            return 0
        sweep = load_spec(args.spec, out=args.out)
        if args.print_config:
            print(dump_spec(sweep), end="")
            return 0
        runs = plan(sweep)
        if args.command == "plan":
            if args.write:
                prepare(sweep, runs)
            _print_plan(sweep, runs)
            return 0
        if args.local:
            failed = run_local(sweep, runs, dry_run=args.dry_run, stream=args.stream)
            if failed:
                print(f"{failed} run(s) failed; run the sweep again to retry them")
            return 1 if failed else 0
        if args.max_parallel is not None and args.max_parallel < 1:
            raise SweepError("--max-parallel must be at least 1")
        run_slurm(sweep, runs, args.slurm_config, dry_run=args.dry_run, max_parallel=args.max_parallel)
        return 0
    except SweepError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
