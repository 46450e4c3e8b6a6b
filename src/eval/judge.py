"""Judge-scored relative score, as the paper's LLaVA-Bench: a text-only LLM rates a reference
answer and the model's answer to each question, and the report gives model mean / reference
mean x 100, per category and overall.

    python -m src.eval.judge prepare --questions questions.jsonl --references answers_gpt4.jsonl --out bench.json
    python -m src.cli predict ... --data.predict_json bench.json --data.predict_images llava-bench/images
    python -m src.eval.judge --questions questions.jsonl --context context.jsonl \\
        --references answers_gpt4.jsonl --answers preds.jsonl --judge experiments/eval/judge.yaml --out reports/bench

Inputs, in LLaVA-Bench's own layouts:
- questions: JSONL `{question_id, image, text, category}`; category `conv`, `detail` or
  `complex` (also `conversation`, `complex_reasoning`, or with LLaVA's `llava_bench_` prefix);
- context: JSONL, one line per image, `{image | id, caption | captions, instances | boxes}`;
  boxes as `{category, bbox}` (LLaVA's COCO file), `{label, box}`, or ready strings;
- references and answers: `{question_id, text}` (LLaVA) or our predictions `{id, answer}`,
  matched to questions by id.

The judge sees what the paper's judge saw: the symbolic context (captions and boxes), the
question, answer 1 = the reference and answer 2 = the model, and a per-category rubric from
`src/eval/rubrics/`; it replies with the two scores (1-10) on its first line, then an
explanation. Scores are read leniently (`parse_scores`); a review they cannot be read from
is asked again, up to `--max-attempts`, and then reported with its text, never dropped in
silence. A question without a model answer or reference is reported, not scored.
Outputs: report.md, report.json and reviews.jsonl (LLaVA's review layout: question_id,
category, content, tuple), so LLaVA's `summarize_gpt_review.py` reads it too.

The benchmark registry runs the same functions as `llava_bench`
(`python -m src.eval convert|score llava_bench --root RELEASE ...`, src/eval/benchmarks/llava_bench.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
from importlib import resources
from pathlib import Path

from src.eval.answers import read_answers

log = logging.getLogger(__name__)

CATEGORIES = ("conv", "detail", "complex")
ALIASES = {
    "conversation": "conv",
    "complex_reasoning": "complex",
    "complex reasoning": "complex",
    "reasoning": "complex",
    "description": "detail",
    "detailed": "detail",
    "detailed_description": "detail",
}
CATEGORY_NAMES = {"conv": "Conversation", "detail": "Detail description", "complex": "Complex reasoning"}
BENCHMARK = "llava_bench"  # its name in the benchmark registry (src/eval/benchmarks/llava_bench.py)
ROW_COLUMNS = ("relative", "model_mean", "reference_mean")


# ---------------------------------------------------------------- judge configuration


def load_chat_config(path: Path | str):
    """A `ChatConfig` from a YAML file of its fields (a `client:` section, if present, holds them), parsed
    as the training CLI parses its configs (jsonargparse): a wrong type or an unknown field is a ValueError
    naming it."""
    from src.core.chat_client import ChatConfig
    from src.core.cli_config import load_dataclass

    return load_dataclass(ChatConfig, path, section="client")


# ---------------------------------------------------------------- reading scores

_LABEL = re.compile(r"\b(?:assistant|answer|response)\s*#?\s*[12]\b", re.IGNORECASE)
_OUT_OF = re.compile(r"(\d+(?:\.\d+)?)\s*(?:/\s*10|out\s+of\s+10)\b", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\d.])\d+(?:\.\d+)?(?!\.?\d)")


def parse_scores(review: str) -> tuple[float, float] | None:
    """The two scores (answer 1, answer 2) of a review, or None when they cannot be read.

    Read from the first line that holds a digit, as LLaVA reads the first line, but
    leniently: `8 6`, `8, 6`, `(8, 6)`, `**8 6**`, `Score: 8/10 and 6/10`, `Assistant 1: 8
    Assistant 2: 6`, `7.5 9`. The line must hold exactly two numbers once labels (`Assistant
    1`) and `/10` are set aside, both from 1 to 10; anything else is unreadable (and the
    review is asked again) rather than guessed at.
    """
    lines = [line for line in review.splitlines() if any(ch.isdigit() for ch in line)]
    if not lines:
        return None
    numbers = _numbers(lines[0])
    if len(numbers) == 1 and len(lines) > 1 and _labelled(lines[0], "1") and _labelled(lines[1], "2"):
        numbers += _numbers(lines[1])  # "Assistant 1: 8" and "Assistant 2: 6" on two lines
    if len(numbers) == 2 and all(1 <= n <= 10 for n in numbers):
        return numbers[0], numbers[1]
    return None


def _numbers(line: str) -> list[float]:
    return [float(n) for n in _NUMBER.findall(_OUT_OF.sub(r" \1 ", _LABEL.sub(" ", line)))]


def _labelled(line: str, which: str) -> bool:
    return any(match.group(0).endswith(which) for match in _LABEL.finditer(line))


# ---------------------------------------------------------------- inputs


def read_jsonl(path: Path | str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path} line {number} does not parse ({error})") from error
            if not isinstance(row, dict):
                raise ValueError(f"{path} line {number} is not a JSON object")
            rows.append(row)
    return rows


def canonical_category(name: str) -> str:
    key = str(name).strip().lower().removeprefix("llava_bench_")
    key = ALIASES.get(key, key)
    if key not in CATEGORIES:
        raise ValueError(
            f"unknown question category {name!r}; the rubrics are {list(CATEGORIES)} (or {sorted(ALIASES)})"
        )
    return key


def format_box(box) -> str:
    if isinstance(box, str):
        return box
    if isinstance(box, dict):
        label = box.get("category", box.get("label", box.get("name", "object")))
        coords = box.get("bbox", box.get("box", box.get("boxes")))
        if isinstance(coords, list):
            coords = "[" + ", ".join(f"{float(c):.3f}".rstrip("0").rstrip(".") or "0" for c in coords) + "]"
        return f"{label}: {coords}"
    return str(box)


def context_text(entry: dict) -> str:
    """Captions (one per line), a blank line, then one box per line."""
    captions = entry.get("captions", entry.get("caption", []))
    captions = [captions] if isinstance(captions, str) else list(captions or [])
    boxes = entry.get("instances", entry.get("boxes", [])) or []
    parts = ["\n".join(str(c) for c in captions)]
    if boxes:
        parts.append("\n".join(format_box(b) for b in boxes))
    return "\n\n".join(p for p in parts if p)


def index_context(rows: list[dict]) -> dict[str, dict]:
    """Context rows by image name and by id, whichever they have."""
    index = {}
    for row in rows:
        for key in ("image", "id", "image_id"):
            if row.get(key) is not None:
                index.setdefault(str(row[key]), row)
    return index


def load_rubrics(folder: Path | str | None = None) -> tuple[str, dict[str, str]]:
    """(system message, {category: rubric}) from `folder` or the packaged `src/eval/rubrics`."""
    base = Path(folder) if folder is not None else resources.files("src.eval") / "rubrics"
    read = lambda name: (base / name).read_text(encoding="utf-8").strip()  # noqa: E731
    return read("system.txt"), {c: read(f"{c}.txt") for c in CATEGORIES}


def review_prompt(context: str, question: str, reference: str, answer: str, rubric: str) -> str:
    """LLaVA's judge prompt layout (eval_gpt_review_visual.py), answer 1 the reference."""
    return (
        f"[Context]\n{context}\n\n"
        f"[Question]\n{question}\n\n"
        f"[Assistant 1]\n{reference}\n\n[End of Assistant 1]\n\n"
        f"[Assistant 2]\n{answer}\n\n[End of Assistant 2]\n\n"
        f"[System]\n{rubric}\n\n"
    )


