"""docs/extending.md: every worked example runs as written, the YAML beside it selects it, and what
it registers does its job (a projector its num_tokens, a tower family the whole contract of
tests/model/test_contracts.py, a template LLaMA-tokenizer ids equal to the tokenizer's own on the
rendered text, a view its examples, a benchmark a converted release and a scored report).

Each ```python title="x.py"``` block of the page is run as module `x`; what it registers is removed
from the registries after the test, so no other test sees it."""

from __future__ import annotations

import importlib
import json
import re
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from src.data.conversation import IGNORE_INDEX, IMAGE_TAG, TEMPLATES, ConversationEncoder, build_template
from src.data.datamodule import LlavaDataModule
from src.data.spec import DataSpec
from src.data.views import VIEWS, Chat, ViewSettings
from src.eval.__main__ import main as eval_main
from src.eval.benchmarks import BENCHMARKS
from src.model.image_transform import ImageTransform
from src.model.projector import PROJECTORS, ProjectorConfig, build_projector
from src.model.vision import VISION_TOWERS, VisionConfig, build_vision_tower
from tests.eval.test_benchmarks import test_every_member_keeps_the_contract as check_benchmark_contract
from tests.model.test_contracts import check_tower_contract, tower_output

pytestmark = pytest.mark.usefixtures("single_thread")

DOC = Path(__file__).parents[1] / "docs" / "extending.md"
FENCE = re.compile(r"^```(?P<info>[^\n]*)\n(?P<body>.*?)^```$", re.MULTILINE | re.DOTALL)
RUNNABLE = re.compile(r'python title="(?P<name>\w+)\.py"')
SECTIONS = ("A projector", "A vision tower family", "A conversation template", "A data view", "A benchmark")


def sections() -> dict[str, list[tuple[str, str]]]:
    """The page's `## ` sections, each as its fenced blocks (info string, body)."""
    parts = re.split(r"^## (.+)$", DOC.read_text(), flags=re.MULTILINE)[1:]  # title, text, title, text ...
    texts = dict(zip(parts[::2], parts[1::2], strict=True))
    return {title: [(m["info"].strip(), m["body"]) for m in FENCE.finditer(text)] for title, text in texts.items()}


@pytest.fixture
def run_example(monkeypatch):
    """Runs a section's example as a module; returns it and the section's YAML blocks, parsed."""
    for registry in (PROJECTORS, VISION_TOWERS, TEMPLATES, VIEWS, BENCHMARKS):
        monkeypatch.setattr(registry, "_items", dict(registry._items))

    def run(section: str) -> tuple[types.ModuleType, list[dict]]:
        blocks = sections()[section]
        ((name, code),) = [(m["name"], body) for info, body in blocks if (m := RUNNABLE.fullmatch(info))]
        module = types.ModuleType(name)
        module.__file__ = str(DOC)
        monkeypatch.setitem(sys.modules, name, module)
        exec(compile(code, f"{DOC}[{name}.py]", "exec"), module.__dict__)  # noqa: S102 - the page's own example
        return module, [yaml.safe_load(body) for info, body in blocks if info == "yaml"]

    return run


@pytest.fixture(scope="module")
def llama_tokenizer(tmp_path_factory):
    """Mistral-7B v0.1's SentencePiece model as a Llama tokenizer (vicuna-7b-v1.5's settings), with `<image>`."""
    import mistral_common
    from transformers import LlamaTokenizer

    folder = tmp_path_factory.mktemp("spm")
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tokenizer.model.v1", folder / "tokenizer.model")
    tokenizer = LlamaTokenizer.from_pretrained(folder, legacy=False, add_bos_token=True)
    tokenizer.add_tokens([IMAGE_TAG], special_tokens=True)
    return tokenizer


def test_every_section_has_one_runnable_example_and_its_yaml():
    found = sections()
    assert [title for title in found if any(RUNNABLE.fullmatch(info) for info, _ in found[title])] == list(SECTIONS)
    for title in SECTIONS:
        assert sum(info == "yaml" for info, _ in found[title]) == 1, title


