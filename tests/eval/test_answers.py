"""src.eval.answers: the one answer reader, held against LLaVA's own `eval_science_qa.py`.

`official` must be that script's rule on every reply: the tricky replies below and replies
hypothesis makes up are scored by the installed script and by the kit, letter for letter.
`lenient` is the kit's own: its expectations are written out, and a property pins that it
never reads a reply differently from `official` where `official` reads one.
"""

from __future__ import annotations

import json
import re
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from official_sqa import official_script, run_official, write_release, write_results

import src.data.conversation as conversation
from src.data.conversation import multiple_choice_answer
from src.eval.answers import READERS, option_letters, read_answers, read_choice, read_letter

SRC = Path(__file__).resolve().parents[2] / "src"

# reply, options in the question, option read by `official`, by `lenient` (None: a failure, wrong)
TABLE = [
    ("A", 4, 0, 0),
    ("C", 4, 2, 2),
    (" C", 4, None, 2),  # the official rule does not strip (LLaVA strips when it generates)
    ("C\n", 4, None, 2),
    ("  C \n", 4, None, 2),
    ("B. The magnet attracts the pin.", 4, 1, 1),  # leading "X. "
    ("B. The answer is C.", 4, 1, 1),  # the leading letter comes first: B, in every part of the kit
    ("A. x The answer is C.", 4, 0, 0),
    ("B\nThe answer is C.", 4, 2, 2),  # "B\n" is not "B. ": the regex decides
    ("B\nBecause the pin is iron.", 4, None, 1),  # the scorer does not turn newlines into ". "
    ("B.", 4, None, 1),  # no space after the full stop
    ("D.\n", 4, None, 3),
    ("B.\nBecause", 4, None, 1),
    ("B .", 4, None, None),
    ("The answer is D.", 4, 3, 3),
    ("The answer is D", 4, None, 3),  # the pattern needs a character after the letter
    ("The lecture says so. The answer is C", 4, None, 2),
    ("The answer is D\n", 4, None, 3),  # ... and "." matches no newline
    ("The answer is D\nBecause", 4, None, 3),
    ("The answer is C:", 4, 2, 2),
    ("The answer is Cat.", 4, 2, 2),  # the regex does not stop at a word
    ("red . The answer is C .", 4, 2, 2),  # the demo tokenizer's decoded reasoned reply
    ("First, think. The answer is B. Done.", 3, 1, 1),
    ("The answer is A. Hmm, no: The answer is B.", 4, None, None),  # two: not exactly one
    ("The answer is B. The answer is B.", 4, None, None),  # two, even alike
    ("The answer is C.\nThe answer is D.", 4, None, None),
    ("The answer is A. The answer is F.", 4, None, None),  # a second answer beyond E counts too
    ("The answer is B. The answer is C", 4, 1, 1),  # the second has nothing after it: one match
    ("The answer is AThe answer is B.", 4, 0, 0),  # the first match eats the "T" of the second
    ("The answer is  C.", 4, None, None),
    ("The answer is (B).", 4, None, 1),  # the pattern needs the bare letter
    ("The answer is (B)", 4, None, 1),
    ("The answer is Z.", 4, None, None),  # read as Z, beyond the options
    ("E", 4, None, None),  # a letter beyond the options
    ("E. The answer is B.", 4, None, None),  # the leading E is read, and is beyond the options
    ("E", 5, 4, 4),
    ("The answer is E.", 5, 4, 4),
    ("The answer is E.", 3, None, None),
    ("F", 5, None, None),  # the scorer's options are A-E
    ("F. The answer is B.", 5, 1, 1),  # F is no option letter, so the regex decides
    ("The answer is F.", 5, None, None),
    ("(B)", 4, None, None),
    ("(B) magnet", 4, None, None),
    ("the answer is b.", 4, None, None),  # case matters
    ("The answer is b.", 4, None, None),
    ("b", 4, None, None),
    ("b. magnet", 4, None, None),
    ("AB", 4, None, None),
    ("A magnet.", 4, None, None),  # a word starting with a capital letter is not "A. "
    ("A circle .", 4, None, None),
    ("B red", 4, None, None),
    ("I think it is B", 4, None, None),
    ("FAILED", 4, None, None),
    ("", 4, None, None),
    ("   ", 4, None, None),
    ("B", 2, 1, 1),
    ("C.", 2, None, None),
    ("H", 8, 7, 7),  # more than five options: the letters run on (as `--options ABCDEFGH`)
    ("H", 7, None, None),
    ("The answer is G.", 8, 6, 6),
    ("F. The answer is B.", 6, 5, 5),  # with six options F is an option letter: rule 2 reads it
]