# ---------------------------------------------------------------- reviewing


async def review_one(client, system: str, prompt: str, max_attempts: int) -> dict:
    """Asks until the scores read or `max_attempts` replies were unreadable; a client that
    gives up (ChatError) ends it with the error recorded."""
    from src.core.chat_client import ChatError

    replies: list[str] = []
    messages = [{"role": "system", "content": system}, {"role": "user", "content": prompt}]
    for _ in range(max_attempts):
        try:
            reply = await client.chat(messages)
        except ChatError as error:
            return {"scores": None, "replies": replies, "error": str(error)}
        replies.append(reply.text)
        scores = parse_scores(reply.text)
        if scores is not None:
            return {"scores": scores, "replies": replies, "error": None}
    return {"scores": None, "replies": replies, "error": "unreadable"}


async def _review_all(config, jobs: list[dict], system: str, max_attempts: int) -> tuple[list[dict], dict]:
    from src.core.chat_client import ChatClient

    async with ChatClient(config) as client:
        results = await asyncio.gather(*(review_one(client, system, job["prompt"], max_attempts) for job in jobs))
        return list(results), client.usage


def relative_scores(reviews: list[dict]) -> dict[str, dict]:
    """Per category and `all`: n, both means, and model mean / reference mean x 100 (1 decimal,
    as LLaVA's summary prints it)."""
    groups: dict[str, list[tuple[float, float]]] = {c: [] for c in CATEGORIES}
    for review in reviews:
        if review["scores"] is not None:
            groups[review["category"]].append(review["scores"])
    groups["all"] = [s for c in CATEGORIES for s in groups[c]]
    table = {}
    for name, scores in groups.items():
        if not scores:
            table[name] = {"n": 0, "reference_mean": None, "model_mean": None, "relative": None}
            continue
        reference = sum(s[0] for s in scores) / len(scores)
        model = sum(s[1] for s in scores) / len(scores)
        table[name] = {
            "n": len(scores),
            "reference_mean": round(reference, 3),
            "model_mean": round(model, 3),
            "relative": round(model / reference * 100, 1),
        }
    return table