def test_the_projector_gives_its_num_tokens(run_example):
    module, (config,) = run_example("A projector")
    tower, features = tower_output("timm", "vit")  # a tiny timm ViT: a 4x4 grid, no CLS kept
    projector = build_projector(ProjectorConfig(**config["model"]["projector"]), tower.hidden_size, 24, tower.grid)
    assert isinstance(projector, module.ConvPoolProjector) and projector.num_tokens == 2 * 2
    tokens = projector(features)
    assert tokens.shape == (1, projector.num_tokens, 24)
    tokens.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projector.parameters())
    with pytest.raises(ValueError, match="stride 3 does not divide the 4x4 grid"):
        build_projector(ProjectorConfig("conv_pool", {"stride": 3}), tower.hidden_size, 24, tower.grid)
    with pytest.raises(ValueError, match="prefix token"):
        build_projector(ProjectorConfig("conv_pool"), tower.hidden_size, 24, tower.grid, prefix_tokens=1)


def test_the_tower_family_keeps_the_contract(run_example):
    module, (config,) = run_example("A vision tower family")
    vision = config["model"]["vision"]
    check_tower_contract(vision)  # every promise of VisionTower, as for the kit's own families
    tower = build_vision_tower(VisionConfig(**vision))
    assert isinstance(tower, module.PatchMLPTower)
    assert (tower.grid, tower.hidden_size, tower.layer, len(tower.wrap_modules())) == ((4, 4), 32, 1, 2)
    with pytest.raises(ValueError, match=re.escape("vision: type 'patch_mlp' does not use ['name']")):
        build_vision_tower(VisionConfig(**vision, name="some/model"))
    with pytest.raises(ValueError, match=re.escape("does not take kwargs ['heads']")):
        build_vision_tower(VisionConfig(**vision | {"kwargs": {"heads": 2}}))


def test_the_template_renders_what_the_tokenizer_reads(run_example, llama_tokenizer):
    _, (config,) = run_example("A conversation template")
    encoder = ConversationEncoder(llama_tokenizer, build_template(config["data"]["template"]), image_tokens=3)
    chat = [
        {"from": "human", "value": "<image>\nWhat colour is the square?"},
        {"from": "gpt", "value": "It is red."},
        {"from": "human", "value": "And the circle?"},
        {"from": "gpt", "value": "Blue."},
    ]
    encoded = encoder.encode(chat, num_images=1)
    text = "Question: <image>\nWhat colour is the square?\nAnswer: It is red.</s>\nQuestion: And the circle?\nAnswer: Blue.</s>\n"
    image_id = llama_tokenizer.convert_tokens_to_ids(IMAGE_TAG)
    assert encoded.input_ids.count(image_id) == 3
    one_tag = [t for i, t in enumerate(encoded.input_ids) if t != image_id or encoded.input_ids[i - 1] != image_id]
    assert one_tag == llama_tokenizer(text)["input_ids"]  # the tokenizer's own ids of the whole text, bos first
    replies = [t for t, label in zip(encoded.input_ids, encoded.labels, strict=True) if label != IGNORE_INDEX]
    eos = llama_tokenizer.eos_token_id
    assert replies == [*llama_tokenizer.encode("It is red.", add_special_tokens=False), eos,
                       *llama_tokenizer.encode("Blue.", add_special_tokens=False), eos]  # fmt: skip
    prompt = encoder.encode_prompt(chat[:1], num_images=1)
    assert prompt.text == "<s>Question: <image>\nWhat colour is the square?\nAnswer:"