@pytest.fixture(scope="module")
def official() -> Path:
    return official_script()


@pytest.mark.parametrize(("reply", "options", "official_choice", "lenient_choice"), TABLE)
def test_the_reading_table(reply, options, official_choice, lenient_choice):
    assert read_choice(reply, options) == official_choice  # official is the default
    assert read_choice(reply, options, "official") == official_choice
    assert read_choice(reply, options, "lenient") == lenient_choice


def problems_for(counts: list[int]) -> dict[str, dict]:
    """One problem per reply, numbered from 1, with that many choices; the answer rotates."""
    problems = {}
    for index, count in enumerate(counts, start=1):
        problems[str(index)] = {
            "question": f"question {index}?",
            "choices": [f"choice {k}" for k in range(count)],
            "answer": index % count,
            "hint": "",
            "image": "image.png" if index == 1 else None,  # the script divides by its image count
            "subject": "natural science",
            "grade": "grade3",
            "split": "test",
        }
    return problems


def score_officially(folder: Path, replies: list[str], counts: list[int], in_process: bool) -> list[dict]:
    """Runs eval_science_qa.py on the replies, one run per set of option letters the kit uses
    for them (A-E, as the script's default, for up to five options; `--options A..F` etc. above)."""
    decisions: list[dict] = [{} for _ in replies]
    groups: dict[tuple[str, ...], list[int]] = {}
    for row, count in enumerate(counts):
        groups.setdefault(option_letters(count), []).append(row)
    for letters, rows in groups.items():
        run = folder / "".join(letters)
        problems = problems_for([counts[row] for row in rows])
        root = write_release(run / "sqa", problems, {"test": list(problems)})
        results = write_results(
            run / "answers.jsonl", {str(i + 1): replies[row] for i, row in enumerate(rows)}, problems
        )
        options = None if letters == option_letters(1) else "".join(letters)
        got = run_official(root, results, run, options=options, in_process=in_process)
        for i, row in enumerate(rows):
            pid = str(i + 1)
            decisions[row] = {"letter": got["parsed"][pid], "index": got["results"][pid], "options": letters}
    return decisions


def assert_official_equal(replies: list[str], counts: list[int], decisions: list[dict]) -> None:
    for reply, count, decision in zip(replies, counts, decisions, strict=True):
        letter = read_letter(reply, "official", decision["options"])
        assert (letter or "FAILED") == decision["letter"], (reply, count)
        choice = read_choice(reply, count, "official")
        assert (-1 if choice is None else choice) == decision["index"], (reply, count)


def test_official_is_the_official_script_on_the_table(official, tmp_path):
    replies, counts = [row[0] for row in TABLE], [row[1] for row in TABLE]
    decisions = score_officially(tmp_path, replies, counts, in_process=False)
    assert_official_equal(replies, counts, decisions)
    assert [d["index"] for d in decisions] == [-1 if row[2] is None else row[2] for row in TABLE]


# Replies built from the pieces the rule turns on, and arbitrary text between them.
PIECES = [
    "The answer is ", "The answer is", "the answer is ", "The answer is (", "answer is ", ")", "(", ". ", ".",
    "\n", " ", "  ", "\t", "\r\n", ":", "A", "B", "C", "D", "E", "F", "H", "Z", "a", "b", "B. ", "B.", "(B)",
    "FAILED", "Because", "é", "\u2028",
]  # fmt: skip
replies = st.lists(st.one_of(st.sampled_from(PIECES), st.text(max_size=3)), max_size=8).map("".join)
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(batch=st.lists(st.tuples(replies, st.integers(2, 5)), min_size=1, max_size=30))
def test_official_is_the_official_script_on_made_up_replies(official, batch):
    texts, counts = [reply for reply, _ in batch], [count for _, count in batch]
    with tempfile.TemporaryDirectory() as folder:
        decisions = score_officially(Path(folder), texts, counts, in_process=True)
    assert_official_equal(texts, counts, decisions)