def evaluate(
    questions: Path | str,
    context: Path | str,
    references: Path | str,
    answers: Path | str,
    judge: Path | str,
    out: Path | str,
    rubrics: Path | str | None = None,
    max_attempts: int = 3,
    method: str | None = None,
) -> dict:
    """The command: writes report.md, report.json, reviews.jsonl to `out`; returns the report."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be at least 1")
    config = load_chat_config(judge)
    system, rubric = load_rubrics(rubrics)
    rows = read_jsonl(questions)
    contexts = index_context(read_jsonl(context))
    reference_answers, bad_refs = read_answers(references)
    model_answers, bad_answers = read_answers(answers)
    jobs, unscored = [], {"no_answer": [], "no_reference": [], "no_context": []}
    for number, row in enumerate(rows, start=1):
        if row.get("question_id", row.get("id")) is None or not isinstance(row.get("text"), str):
            raise ValueError(f"{questions}: question {number} (in file order) needs a question_id and a text")
        qid = str(row.get("question_id", row.get("id")))
        category = canonical_category(row.get("category", ""))
        entry = contexts.get(str(row.get("image"))) or contexts.get(qid)
        if qid not in model_answers:
            unscored["no_answer"].append(qid)
        elif qid not in reference_answers:
            unscored["no_reference"].append(qid)
        elif entry is None:
            unscored["no_context"].append(qid)
        else:
            prompt = review_prompt(
                context_text(entry), row["text"], reference_answers[qid]["text"], model_answers[qid]["text"],
                rubric[category],
            )  # fmt: skip
            jobs.append({"question_id": qid, "category": category, "prompt": prompt})
    results, usage = asyncio.run(_review_all(config, jobs, system, max_attempts)) if jobs else ([], {})
    reviews = [job | result for job, result in zip(jobs, results, strict=True)]
    unreadable = [
        {"question_id": r["question_id"], "category": r["category"], "error": r["error"], "replies": r["replies"]}
        for r in reviews
        if r["scores"] is None
    ]
    scores = relative_scores(reviews)
    report = {
        "benchmark": BENCHMARK,
        "method": method or _model_name(model_answers, answers),
        "judge_model": config.model,
        "scores": scores,
        # the registry's report layout (`python -m src.eval score`), which the sweep results collect
        "columns": list(ROW_COLUMNS),
        "rows": {name: {column: values[column] for column in ROW_COLUMNS} for name, values in scores.items()},
        "questions": len(rows),
        "reviewed": sum(r["scores"] is not None for r in reviews),
        "retries": sum(max(0, len(r["replies"]) - 1) for r in reviews),
        "unreadable": unreadable,
        "unscored": unscored,
        "unread_lines": {"answers": bad_answers["bad_lines"], "references": bad_refs["bad_lines"]},
        "usage": usage,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "reviews.jsonl", "w") as stream:
        for number, r in enumerate(reviews, start=1):
            record = {
                "id": number, "question_id": r["question_id"], "category": r["category"],
                "content": r["replies"][-1] if r["replies"] else "", "tuple": list(r["scores"] or (-1, -1)),
                "attempts": len(r["replies"]), "replies": r["replies"], "error": r["error"],
            }  # fmt: skip
            stream.write(json.dumps(record, ensure_ascii=False) + "\n")
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    (out / "report.md").write_text(markdown(report))
    return report


def _model_name(answers: dict[str, dict], path: Path | str) -> str:
    models = {a["model"] for a in answers.values() if a.get("model")}
    return models.pop() if len(models) == 1 else Path(path).stem


def markdown(report: dict) -> str:
    names = [*CATEGORIES, "all"]
    titles = [CATEGORY_NAMES.get(n, "All") for n in names]
    scores = report["scores"]
    cell = lambda v, fmt: "-" if v is None else format(v, fmt)  # noqa: E731
    lines = [
        f"Relative score of {report['method']} (judge: {report['judge_model']}): model mean / reference mean x 100",
        "",
        "| | " + " | ".join(titles) + " |",
        "|---|" + "|".join("---:" for _ in names) + "|",
        "| relative score (%) | " + " | ".join(cell(scores[n]["relative"], ".1f") for n in names) + " |",
        "| model mean | " + " | ".join(cell(scores[n]["model_mean"], ".2f") for n in names) + " |",
        "| reference mean | " + " | ".join(cell(scores[n]["reference_mean"], ".2f") for n in names) + " |",
        "| reviews | " + " | ".join(str(scores[n]["n"]) for n in names) + " |",
        "",
        f"- questions: {report['questions']}; reviewed: {report['reviewed']}; re-asked for unreadable scores: "
        f"{report['retries']} times",
    ]
    if report["unreadable"]:
        lines.append(f"- not scored, the judge's review could not be read ({len(report['unreadable'])}):")
        for item in report["unreadable"]:
            last = item["replies"][-1] if item["replies"] else ""
            detail = item["error"] if item["error"] != "unreadable" else f"last reply: {json.dumps(last[:300])}"
            lines.append(f"  - {item['question_id']} ({item['category']}, {len(item['replies'])} replies): {detail}")
    for reason, text in (("no_answer", "no model answer"), ("no_reference", "no reference answer"),
                         ("no_context", "no context for the image")):  # fmt: skip
        ids = report["unscored"][reason]
        if ids:
            lines.append(
                f"- not scored, {text} ({len(ids)}): {', '.join(ids[:20])}" + (" ..." if len(ids) > 20 else "")
            )
    return "\n".join(lines) + "\n"


def to_llava(questions: Path | str, references: Path | str | None = None) -> list[dict]:
    """LLaVA-Bench questions as LLaVA records for `predict` (`--data.predict_json`, images
    relative to the bench's image folder): id = question_id, `<image>\n` + the question as
    LLaVA's `model_vqa.py` asks it, and the reference answer as the final gpt turn when given
    (predict drops it from the prompt and keeps it as the reference)."""
    refs = read_answers(references)[0] if references is not None else {}
    records = []
    for number, row in enumerate(read_jsonl(questions), start=1):
        if row.get("question_id", row.get("id")) is None or not isinstance(row.get("text"), str):
            raise ValueError(f"{questions}: question {number} (in file order) needs a question_id and a text")
        qid = str(row.get("question_id", row.get("id")))
        record: dict = {"id": qid}
        text = row["text"]
        if row.get("image"):
            record["image"] = row["image"]
            text = f"<image>\n{text}"
        record["conversations"] = [{"from": "human", "value": text}]
        if qid in refs:
            record["conversations"].append({"from": "gpt", "value": refs[qid]["text"]})
        records.append(record)
    return records


def _prepare(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m src.eval.judge prepare",
        description="LLaVA-Bench questions -> a LLaVA JSON for `python -m src.cli predict --data.predict_json`",
    )
    parser.add_argument("--questions", type=Path, required=True)
    parser.add_argument("--references", type=Path, default=None, help="reference answers, kept as `reference`")
    parser.add_argument("--out", type=Path, required=True, help="the LLaVA JSON to write")
    args = parser.parse_args(argv)
    records = to_llava(args.questions, args.references)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {len(records)} questions to {args.out}")


def main(argv: list[str] | None = None) -> None:
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"]:
        _prepare(argv[1:])
        return
    parser = argparse.ArgumentParser(
        prog="python -m src.eval.judge", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--questions", type=Path, required=True, help="JSONL {question_id, image, text, category}")
    parser.add_argument("--context", type=Path, required=True, help="JSONL {image | id, caption(s), instances | boxes}")
    parser.add_argument("--references", type=Path, required=True, help="reference answers (answer 1): JSONL")
    parser.add_argument("--answers", type=Path, required=True, help="the model's answers (answer 2): JSONL")
    parser.add_argument("--judge", type=Path, required=True, help="judge client YAML (ChatConfig fields)")
    parser.add_argument("--out", type=Path, required=True, help="folder for report.md, report.json, reviews.jsonl")
    parser.add_argument(
        "--rubrics", type=Path, default=None, help="folder with system.txt, conv.txt, detail.txt, complex.txt"
    )
    parser.add_argument("--max-attempts", type=int, default=3, help="asks per question while the scores are unreadable")
    parser.add_argument("--method", default=None, help="the model's name in the report")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from src.core.chat_client import ChatError

    try:
        report = evaluate(
            args.questions, args.context, args.references, args.answers, args.judge, args.out,
            args.rubrics, args.max_attempts, args.method,
        )  # fmt: skip
    except (FileNotFoundError, ValueError, ChatError) as error:
        parser.error(str(error))
    print((args.out / "report.md").read_text(), end="")
    if report["unreadable"]:
        log.warning("%d reviews could not be read; they are listed in %s", len(report["unreadable"]), args.out)


if __name__ == "__main__":
    main()
