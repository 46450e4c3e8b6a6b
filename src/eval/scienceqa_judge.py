"""The paper's ScienceQA ensemble with a judge LLM ("GPT-4 as the judge").

The paper: the judge (text-only) answers every question as well; where its answer and the
model's agree, that is the answer; where they differ, the judge is shown the question and
both answers and gives the final one. Cases the paper leaves open, settled here as LLaVA's
own `eval_science_qa_gpt4.py` settles the first of them:
- the judge's answer names no option (it often cannot answer without the image): the
  model's answer stands;
- the judge's final answer in a disagreement names no option, or the client gives up: the
  model's answer stands; each such case is counted under its own route in the report;
- a question with no model prediction stays unanswered (wrong): the ensemble judges the
  model's answers, it does not replace a missing run.
Every exchange is written to `judge.jsonl` in the report folder, so a score can be audited.

Replies, the model's and the judge's, are read by the one reader of the table's main row
(`src/eval/answers.py`, `official`: `eval_science_qa.py`'s three rules). LLaVA's
`eval_science_qa_gpt4*.py` read both with its third rule only ("The answer is X." exactly
once), and give a question whose replies both fail a random option; here such a question has
no option and is wrong, so the ensemble's row never depends on a random draw.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

from src.eval.answers import read_choice
from src.eval.scienceqa_data import OPTIONS, Release, choice_text, context_text

SYSTEM = "You are a helpful assistant that answers science questions for students."
ANSWER_INSTRUCTION = (
    'Think the question through briefly, then end your reply with "The answer is X." where X is the letter '
    "of the correct option."
)
ARBITRATE_INSTRUCTION = (
    "Two answers to this question were given and they disagree. Read the question again and decide which "
    'option is correct (it may be neither answer\'s choice). End your reply with "The answer is X." where X is '
    "the letter of the option you finally choose."
)


def question_text(problem: dict) -> str:
    """The question as the judge sees it: LLaVA's CQM text, without the image."""
    return f"Context: {context_text(problem)}\nQuestion: {problem['question']}\nOptions: {choice_text(problem)}"


def answer_prompt(problem: dict) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"{question_text(problem)}\n\n{ANSWER_INSTRUCTION}"},
    ]


def arbitrate_prompt(problem: dict, model_reply: str, judge_reply: str) -> list[dict[str, str]]:
    content = (
        f"{question_text(problem)}\n\n"
        f"[Answer 1]\n{model_reply}\n[End of Answer 1]\n\n"
        f"[Answer 2]\n{judge_reply}\n[End of Answer 2]\n\n"
        f"{ARBITRATE_INSTRUCTION}"
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


def _letter(choice: int | None) -> str | None:
    return None if choice is None else OPTIONS[choice]


async def judge_one(client, problem: dict, model_reply: str, model_choice: int | None) -> dict:
    """The ensemble's answer to one question, with the route it took and the judge's replies."""
    from src.core.chat_client import ChatError

    n = len(problem["choices"])
    outcome: dict = {"model": _letter(model_choice), "judge": None, "final": _letter(model_choice)}
    try:
        first = await client.chat(answer_prompt(problem))
    except ChatError as error:
        return outcome | {"route": "judge_error", "error": str(error)}
    judge_choice = read_choice(first.text, n, "official")
    outcome |= {"judge": _letter(judge_choice), "judge_reply": first.text}
    if judge_choice is None:
        return outcome | {"route": "judge_no_answer"}
    if judge_choice == model_choice:
        return outcome | {"route": "agree"}
    try:
        second = await client.chat(arbitrate_prompt(problem, model_reply, first.text))
    except ChatError as error:
        return outcome | {"route": "arbitration_error", "error": str(error)}
    final = read_choice(second.text, n, "official")
    outcome["arbitration_reply"] = second.text
    if final is None:
        return outcome | {"route": "arbitration_no_answer"}
    return outcome | {"route": "arbitrated", "final": _letter(final)}


async def _judge_all(config, jobs: list[tuple[str, dict, str, int | None]]) -> tuple[dict[str, dict], dict]:
    from src.core.chat_client import ChatClient

    async with ChatClient(config) as client:
        outcomes = await asyncio.gather(*(judge_one(client, p, reply, choice) for _, p, reply, choice in jobs))
        return {pid: outcome for (pid, *_), outcome in zip(jobs, outcomes, strict=True)}, client.usage


def run_ensemble(
    release: Release, split: str, answers: dict[str, dict], result: dict, judge: Path | str, out: Path
) -> dict:
    """Runs the judge over the split's answered questions: the ensemble's chosen option per
    question (`finals`, None: none), routes, usage and per-question outcomes. The caller scores
    `finals` into the table's row."""
    from src.eval.judge import load_chat_config

    config = load_chat_config(judge)
    pids = release.split(split)
    missing = set(result["missing"])
    jobs = [
        (pid, release.problems[pid], answers[pid]["text"], result["choices"][pid]) for pid in pids if pid not in missing
    ]
    outcomes, usage = asyncio.run(_judge_all(config, jobs)) if jobs else ({}, {})
    finals = {pid: (None if o["final"] is None else OPTIONS.index(o["final"])) for pid, o in outcomes.items()}
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "judge.jsonl", "w") as stream:
        for pid, outcome in outcomes.items():
            stream.write(json.dumps({"id": pid, **outcome}, ensure_ascii=False) + "\n")
    routes = Counter(o["route"] for o in outcomes.values())
    order = ("agree", "arbitrated", "judge_no_answer", "arbitration_no_answer", "judge_error", "arbitration_error")
    return {
        "finals": finals,
        "judge_model": config.model,
        "routes": {name: routes.get(name, 0) for name in order},
        "usage": usage,
        "outcomes": outcomes,
    }
