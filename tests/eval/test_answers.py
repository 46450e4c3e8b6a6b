"""src.eval.answers: the option a reply names, by LLaVA's ScienceQA rules, on tricky outputs."""

from __future__ import annotations

import json

import pytest

from src.eval.answers import extract_choice, extract_letter, read_answers

# reply, options in the question, expected option index (None: a failure, scored wrong)
TABLE = [
    ("A", 4, 0),
    ("  C \n", 4, 2),  # whitespace around a bare letter
    ("B. The magnet attracts the pin.", 4, 1),  # leading "X. "
    ("B\nBecause the pin is iron.", 4, 1),  # a newline reads as ". ", as in the reference
    ("The answer is D.", 4, 3),
    ("The lecture says so. The answer is C", 4, 2),  # without the full stop
    ("First, think. The answer is B. Done.", 3, 1),
    ("The answer is A. Hmm, no: The answer is B.", 4, None),  # two: not exactly one
    ("The answer is B. The answer is B.", 4, None),  # two, even alike
    ("E", 4, None),  # a letter beyond the options
    ("The answer is E.", 5, 4),
    ("The answer is E.", 3, None),
    ("B.", 4, None),  # no space after the full stop: the reference fails it too
    ("(B)", 4, None),
    ("The answer is (B).", 4, None),  # the reference's pattern needs the bare letter
    ("the answer is b.", 4, None),  # case matters, as in the reference
    ("b", 4, None),
    ("AB", 4, None),
    ("A magnet.", 4, None),  # a word starting with a capital letter is not "A. "
    ("I think it is B", 4, None),
    ("", 4, None),
    ("F", 5, None),  # ScienceQA has at most five options, A-E
    ("A. x The answer is C.", 4, 0),  # the leading letter rule comes first, as in the reference
]


@pytest.mark.parametrize(("reply", "options", "expected"), TABLE)
def test_extraction_table(reply, options, expected):
    assert extract_choice(reply, options) == expected


def test_letter_without_a_question():
    assert extract_letter("The answer is C.") == "C"
    assert extract_letter("nothing") is None


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
