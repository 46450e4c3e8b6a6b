"""ScienceQA as in the paper: convert the official release, score predictions per category.

    python -m src.eval.scienceqa convert --root data/scienceqa --split test --format CQM-A --out shards/sqa_test
    python -m src.cli predict --config ... --ckpt_path ... (over those shards, writing preds.jsonl)
    python -m src.eval.scienceqa score --root data/scienceqa --split test --predictions preds.jsonl \\
        --out reports/sqa [--judge experiments/eval/judge.yaml]

`score` reads each prediction's option by LLaVA's `eval_science_qa.py` rule, exactly (the
`official` mode of `src/eval/answers.py`), and reports accuracy overall and by the paper's
columns (NAT SOC LAN | TXT IMG NO | G1-6 G7-12) as a Markdown table and JSON; `--lenient` adds
a row, labelled, read by the kit's more forgiving `lenient` mode. A reply with no readable option (a *failure*) and a question
with no prediction at all (*missing*) both count as wrong, and both are listed in the report,
so a broken generation run cannot pass for a weak model. With `--judge`, a text-only judge
LLM answers every question too and settles the questions where the two disagree (the
paper's "GPT-4 as the judge" ensemble, `src/eval/scienceqa_judge.py`, replies read `official`
too): the report gains a row.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from src.eval.answers import read_answers, read_choice
from src.eval.scienceqa_data import CATEGORIES, FORMATS, OPTIONS, Release, categories, convert, load_release
from src.eval.scienceqa_metric import FAILED_BIT, MISSING_BIT, ScienceQAAccuracy, category_mask

COLUMNS = (*CATEGORIES, "Avg")


def score_choices(release: Release, pids: list[str], choices: dict[str, int | None], missing: set[str]) -> dict:
    """Accuracy (percent, 2 decimals as the paper) per column, and counts, of chosen options
    (None: no option read) for the split's pids; a pid in `missing` has no prediction."""
    metric = ScienceQAAccuracy()
    predicted, answer, masks = [], [], []
    for pid in pids:
        problem = release.problems[pid]
        choice = choices.get(pid)
        mask = category_mask(categories(problem))
        if pid in missing:
            mask |= MISSING_BIT
        elif choice is None:
            mask |= FAILED_BIT
        predicted.append(-1 if choice is None else choice)
        answer.append(int(problem["answer"]))
        masks.append(mask)
    if pids:
        metric.update(torch.tensor(predicted), torch.tensor(answer), torch.tensor(masks))
    return table_row(metric.compute() if pids else {})


def table_row(computed: dict[str, torch.Tensor]) -> dict:
    """The metric's output as the report keeps it: percent with 2 decimals (None: empty column)."""
    scores, counts = {}, {}
    for name in COLUMNS:
        value = computed.get(name)
        scores[name] = None if value is None or torch.isnan(value) else round(100 * float(value), 2)
    for key, value in computed.items():
        if key.startswith("count/"):
            counts[key.removeprefix("count/")] = int(value)
    return {"scores": scores, "counts": counts}


def score_predictions(release: Release, split: str, answers: dict[str, dict], mode: str = "official") -> dict:
    """Reads each prediction's option (`mode`: see src/eval/answers.py) and scores the split;
    lists failures, missing and extra ids."""
    pids = release.split(split)
    wanted = set(pids)
    choices: dict[str, int | None] = {}
    failures, missing = [], []
    for pid in pids:
        if pid not in answers:
            missing.append(pid)
            continue
        text = answers[pid]["text"]
        choice = read_choice(text, len(release.problems[pid]["choices"]), mode)
        choices[pid] = choice
        if choice is None:
            failures.append({"id": pid, "answer": text})
    result = score_choices(release, pids, choices, set(missing))
    result["failures"] = failures
    result["missing"] = missing
    result["extra"] = sorted(key for key in answers if key not in wanted)
    result["choices"] = choices
    result["mode"] = mode
    return result


def markdown(rows: list[tuple[str, dict]], notes: list[str]) -> str:
    header = "| Method | " + " | ".join(COLUMNS) + " |"
    rule = "|---|" + "|".join("---:" for _ in COLUMNS) + "|"
    lines = [header, rule]
    for method, row in rows:
        cells = ["-" if row["scores"][c] is None else f"{row['scores'][c]:.2f}" for c in COLUMNS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines + [""] + [f"- {note}" for note in notes]) + "\n"


def _notes(result: dict, bad: dict, split: str) -> list[str]:
    counts = result["counts"]
    notes = [
        f"{counts.get('all', 0)} questions of split {split!r}: "
        + ", ".join(f"{name} {counts.get(name, 0)}" for name in CATEGORIES),
        "replies read by LLaVA's eval_science_qa.py rule (official; src/eval/answers.py)",
        f"failures (no option letter read, counted wrong): {len(result['failures'])}",
        f"missing predictions (counted wrong): {len(result['missing'])}"
        + (f", e.g. {', '.join(result['missing'][:5])}" if result["missing"] else ""),
    ]
    if result["extra"]:
        notes.append(f"predictions for ids outside the split (ignored): {len(result['extra'])}")
    if bad["bad_line"]:
        notes.append(f"prediction lines not read (no id or answer): {bad['bad_line']} (lines {bad['bad_lines'][:10]})")
    return notes


