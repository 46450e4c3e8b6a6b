"""A small ScienceQA release in the official layout (used by the other ScienceQA tests), and
its conversion: the paper's prompt texts, categories, shards and LLaVA JSON."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from src.eval.scienceqa_data import categories, convert, load_release, prompt_pair, to_record

# pid: subject, grade, hint, image?, choices, answer; every column of the paper's table is
# present, and a question with both a hint and an image (pid 4) counts in TXT and IMG.
TEST_PROBLEMS = {
    "1": ("natural science", "grade2", "", True, ["a magnet", "a pencil"], 0),
    "2": ("natural science", "grade8", "A hint about rocks.", False, ["granite", "basalt", "marble"], 1),
    "3": ("social science", "grade4", "", False, ["Ohio", "Texas", "Maine", "Utah"], 2),
    "4": ("social science", "grade11", "Look at the map.", True, ["north", "south"], 1),
    "5": ("language science", "grade3", "", False, ["cat", "dog"], 0),
    "6": ("language science", "grade9", "Read the text.", False, ["one", "two", "three", "four", "five"], 4),
    "7": ("natural science", "grade6", "", True, ["red", "blue", "green", "gray"], 3),
    "8": ("social science", "grade7", "", False, ["yes", "no", "maybe"], 0),
}
TRAIN_PROBLEMS = {
    "9": ("natural science", "grade5", "", True, ["hot", "cold"], 1),
    "10": ("language science", "grade10", "", False, ["up", "down"], 0),
}


def problem(pid: str, spec: tuple) -> dict:
    subject, grade, hint, image, choices, answer = spec
    return {
        "question": f"Which answer fits question {pid}?",
        "choices": choices,
        "answer": answer,
        "hint": hint,
        "image": "image.png" if image else None,
        "task": "closed choice",
        "grade": grade,
        "subject": subject,
        "topic": "testing",
        "category": "Test",
        "skill": "Test",
        "lecture": f"Lecture {pid}.",
        "solution": f"Solution {pid}.\nSecond line.",
        "split": "test" if pid in TEST_PROBLEMS else "train",
    }


def write_release(root: Path) -> Path:
    """problems.json, pid_splits.json and images/<split>/<pid>/image.png under `root`."""
    root.mkdir(parents=True, exist_ok=True)
    problems = {pid: problem(pid, spec) for pid, spec in {**TEST_PROBLEMS, **TRAIN_PROBLEMS}.items()}
    (root / "problems.json").write_text(json.dumps(problems))
    splits = {"train": list(TRAIN_PROBLEMS), "val": [], "test": list(TEST_PROBLEMS), "minival": ["1", "2"]}
    (root / "pid_splits.json").write_text(json.dumps(splits))
    for pid, p in problems.items():
        if p["image"]:
            folder = root / "images" / p["split"] / pid
            folder.mkdir(parents=True)
            buffer = io.BytesIO()
            Image.new("RGB", (32, 32), (40 * int(pid), 80, 120)).save(buffer, format="PNG")
            (folder / "image.png").write_bytes(buffer.getvalue())
    return root


@pytest.fixture
def release_root(tmp_path) -> Path:
    return write_release(tmp_path / "scienceqa")


def test_cqm_a_is_llava_s_zero_shot_prompt_and_the_reply_is_the_letter():
    text, reply = prompt_pair(problem("2", TEST_PROBLEMS["2"]), "CQM-A")
    assert text == (
        "Context: A hint about rocks.\nQuestion: Which answer fits question 2?\n"
        "Options: (A) granite (B) basalt (C) marble\n"
        "Answer with the option's letter from the given choices directly."
    )
    assert reply == "B"
    text, _ = prompt_pair(problem("1", TEST_PROBLEMS["1"]), "CQM-A")
    assert text.startswith("Context: N/A\nQuestion: ")  # no hint: "N/A", as the reference


def test_qcm_lea_is_the_reference_converter_s_text():
    text, reply = prompt_pair(problem("6", TEST_PROBLEMS["6"]), "QCM-LEA")
    # the converter drops the leading "Question: " and "Answer: "
    assert text == (
        "Which answer fits question 6?\nContext: Read the text.\nOptions: (A) one (B) two (C) three (D) four (E) five"
    )
    assert reply == "Lecture 6. Solution 6.\nSecond line. The answer is E."
    empty = problem("5", TEST_PROBLEMS["5"]) | {"lecture": "", "solution": "Only a solution."}
    assert prompt_pair(empty, "QCM-LEA")[1] == "Only a solution. The answer is A."  # double space collapsed
    with pytest.raises(ValueError, match=r"unknown ScienceQA format 'QCM-A'; choose one of \['CQM-A', 'QCM-LEA'\]"):
        prompt_pair(empty, "QCM-A")


def test_categories_follow_scienceqa_s_get_scores():
    got = {pid: categories(problem(pid, spec)) for pid, spec in TEST_PROBLEMS.items()}
    assert got == {
        "1": ["NAT", "IMG", "G1-6"],
        "2": ["NAT", "TXT", "G7-12"],
        "3": ["SOC", "NO", "G1-6"],
        "4": ["SOC", "TXT", "IMG", "G7-12"],
        "5": ["LAN", "NO", "G1-6"],
        "6": ["LAN", "TXT", "G7-12"],
        "7": ["NAT", "IMG", "G1-6"],
        "8": ["SOC", "NO", "G7-12"],
    }


def test_a_record_has_the_image_first_an_mc_item_and_the_table_columns():
    record = to_record("4", problem("4", TEST_PROBLEMS["4"]), "CQM-A")
    assert record["image"] == "test/4/image.png"  # relative to <root>/images
    human, gpt = record["conversations"]
    assert human["value"].startswith("<image>\nContext: Look at the map.\nQuestion: ")
    assert gpt == {"from": "gpt", "value": "B"}
    assert record["mc"] == [
        {
            "question": "Context: Look at the map.\nQuestion: Which answer fits question 4?",
            "options": ["north", "south"],
            "answer": 1,
            "type": ["SOC", "TXT", "IMG", "G7-12"],  # validation logs every column it counts in
        }
    ]
    assert record["scienceqa"]["categories"] == ["SOC", "TXT", "IMG", "G7-12"]
    text_only = to_record("3", problem("3", TEST_PROBLEMS["3"]), "CQM-A")
    assert "image" not in text_only and "<image>" not in text_only["conversations"][0]["value"]


def test_convert_writes_shards_keyed_by_pid_and_the_llava_json(release_root, tmp_path, read_tar):
    out = tmp_path / "shards"
    summary = convert(release_root, "test", "CQM-A", out, max_count=5)
    assert (summary["samples"], summary["images"], summary["text_only"], summary["shards"]) == (8, 3, 5, 2)
    assert summary["skipped"] == {}
    tars = sorted(out.glob("scienceqa_test_CQM-A-*.tar"))
    assert [p.name for p in tars] == ["scienceqa_test_CQM-A-000000.tar", "scienceqa_test_CQM-A-000001.tar"]
    samples = [s for tar in tars for s in read_tar(tar)]
    assert [key for key, _ in samples] == list(TEST_PROBLEMS)
    members = dict(samples)
    assert set(members["1"]) == {"json", "png"} and set(members["3"]) == {"json"}
    assert json.loads(members["6"]["json"])["conversations"][1]["value"] == "E"
    records = json.loads((out / "llava_test_CQM-A.json").read_text())
    assert [r["id"] for r in records] == list(TEST_PROBLEMS)
    assert json.loads((out / "sizes.json").read_text()) == {tars[0].name: 5, tars[1].name: 3}


def test_a_derived_split_finds_its_images_in_the_problems_own_folder(release_root, tmp_path):
    """minival is a subset of val in the release: its images live under images/val, not images/minival."""
    summary = convert(release_root, "minival", "CQM-A", tmp_path / "mini")
    assert (summary["samples"], summary["images"], summary["skipped"]) == (2, 1, {})
    records = json.loads((tmp_path / "mini/llava_minival_CQM-A.json").read_text())
    assert records[0]["image"] == "test/1/image.png"


def test_a_missing_image_is_skipped_and_counted(release_root, tmp_path):
    (release_root / "images/test/7/image.png").unlink()
    summary = convert(release_root, "test", "CQM-A", tmp_path / "shards")
    assert summary["samples"] == 7 and summary["skipped"] == {"missing_image": 1}


def test_the_shards_read_back_through_the_training_pipeline(release_root, tmp_path, make_builder):
    """The mc view (validation during fit) and the conversations view (training, predict) both build."""
    from webdataset.tariterators import tarfile_samples

    from src.data.decode import decode_sample

    out = tmp_path / "shards"
    convert(release_root, "test", "QCM-LEA", out)
    (tar,) = out.glob("*.tar")
    builder = make_builder(view=["mc", "conversations"])
    count = 0
    for raw in tarfile_samples(iter([{"url": str(tar)}])):
        record, images = decode_sample(raw)
        mc, chat = builder(record, images)
        assert mc.mc["type"] == categories(problem(raw["__key__"], TEST_PROBLEMS[raw["__key__"]]))
        assert mc.mc["answer"] == TEST_PROBLEMS[raw["__key__"]][5]
        assert (chat.pixel_values is None) == (not TEST_PROBLEMS[raw["__key__"]][3])
        count += 1
    assert count == 8


def test_a_bad_release_is_a_clear_error(tmp_path, release_root):
    with pytest.raises(FileNotFoundError, match="problems.json not found: --root must be a ScienceQA release folder"):
        load_release(tmp_path / "nowhere")
    release = load_release(release_root)
    with pytest.raises(ValueError, match=r"no split 'dev' in .*; it has \['minival', 'test', 'train', 'val'\]"):
        release.split("dev")