@SETTINGS
@given(batch=st.lists(replies, min_size=1, max_size=20), count=st.integers(6, 8))
def test_official_with_more_options_is_the_script_with_those_options(official, batch, count):
    with tempfile.TemporaryDirectory() as folder:
        decisions = score_officially(Path(folder), batch, [count] * len(batch), in_process=True)
    assert decisions[0]["options"] == tuple(string.ascii_uppercase[:count])
    assert_official_equal(batch, [count] * len(batch), decisions)


@settings(max_examples=300, deadline=None)
@given(reply=replies, count=st.integers(2, 8))
def test_lenient_never_reads_a_reply_otherwise_than_official(reply, count):
    options = option_letters(count)
    official_letter = read_letter(reply, "official", options)
    if official_letter is not None:
        assert read_letter(reply, "lenient", options) == official_letter
        assert read_choice(reply, count, "lenient") == read_choice(reply, count, "official")
    hedges = (
        len(re.findall(r"The answer is \(?[A-Z]", reply)) > 1 or len(re.findall(r"The answer is [A-Z].", reply)) > 1
    )
    if hedges:  # two answers: lenient adds no reading of its own
        assert read_choice(reply, count, "lenient") == read_choice(reply, count, "official")


def test_every_kit_answer_reads_back():
    options = ["red", "green", "blue", "yellow", "purple", "circle", "square", "triangle"]
    for n in range(2, 9):
        for answer in range(n):
            for mode in READERS.names():
                assert read_choice(multiple_choice_answer(options[:n], answer, "reasoned"), n, mode) == answer
                assert read_choice(multiple_choice_answer(options[:n], answer, "letter"), n, mode) == answer
                # an option's text names no letter
                assert read_choice(multiple_choice_answer(options[:n], answer, "option"), n, mode) is None


def test_modes_are_named_exactly():
    assert READERS.names() == ["lenient", "official"]
    with pytest.raises(
        ValueError, match=r"unknown answer reading mode 'Official'; choose one of \['lenient', 'official'\]"
    ):
        read_choice("A", 4, "Official")
    with pytest.raises(ValueError, match="a question has 1 to 26 options, got 0"):
        read_choice("A", 0)


def test_one_reader_in_the_kit():
    """No other module parses "The answer is X": validation and scoring cannot drift apart."""
    assert not hasattr(conversation, "parse_choice")
    parsers = []
    for path in SRC.rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if "answer is" in line and "re." in line:
                parsers.append(f"{path.relative_to(SRC)}:{number}")
    assert parsers and all(p.startswith("eval/answers.py:") for p in parsers), parsers
    module = (SRC / "training/module.py").read_text()
    assert 'read_choice(text, len(options), "official")' in module


def test_answer_files_in_both_layouts(tmp_path):
    ours = tmp_path / "preds.jsonl"
    rows = [
        {"id": "1", "prompt": "p", "answer": "A", "reference": "A", "model": "m", "settings": {}},
        {"question_id": 2, "text": "B", "model_id": "llava"},
    ]
    ours.write_text("\n".join(json.dumps(r) for r in rows) + "\nnot json\n\n" + json.dumps({"id": "3"}) + "\n")
    answers, problems = read_answers(ours)
    assert answers == {"1": {"text": "A", "model": "m"}, "2": {"text": "B", "model": "llava"}}
    assert problems == {"bad_line": 2, "bad_lines": [3, 5]}
    twice = tmp_path / "twice.jsonl"
    twice.write_text(json.dumps(rows[0]) + "\n" + json.dumps(rows[0]) + "\n")
    with pytest.raises(ValueError, match=r"id '1' is answered twice \(lines 1 and 2\)"):
        read_answers(twice)