def test_the_view_turns_a_record_into_examples(run_example, llama_tokenizer):
    module, (config,) = run_example("A data view")
    datamodule = LlavaDataModule(**config["data"])  # the names are checked when the config is read
    datamodule.spec = DataSpec(llama_tokenizer, ImageTransform(32, (0.5,) * 3, (0.5,) * 3), image_tokens=4)
    builder = datamodule.example_builder(datamodule.hparams.train_view)
    record = {
        "caption": "A red square on grey.",
        "conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}],
    }
    image = Image.new("RGB", (40, 30), (200, 0, 0))
    mine, conversation = builder(record, [image])
    encoder = builder.encoder
    asked = [
        {"from": "human", "value": "<image>\nDescribe the image in one sentence."},
        {"from": "gpt", "value": "A red square on grey."},
    ]
    for example, chat in ((mine, asked), (conversation, record["conversations"])):
        expected = encoder.encode(chat, num_images=1)
        assert (example.input_ids.tolist(), example.labels.tolist()) == (expected.input_ids, expected.labels)
        assert torch.equal(example.pixel_values, builder.image_transform(image)) and example.mc is None
    last = module.caption_question(record, [image], ViewSettings(image_position="last"))
    assert last == [Chat([{"from": "human", "value": "Describe the image in one sentence.\n<image>"}, asked[1]])]
    assert [reason for reason in _skips(builder, {"caption": "x"})] == ["missing_image"]
    assert [reason for reason in _skips(builder, {"conversations": []}, image)] == ["missing_field"]


def _skips(builder, record: dict, *images: Image.Image) -> list[str]:
    from src.data.conversation import SampleError

    try:
        builder(record, list(images))
    except SampleError as error:
        return [error.reason]
    return []


def test_the_benchmark_converts_a_release_and_scores_predictions(run_example, tmp_path):
    _, (config,) = run_example("A benchmark")
    check_benchmark_contract("colour_qa")
    root, out, reports = tmp_path / "colour_qa", tmp_path / "shards", tmp_path / "reports"
    (root / "images").mkdir(parents=True)
    rows = [
        (1, "red", "What colour is the square?", "red", "shapes"),
        (2, "blue", "What colour is the circle?", "Blue", "shapes"),
        (3, "green", "What colour is the grass?", "green", "nature"),
        (4, "sky", "What colour is the sky?", "blue", "nature"),
    ]
    for _, image, *_ in rows:
        Image.new("RGB", (16, 16), (10, 20, 30)).save(root / "images" / f"{image}.png")
    lines = [
        {"id": n, "image": f"{image}.png", "question": q, "answer": a, "category": c} for n, image, q, a, c in rows
    ]
    (root / "questions.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    eval_main(["convert", "colour_qa", "--root", str(root), "--out", str(out)])
    records = json.loads((out / "colour_qa_test.json").read_text())
    assert [r["id"] for r in records] == ["colour-1", "colour-2", "colour-3", "colour-4"]
    assert records[1]["conversations"] == [
        {"from": "human", "value": "<image>\nWhat colour is the circle?\nAnswer the question using a single word or phrase."},
        {"from": "gpt", "value": "Blue"},
    ]  # fmt: skip
    assert (out / "colour_qa_test-000000.tar").is_file()

    predictions = tmp_path / "predictions.jsonl"
    answers = [{"id": "colour-1", "answer": "Red."}, {"question_id": "colour-2", "text": " blue"},
               {"id": "colour-3", "answer": "yellow"}]  # fmt: skip
    predictions.write_text("".join(json.dumps(a) + "\n" for a in answers))
    eval_main(["score", "colour_qa", "--root", str(root), "--predictions", str(predictions), "--out", str(reports)])
    report = json.loads((reports / "report.json").read_text())
    assert report["rows"] == {"nature": {"accuracy": 0.0}, "shapes": {"accuracy": 100.0}, "": {"accuracy": 50.0}}
    assert (report["missing"], report["failures"]) == (["colour-4"], [])

    callback = config["trainer"]["callbacks"][0]  # the YAML's training-time evaluation builds
    module_name, class_name = callback["class_path"].rsplit(".", 1)
    evaluation = getattr(importlib.import_module(module_name), class_name)(**callback["init_args"])
    ((name, _, limit, args),) = evaluation.entries
    assert (name, limit, args.root, args.split) == ("colour_qa", 200, Path("data/colour_qa"), "test")