def write_report(
    out: Path | str,
    split: str,
    method: str,
    result: dict,
    bad: dict,
    judged: dict | None = None,
    lenient: dict | None = None,
) -> str:
    """Writes report.md and report.json to `out`; returns the Markdown. `result` is read
    `official` (the table's main row); `lenient`, when given, is a second, labelled row."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if result.get("mode", "official") != "official":
        raise ValueError("the report's main row is read by the official rule; pass other readings as `lenient`")
    rows = [(method, result)]
    notes = _notes(result, bad, split)
    if lenient is not None:
        rows.append((f"{method} (lenient reading)", lenient))
        notes.append(f"lenient reading: failures {len(lenient['failures'])} (official: {len(result['failures'])})")
    if judged is not None:
        rows.append((f"{method} + judge ({judged['judge_model']})", judged))
        notes.append("judge: " + ", ".join(f"{k} {v}" for k, v in judged["routes"].items()))
    text = markdown(rows, notes)
    (out / "report.md").write_text(text)
    report = {
        "split": split,
        "method": method,
        "reader": "official",
        "columns": list(COLUMNS),
        "scores": result["scores"],
        "counts": result["counts"],
        "failures": result["failures"],
        "missing": result["missing"],
        "extra": result["extra"],
        "unread_lines": bad["bad_lines"],
    }
    if lenient is not None:
        report["lenient"] = {k: lenient[k] for k in ("scores", "counts", "failures")}
    if judged is not None:
        report["judge"] = {k: judged[k] for k in ("judge_model", "scores", "counts", "routes", "usage")}
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n")
    return text


def _per_question(
    out: Path, release: Release, split: str, answers: dict, result: dict, judged: dict | None, lenient: dict | None
) -> None:
    with open(out / "per_question.jsonl", "w") as stream:
        for pid in release.split(split):
            problem = release.problems[pid]
            choice = result["choices"].get(pid)
            row = {
                "id": pid,
                "truth": OPTIONS[int(problem["answer"])],
                "answer": answers.get(pid, {}).get("text"),
                "read": None if choice is None else OPTIONS[choice],
                "correct": choice == int(problem["answer"]),
                "categories": categories(problem),
            }
            if lenient is not None:
                other = lenient["choices"].get(pid)
                row["read_lenient"] = None if other is None else OPTIONS[other]
            if judged is not None:
                outcome = judged["outcomes"].get(pid)
                row["judge"] = outcome
            stream.write(json.dumps(row, ensure_ascii=False) + "\n")


def score(
    root: Path | str,
    split: str,
    predictions: Path | str,
    out: Path | str,
    method: str | None = None,
    judge: Path | str | None = None,
    lenient: bool = False,
) -> str:
    """The `score` command: returns the Markdown it wrote. The table reads replies `official`;
    `lenient=True` adds a labelled row read by the lenient mode."""
    release = load_release(root)
    answers, bad = read_answers(predictions)
    if method is None:
        models = {a["model"] for a in answers.values() if a.get("model")}
        method = models.pop() if len(models) == 1 else Path(predictions).stem
    result = score_predictions(release, split, answers, "official")
    loose = score_predictions(release, split, answers, "lenient") if lenient else None
    judged = None
    if judge is not None:
        from src.eval.scienceqa_judge import run_ensemble

        judged = run_ensemble(release, split, answers, result, judge, Path(out))
        judged |= score_choices(release, release.split(split), judged["finals"], set(result["missing"]))
    text = write_report(out, split, method, result, bad, judged, loose)
    _per_question(Path(out), release, split, answers, result, judged, loose)
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m src.eval.scienceqa", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True)
    conv = commands.add_parser("convert", help="the release -> WebDataset shards + LLaVA JSON")
    conv.add_argument("--root", type=Path, required=True, help="folder with problems.json, pid_splits.json, images/")
    conv.add_argument("--split", default="test", help="a key of pid_splits.json (train, val, test, minival ...)")
    conv.add_argument("--format", default="CQM-A", choices=FORMATS, help="prompt format (the paper's names)")
    conv.add_argument("--out", type=Path, required=True, help="folder for the shards, sizes.json and the JSON")
    conv.add_argument("--prefix", default=None, help="shard name prefix (default scienceqa_<split>_<format>)")
    conv.add_argument("--max-count", type=int, default=10000, help="samples per shard at most")
    sc = commands.add_parser("score", help="predictions JSONL -> per-category table (Markdown + JSON)")
    sc.add_argument("--root", type=Path, required=True)
    sc.add_argument("--split", default="test")
    sc.add_argument(
        "--predictions", type=Path, required=True, help="JSONL: ours (id, answer) or LLaVA's (question_id, text)"
    )
    sc.add_argument("--out", type=Path, required=True, help="folder for report.md, report.json, per_question.jsonl")
    sc.add_argument("--method", default=None, help="row name (default: the predictions' model)")
    sc.add_argument(
        "--judge", type=Path, default=None, help="judge client YAML (src.core.chat_client.ChatConfig fields)"
    )
    sc.add_argument(
        "--lenient",
        action="store_true",
        help="add a row read by the lenient mode (src/eval/answers.py) beside the official reading",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from src.core.chat_client import ChatError  # a judge that cannot start (no key) is a usage error too

    try:
        if args.command == "convert":
            summary = convert(args.root, args.split, args.format, args.out, args.prefix, args.max_count)
            skipped = summary["skipped"]
            print(
                f"{summary['samples']} samples ({summary['images']} with an image, {summary['text_only']} text-only) "
                f"in {summary['shards']} shards {args.out}/{summary['prefix']}-*.tar; LLaVA JSON {summary['json']}"
                + (f"; skipped {sum(skipped.values())}: {skipped}" if skipped else "")
            )
            return
        print(score(args.root, args.split, args.predictions, args.out, args.method, args.judge, args.lenient), end="")
    except (FileNotFoundError, ValueError, ChatError) as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
