"""The generator end to end, in process, against the loopback server with injected faults."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
from chat_server import ChatServer, random_faults
from fake_teacher import (
    BAD_REPLIES,
    LLAVA_FILES,
    LLAVA_SYSTEMS,
    Teacher,
    good_reply,
    make_records,
    request_key,
    write_llava_prompts,
)

from src.core.chat_client import ChatConfig
from src.instruct.cli import run
from src.instruct.config import GenerateConfig
from src.instruct.generate import FatalError
from src.instruct.ledger import Ledger
from src.instruct.prompts import load_questions
from src.instruct.sampling import image_first, pick_question


def make_config(tmp_path, server, records, **overrides) -> GenerateConfig:
    teacher = dict(
        base_url=server.url, model="teacher", api_key_env=None, timeout_s=0.5, max_concurrency=3, max_retries=10,
        backoff_initial_s=0.01, backoff_max_s=0.05,
    )  # fmt: skip
    teacher |= overrides.pop("teacher", {})
    options = dict(out=str(tmp_path / "out"), records=str(records), images=str(records.parent / "images"))
    return GenerateConfig(**(options | dict(progress=False) | overrides), teacher=ChatConfig(**teacher))


def read_json(path):
    return json.loads(path.read_text())


def test_n_items_give_exactly_n_valid_samples_through_faults(tmp_path, jpeg_bytes, read_tar):
    n = 12
    records = make_records(tmp_path / "in", n, jpeg_bytes())
    # the first request of some conversations breaks a rule; one item's conversation breaks two
    bad_kinds = list(BAD_REPLIES)

    def bad(item, kind, count):
        if kind != "conversation":
            return None
        if item == "3" and count < 2:
            return ["leaked_coordinates", "image_tag"][count]
        return bad_kinds[int(item) // 2 % len(bad_kinds)] if count == 0 and int(item) % 2 else None

    teacher = Teacher(bad)
    faults = random_faults(0.25, seed=3, kinds=("429", "500", "503", "drop", "garbage", "no_choices", "slow"))
    with ChatServer(teacher, faults=faults, delay_s=0.02, slow_s=1.5) as server:
        summary = run(make_config(tmp_path, server, records, max_attempts=3))
    out = tmp_path / "out"
    samples = read_json(out / "instruct.json")
    assert len(samples) == 3 * n
    assert len({s["id"] for s in samples}) == 3 * n
    assert [s["id"] for s in samples[:3]] == ["0_conversation", "0_detail", "0_complex_reasoning"]  # input order
    for sample in samples:
        item = sample["source_id"]
        assert sample["image"] == f"img{int(item):04d}.jpg"
        assert sample["conversations"][0]["value"].startswith("<image>\n")
        assert f"item {item}" in json.dumps(sample["conversations"])  # the answer for this item
    assert server.max_concurrent <= 3
    assert summary["samples"] == {"conversation": n, "detail": n, "complex_reasoning": n, "total": 3 * n}
    assert summary["failed"] == {}
    assert summary["rejections"] == dict(teacher.injected) and len(teacher.injected) == 6
    assert summary["this_run"]["retries"] > 0 and summary["this_run"]["requests"] == len(server.requests)
    assert summary["tokens"]["completion"] > 0
    # shards: one sample per record, the image inside, the record as its json member
    shards = summary["outputs"]["shards"]
    assert (shards["samples"], shards["skipped"]) == (3 * n, {})
    [tar] = sorted((out / "shards").glob("instruct-*.tar"))
    members = read_tar(tar)
    assert [json.loads(m["json"]) for _, m in members] == samples
    assert all(m["jpg"] == jpeg_bytes() for _, m in members)
    assert read_json(out / "shards" / "sizes.json") == {"instruct-000000.tar": 3 * n}
    assert read_json(out / "summary.json") == summary


def test_a_rerun_requests_nothing_and_rewrites_the_same_outputs(tmp_path, jpeg_bytes):
    records = make_records(tmp_path / "in", 4, jpeg_bytes())
    with ChatServer(Teacher()) as server:
        config = make_config(tmp_path, server, records, kinds=["detail"], jsonl=True)
        run(config)
        first = (tmp_path / "out" / "instruct.jsonl").read_bytes()
        requests = len(server.requests)
        summary = run(config)
    assert requests == 4 and len(server.requests) == 4
    assert (tmp_path / "out" / "instruct.jsonl").read_bytes() == first
    assert len(first.splitlines()) == 4
    assert summary["this_run"]["already_done"] == 4 and summary["this_run"]["jobs"] == 0


def test_replies_that_are_always_rejected_are_counted_then_retried_by_the_next_run(tmp_path, jpeg_bytes):
    records = make_records(tmp_path / "in", 3, jpeg_bytes())
    always_bad = Teacher(lambda item, kind, count: "leaked_caption" if item == "1" else None)
    with ChatServer(always_bad) as server:
        summary = run(make_config(tmp_path, server, records, kinds=["conversation"], max_attempts=2))
    assert summary["samples"]["total"] == 2 and summary["failed"] == {"rejected": 1}
    assert summary["rejections"] == {"leaked_caption": 2}
    # the retry after a rejection asks for variety (temperature 0.2 -> 0.7)
    temperatures = [r["temperature"] for r in server.requests if request_key(r)[0] == "1"]
    assert temperatures == [0.2, 0.7]
    with ChatServer(Teacher()) as server:
        summary = run(make_config(tmp_path, server, records, kinds=["conversation"]))
    assert [request_key(r)[0] for r in server.requests] == ["1"]  # only the failed item is asked again
    assert summary["samples"]["total"] == 3 and summary["failed"] == {}
    assert summary["rejections"] == {"leaked_caption": 2}  # history is kept


def test_a_teacher_that_gives_up_is_recorded_as_an_error_and_the_run_goes_on(tmp_path, jpeg_bytes):
    records = make_records(tmp_path / "in", 3, jpeg_bytes())

    def faults(number, request):
        return "500" if request_key(request)[0] == "2" else None

    with ChatServer(Teacher(), faults=faults) as server:
        summary = run(make_config(tmp_path, server, records, kinds=["detail"], teacher={"max_retries": 2}))
    assert summary["samples"]["total"] == 2 and summary["failed"] == {"error": 1}
    [entry] = [e for e in Ledger(tmp_path / "out" / "ledger.jsonl").history if e["status"] == "error"]
    assert entry["id"] == "2" and "gave up after 3 attempts" in entry["error"]


def test_a_refused_key_stops_the_run_at_once(tmp_path, jpeg_bytes, monkeypatch):
    monkeypatch.setenv("TEACHER_KEY_FOR_TEST", "wrong-key")
    records = make_records(tmp_path / "in", 20, jpeg_bytes())
    with ChatServer(Teacher(), api_key="right-key") as server:
        with pytest.raises(FatalError, match="HTTP 401"):
            run(make_config(tmp_path, server, records, teacher={"api_key_env": "TEACHER_KEY_FOR_TEST"}))
    assert len(server.requests) <= 3  # of 60 jobs: only those already in flight
    assert Ledger(tmp_path / "out" / "ledger.jsonl").history == []


def test_a_torn_ledger_line_is_cut_and_its_item_asked_again(tmp_path, jpeg_bytes):
    records = make_records(tmp_path / "in", 3, jpeg_bytes())
    with ChatServer(Teacher()) as server:
        config = make_config(tmp_path, server, records, kinds=["detail"])
        run(config)
        ledger = tmp_path / "out" / "ledger.jsonl"
        lines = ledger.read_bytes().splitlines(keepends=True)
        torn_id = json.loads(lines[-1])["id"]
        ledger.write_bytes(b"".join(lines[:-1]) + lines[-1][:25])  # killed mid-write
        before = len(server.requests)
        summary = run(config)
    assert [request_key(r)[0] for r in server.requests[before:]] == [torn_id]
    assert summary["samples"]["total"] == 3
    entries = [json.loads(line) for line in ledger.read_bytes().splitlines()]  # every line whole again
    assert sorted(e["id"] for e in entries) == ["0", "1", "2"]


def test_caption_shards_in_instruction_shards_out(tmp_path, shards, read_tar, tokenizer):
    demo = shards["val"][0]  # 10 demo scenes: jpg + json with a caption
    with ChatServer(Teacher()) as server:
        # the demo captions hold no "item <id>": name each request after its caption's sample
        server.respond = lambda request: Teacher()(_with_item(request))
        config = GenerateConfig(
            out=str(tmp_path / "out"), shards=[demo], kinds=["detail"], progress=False,
            teacher=ChatConfig(base_url=server.url, api_key_env=None, backoff_initial_s=0.01),
        )  # fmt: skip
        summary = run(config)
    source = {key: m for key, m in read_tar(demo)}
    out = tmp_path / "out"
    samples = read_json(out / "instruct.json")
    assert len(samples) == 10 and summary["samples"]["total"] == 10
    for (_, members), sample in zip(read_tar(sorted((out / "shards").glob("*.tar"))[0]), samples, strict=True):
        assert json.loads(members["json"]) == sample
        assert members["jpg"] == source[sample["source_id"]]["jpg"]  # the image travels unchanged
        assert (out / "images" / sample["image"]).read_bytes() == members["jpg"]  # and the JSON's path holds it
    caption = json.loads(source[samples[0]["source_id"]]["json"])["caption"]
    assert any(caption in r["messages"][-1]["content"] for r in server.requests)
    # stage 2 reads them: the training reader's decoder and conversation encoder take every sample
    from src.data.shards import inspect_shards

    report = inspect_shards(str(sorted((out / "shards").glob("*.tar"))[0]), tokenizer, image_tokens=16)
    assert report["samples"] == 10 and report["tokens"]["count"] == 10
    assert not report["corrupt"] and not report["unencodable"] and not report["shard_errors"]


def _with_item(request: dict) -> dict:
    messages = [dict(m) for m in request["messages"]]
    messages[-1]["content"] = "item x " + messages[-1]["content"]
    return dict(request, messages=messages)


def test_bad_settings_are_refused_before_any_request(tmp_path):
    with pytest.raises(ValueError, match="exactly one input"):
        run(GenerateConfig(out=str(tmp_path)))
    with pytest.raises(ValueError, match="needs images"):
        run(GenerateConfig(out=str(tmp_path), records="r.json"))
    with pytest.raises(ValueError, match="kinds must be distinct names"):
        run(GenerateConfig(out=str(tmp_path), shards=["a.tar"], kinds=["poem"]))


def test_rejection_reasons_are_the_documented_ones():
    import src.instruct.parse as parse

    for reason in BAD_REPLIES:
        assert re.search(rf"^- (\w+ / )?{reason}\b", parse.__doc__, re.MULTILINE), reason


def test_kind_limits_set_the_mix_of_kinds(tmp_path, jpeg_bytes):
    records = make_records(tmp_path / "in", 5, jpeg_bytes())
    with ChatServer(Teacher()) as server:
        # as the flag gives them: --kind-limits detail=2 complex_reasoning=0
        summary = run(make_config(tmp_path, server, records, kind_limits=["detail=2", "complex_reasoning=0"]))
    assert summary["samples"] == {"conversation": 5, "detail": 2, "complex_reasoning": 0, "total": 7}
    assert Counter(request_key(r) for r in server.requests) == Counter(
        [(str(i), "conversation") for i in range(5)] + [("0", "detail"), ("1", "detail")]
    )
    with pytest.raises(ValueError, match="expected kind=count"):
        GenerateConfig(kind_limits=["detail:2"])


def test_a_dry_run_shows_the_requests_and_sends_and_writes_nothing(tmp_path, jpeg_bytes):
    from src.instruct.cli import preview

    records = make_records(tmp_path / "in", 3, jpeg_bytes())  # 64x64 images, boxes in pixels
    config = GenerateConfig(out=str(tmp_path / "out"), records=str(records), images=str(records.parent / "images"))
    text = preview(config)
    assert text.count("######## image 0 (img0000.jpg)") == 3 and "image 1" not in text
    assert text.endswith(
        "--- user\nA photo of item 0 with a dog.\nA dog on a lawn with a red ball.\n\n"
        "dog: [0.125, 0.25, 0.625, 0.875]\nsports ball: [0.625, 0.75, 0.781, 0.938]"
    )
    assert not (tmp_path / "out").exists()


def test_coco_annotations_in_instruction_shards_out(tmp_path, jpeg_bytes, read_tar):
    from fake_teacher import make_coco

    captions, instances = make_coco(tmp_path / "coco", 3, jpeg_bytes())
    data = json.loads(instances.read_text())  # a box wholly outside image 100: dropped, the image kept
    data["annotations"].append({"id": 99, "image_id": 100, "category_id": 18, "bbox": [70, 10, 5, 5]})
    instances.write_text(json.dumps(data))
    with ChatServer(Teacher()) as server:
        config = GenerateConfig(
            out=str(tmp_path / "out"), coco_captions=str(captions), coco_instances=str(instances),
            images=str(tmp_path / "coco" / "train2017"), progress=False, max_count=4,
            teacher=ChatConfig(base_url=server.url, api_key_env=None),
        )  # fmt: skip
        summary = run(config)
    assert summary["samples"]["total"] == 9
    assert summary["input_boxes_dropped"] == {"no_area": 1} and summary["input_skipped"] == {}
    samples = read_json(tmp_path / "out" / "instruct.json")
    assert [s["image"] for s in samples[::3]] == ["000000000100.jpg", "000000000101.jpg", "000000000102.jpg"]
    contexts = {request_key(r): r["messages"][-1]["content"] for r in server.requests}
    assert (
        contexts[("100", "detail")]
        == "A photo of item 100 with a dog.\nA dog on a lawn.\n\ndog: [0.125, 0.25, 0.625, 0.875]"
    )
    assert contexts[("100", "conversation")] == "A photo of item 100 with a dog.\nA dog on a lawn."
    tars = sorted((tmp_path / "out" / "shards").glob("instruct-*.tar"))
    assert [len(read_tar(t)) for t in tars] == [4, 4, 1]


def test_a_llava_prompt_folder_sends_the_teacher_exactly_its_messages(tmp_path, jpeg_bytes):
    prompts = write_llava_prompts(tmp_path / "LLaVA" / "playground" / "data" / "prompts")
    records = make_records(tmp_path / "in", 2, jpeg_bytes())

    def respond(request: dict) -> str:
        kind = LLAVA_SYSTEMS[request["messages"][0]["content"]]
        return good_reply(re.search(r"item (\w+)", request["messages"][-1]["content"]).group(1), kind)

    with ChatServer(respond) as server:
        summary = run(make_config(tmp_path, server, records, prompts=str(prompts)))
    assert summary["samples"]["total"] == 6 and len(server.requests) == 6
    files = LLAVA_FILES

    def pair(name: str) -> list[dict]:
        return [
            {"role": "user", "content": files[f"{name}_caps.txt"]},
            {"role": "assistant", "content": files[f"{name}_conv.txt"]},
        ]

    def context(item: str, boxes: bool) -> dict:
        text = f"A photo of item {item} with a dog.\nA dog on a lawn with a red ball."
        if boxes:  # 64x64 images: dog [8, 16, 40, 56], ball [40, 48, 50, 60] in pixels
            text += "\n\ndog: [0.125, 0.25, 0.625, 0.875]\nsports ball: [0.625, 0.75, 0.781, 0.938]"
        return {"role": "user", "content": text}

    expected = {}
    for item in ("0", "1"):
        expected[(item, "conversation")] = [
            {"role": "system", "content": files["conversation/system_message.txt"]},
            *pair("conversation/000"),
            *pair("conversation/001"),
            context(item, boxes=False),
        ]
        expected[(item, "detail")] = [
            {"role": "system", "content": files["detail_description/system_message.txt"]},
            *pair("detail_description/000"),
            *pair("detail_description/001"),
            *pair("detail_description/002"),
            context(item, boxes=True),
        ]
        expected[(item, "complex_reasoning")] = [
            {"role": "system", "content": files["complex_reasoning/system_message.txt"]},
            *pair("complex_reasoning/9"),
            *pair("complex_reasoning/10"),
            context(item, boxes=True),
        ]
    sent = {}
    for request in server.requests:
        item = re.search(r"item (\w+)", request["messages"][-1]["content"]).group(1)
        sent[(item, LLAVA_SYSTEMS[request["messages"][0]["content"]])] = request["messages"]
    assert sent == expected


def test_a_reply_cut_off_by_the_token_limit_is_asked_again_with_a_larger_one(tmp_path, jpeg_bytes):
    records = make_records(tmp_path / "in", 2, jpeg_bytes())
    teacher = Teacher()

    def respond(request: dict):
        item, kind = request_key(request)
        if item == "1" and request["max_tokens"] < 4000:  # the whole reply needs 4000 tokens
            return good_reply(item, kind)[:120], "length"
        return teacher(request)

    with ChatServer(respond) as server:
        summary = run(make_config(tmp_path, server, records, kinds=["detail"], teacher={"max_tokens": 1000}))
    asked = [(r["max_tokens"], r["temperature"]) for r in server.requests if request_key(r)[0] == "1"]
    assert asked == [(1000, 0.2), (2000, 0.2), (4000, 0.2)]  # doubled, at the same temperature
    assert summary["samples"]["total"] == 2 and summary["rejections"] == {"truncated": 2}
    with Ledger(tmp_path / "out" / "ledger.jsonl") as ledger:
        entry = ledger.entries[("1", "detail")]
    assert entry["conversations"][1]["value"] == good_reply("1", "detail")  # the whole reply, not the cut one
    assert (entry["attempts"], entry["max_tokens"], entry["rejections"]) == (3, 4000, {"truncated": 2})


def test_without_a_max_tokens_setting_the_limit_grows_from_the_cut_off_reply(tmp_path, jpeg_bytes):
    records = make_records(tmp_path / "in", 1, jpeg_bytes())
    whole = good_reply("0", "detail")
    cut = " ".join(whole.split()[:30])  # the server's own limit stopped it at 30 tokens (words here)

    def respond(request: dict):
        return (cut, "length") if request.get("max_tokens") is None else whole

    with ChatServer(respond) as server:
        summary = run(make_config(tmp_path, server, records, kinds=["detail"], teacher={"max_tokens": None}))
    assert [r.get("max_tokens") for r in server.requests] == [None, 60]  # 30 tokens used, doubled
    assert summary["samples"]["total"] == 1 and summary["rejections"] == {"truncated": 1}
    with Ledger(tmp_path / "out" / "ledger.jsonl") as ledger:
        entry = ledger.entries[("0", "detail")]
    assert entry["conversations"][1]["value"] == whole and entry["max_tokens"] == 60


def test_a_reply_cut_off_at_the_cap_is_a_rejected_attempt_never_kept(tmp_path, jpeg_bytes):
    records = make_records(tmp_path / "in", 1, jpeg_bytes())
    cut = good_reply("0", "detail")  # a reply that would pass every check, but was cut off
    with ChatServer(lambda request: (cut, "length")) as server:
        config = make_config(
            tmp_path, server, records, kinds=["detail"], max_attempts=2, max_tokens_cap=3000,
            teacher={"max_tokens": 1000},
        )  # fmt: skip
        summary = run(config)
        with pytest.raises(ValueError, match=r"max_tokens_cap \(500\) is below the teacher's max_tokens \(1000\)"):
            run(make_config(tmp_path, server, records, max_tokens_cap=500, teacher={"max_tokens": 1000}))
    assert [(r["max_tokens"], r["temperature"]) for r in server.requests] == [
        (1000, 0.2), (2000, 0.2), (3000, 0.2), (3000, 0.7),
    ]  # fmt: skip
    assert summary["samples"]["total"] == 0 and summary["failed"] == {"rejected": 1}
    assert summary["rejections"] == {"truncated": 4}


def test_the_image_tag_goes_before_or_after_the_first_question_the_same_on_every_run(tmp_path, jpeg_bytes):
    records = make_records(tmp_path / "in", 16, jpeg_bytes())
    options = dict(kinds=["conversation", "detail"], image_position="random", seed=7)
    with ChatServer(Teacher()) as server:
        run(make_config(tmp_path, server, records, out=str(tmp_path / "a"), **options))
        # the same data in two runs (a resume): the draws do not depend on what was done before
        run(make_config(tmp_path, server, records, out=str(tmp_path / "b"), limit=5, **options))
        run(make_config(tmp_path, server, records, out=str(tmp_path / "b"), **options))
        with pytest.raises(ValueError, match="image_position must be one of"):
            run(make_config(tmp_path, server, records, image_position="end"))
    samples = read_json(tmp_path / "a" / "instruct.json")
    assert read_json(tmp_path / "b" / "instruct.json") == samples and len(samples) == 32
    questions = load_questions()
    placed = Counter()
    for sample in samples:
        first = sample["conversations"][0]["value"]
        before = image_first("random", 7, sample["source_id"], sample["kind"])
        assert first.startswith("<image>\n") if before else first.endswith("\n<image>")
        placed[before] += 1
        if sample["kind"] == "detail":
            assert first.replace("<image>", "").strip() == pick_question(questions, 7, sample["source_id"])
    assert placed[True] >= 5 and placed[False] >= 5


def test_the_detail_questions_are_a_file_the_config_names(tmp_path, jpeg_bytes):
    records = make_records(tmp_path / "in", 6, jpeg_bytes())
    (tmp_path / "questions.txt").write_text("What do you see here?\nTell me about this picture.\n")
    with ChatServer(Teacher()) as server:
        run(make_config(tmp_path, server, records, kinds=["detail"], detail_questions=str(tmp_path / "questions.txt")))
    asked = {s["conversations"][0]["value"] for s in read_json(tmp_path / "out" / "instruct.json")}
    assert asked == {"<image>\nWhat do you see here?", "<image>\nTell me about this picture."}
