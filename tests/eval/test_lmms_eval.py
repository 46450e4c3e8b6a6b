"""lmms-eval interoperability, offline: the kit's checkpoints as lmms-eval's `kit` model, and an exported
folder under lmms-eval's own `llava_hf`, on local tasks the tests write to disk.

Each task is a folder lmms-eval reads with `--include_path`: a YAML config and a tiny dataset saved with
`datasets.save_to_disk` (`dataset_kwargs: {load_from_disk: true}`, so nothing is fetched from the hub).
The POPE task uses lmms-eval's own POPE functions (prompt, reading, aggregation) on a fake release in
POPE's official layout; the multiple-choice task asks the demo's test questions as the kit's `mc`
view asks them. lmms-eval runs in process (`lmms_eval.evaluator.simple_evaluate`), resolving `kit`
through its plugin registry (the `lmms_eval.models` entry point), and its answers and scores must be
the kit's own: `predict` + `python -m src.eval score` for POPE, `test` (multiple-choice accuracy by
`score_candidates`) for the options.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Trainer
from PIL import Image, ImageDraw

from src.data.conversation import IGNORE_INDEX
from src.data.datamodule import LlavaDataModule
from src.eval.answers import read_answers
from src.eval.benchmarks import get_benchmark
from src.eval.predictions import PredictionWriter, read_predictions
from src.model.generation import GenerationConfig
from tests.eval.lmms_reference import _needed, lmms_root
from tests.tiny_models import tiny_lit_module

pytestmark = pytest.mark.usefixtures("single_thread")

RUNTIME = ("loguru", "datasets", "evaluate", "sacrebleu", "tenacity", "pytz")  # what lmms-eval imports to run
DATA = {"template": "vicuna_v1", "system_prompt": "", "max_length": 400}
POPE_METRICS = {"pope_accuracy": "accuracy", "pope_precision": "precision", "pope_recall": "recall",
                "pope_f1_score": "f1", "pope_yes_ratio": "truth_yes_ratio"}  # fmt: skip


@pytest.fixture(scope="module")
def lmms_eval():
    lmms_root()  # lmms-eval 0.7.3 installed (skips, or fails under CI, with how to install it)
    for module in RUNTIME:
        if importlib.util.find_spec(module) is None:
            _needed(f"running lmms-eval needs {module}: nox -s tests installs lmms-eval's runtime (noxfile.py)")
    import lmms_eval.evaluator

    return lmms_eval


@pytest.fixture(scope="module")
def checkpoint(demo_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A tiny timm-tower checkpoint (a composition transformers' Llava cannot hold) and its run config, whose
    `data` section (template, system prompt, max length) `config=` reads. Its weights are drawn wide
    (std 0.5): a small-init model says the same words to every prompt, which would let a wrong prompt pass."""
    from src.training.module import FreezeConfig

    module = tiny_lit_module(demo_dir, max_new_tokens=5, freeze=FreezeConfig("full", "full", "full"))
    module.configure_model()
    widen(module)
    trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_epochs=0)
    trainer.strategy.connect(module)
    folder = tmp_path_factory.mktemp("kit")
    trainer.save_checkpoint(folder / "tiny.ckpt")
    (folder / "config.yaml").write_text(yaml.safe_dump({"data": {"init_args": DATA}}))
    return folder / "tiny.ckpt", folder / "config.yaml"


def widen(module, seed: int = 0) -> None:
    """Every weight drawn from N(0, 0.5^2), so replies follow the prompt and image (see `checkpoint`)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in module.model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)


def load(path: Path):
    from src.training.module import LlavaLitModule

    return LlavaLitModule.load_from_checkpoint(path, map_location="cpu").eval()


COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
SHAPES = ("circle", "square", "triangle")
WHERE = ("on the left", "on the right", "in the middle")


def draw_scene(path: Path, colour: str, shape: str, column: int) -> None:
    """A 64 px scene: one coloured shape on grey, in one of three columns."""
    image = Image.new("RGB", (64, 64), (128, 128, 128))
    draw = ImageDraw.Draw(image)
    box = (4 + 20 * column, 20, 20 + 20 * column, 36)
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=fill)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def write_pope_release(root: Path, per_split: int = 6) -> Path:
    """POPE's official layout (coco_pope_<split>.json, one JSON object a line; images in val2014/) with
    drawn scenes, and questions in the demo tokenizer's words, so the replies differ by question."""
    colours, splits = list(COLOURS), ("adversarial", "popular", "random")
    for s, split in enumerate(splits):
        rows = []
        for q in range(per_split):
            n = s * per_split + q
            image = f"COCO_val2014_{n:012d}.png"
            colour, shape, column = colours[n % 4], SHAPES[n % 3], n % 2
            draw_scene(root / "val2014" / image, colour, shape, column)
            asked = (colours[(n + q % 2) % 4], SHAPES[(n + q // 2) % 3])
            label = "yes" if asked == (colour, shape) else "no"
            text = f"Is there a {asked[0]} {asked[1]} {WHERE[q % 3]} of the image?"
            rows.append({"question_id": q + 1, "image": image, "text": text, "label": label})
        (root / f"coco_pope_{split}.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


# ---- local lmms-eval tasks ------------------------------------------------------------------------
def save_dataset(folder: Path, rows: list[dict]) -> Path:
    """A DatasetDict with one `test` split, `image` as an Image feature (lmms-eval drops it from logs)."""
    import datasets

    columns = {key: [row[key] for row in rows] for key in rows[0]}
    features = datasets.Features(
        {
            key: datasets.Image() if key == "image" else datasets.Value("string" if isinstance(v[0], str) else "int64")
            for key, v in columns.items()
            if key != "options"
        }  # fmt: skip
        | ({"options": datasets.Sequence(datasets.Value("string"))} if "options" in columns else {})
    )
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(columns, features=features)}).save_to_disk(str(folder))
    return folder


def write_task(folder: Path, name: str, config: dict, utils: str) -> Path:
    """`<folder>/<name>/{<name>.yaml, utils.py}`; `!function utils.x` entries are written as tags."""
    task = folder / name
    task.mkdir(parents=True, exist_ok=True)
    (task / "utils.py").write_text(utils)
    text = yaml.safe_dump({"task": name, **config}, sort_keys=False)
    text = text.replace("'!function ", "!function ").replace("_FUNCTION'", "")
    (task / f"{name}.yaml").write_text(text)
    return folder


def function(name: str) -> str:
    return f"!function utils.{name}_FUNCTION"


def pope_task(folder: Path, release: Path, generation: dict) -> Path:
    """lmms-eval's POPE task (its functions, prompt and metrics) on the release's questions, all splits."""
    rows = []
    for split in ("adversarial", "popular", "random"):
        for line in (release / f"coco_pope_{split}.json").read_text().splitlines():
            item = json.loads(line)
            image = Image.open(release / "val2014" / item["image"]).convert("RGB")
            rows.append({"question_id": item["question_id"], "question": item["text"], "answer": item["label"],
                         "category": split, "image": image})  # fmt: skip
    data = save_dataset(folder / "pope_data", rows)
    metrics = [{"metric": m, "aggregation": function(f"pope_aggregate_{m.removeprefix('pope_')}"),
                "higher_is_better": True} for m in POPE_METRICS]  # fmt: skip
    config = {
        "dataset_path": str(data), "dataset_kwargs": {"load_from_disk": True}, "test_split": "test",
        "output_type": "generate_until", "doc_to_visual": function("pope_doc_to_visual"),
        "doc_to_text": function("pope_doc_to_text"), "doc_to_target": "answer", "generation_kwargs": generation,
        "process_results": function("pope_process_results"), "metric_list": metrics,
        "lmms_eval_specific_kwargs": {"default": {"pre_prompt": "",
                                                  "post_prompt": "\nAnswer the question using a single word or phrase."}},
    }  # fmt: skip
    return write_task(folder / "tasks", "kit_pope", config, "from lmms_eval.tasks.pope.utils import *  # noqa\n")


MC_UTILS = """
from src.data.conversation import OPTION_LETTERS, multiple_choice_prompt


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return multiple_choice_prompt(doc["question"], list(doc["options"]), "letter")


def doc_to_choice(doc):
    return list(OPTION_LETTERS[: len(doc["options"])])
"""


def mc_task(folder: Path, test_shard: str, read_tar) -> tuple[Path, list[dict]]:
    """The demo test shard's multiple-choice questions, in shard order, as a `multiple_choice` task whose
    options are the letters the kit's `letter` format ranks."""
    import io

    from src.data.records import questions

    rows = []
    for key, members in read_tar(test_shard):
        record = json.loads(members["json"])
        image = Image.open(io.BytesIO(members["jpg"])).convert("RGB")
        for number, mc in enumerate(questions(record)):
            rows.append({"id": f"{key}-{number}", "question": mc.question, "options": list(mc.options),
                         "answer": mc.answer, "image": image})  # fmt: skip
    data = save_dataset(folder / "mc_data", rows)
    config = {
        "dataset_path": str(data), "dataset_kwargs": {"load_from_disk": True}, "test_split": "test",
        "output_type": "multiple_choice", "doc_to_visual": function("doc_to_visual"),
        "doc_to_text": function("doc_to_text"), "doc_to_choice": function("doc_to_choice"),
        "doc_to_target": "answer", "target_delimiter": "",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
    }  # fmt: skip
    return write_task(folder / "tasks", "kit_mc", config, MC_UTILS), rows


def run_lmms(
    lmms_eval, tasks: Path, task: str, model: str, model_args: str, batch_size: int = 1, force_simple: bool = False
) -> dict:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    manager = TaskManager("WARNING", include_path=str(tasks), include_defaults=False, model_name=model)
    return simple_evaluate(
        model=model, model_args=model_args, tasks=[task], batch_size=batch_size, task_manager=manager,
        log_samples=True, bootstrap_iters=0, process_docs_parallel=1, verbosity="WARNING", force_simple=force_simple,
    )  # fmt: skip


# ---- the kit's own side ---------------------------------------------------------------------------
def kit_predict(module, records: Path, images: Path, out: Path, generation: GenerationConfig) -> list[dict]:
    """`python -m src.cli predict --data.predict_json ...` in process (the same datamodule and writer)."""
    module.generation_config = generation
    data = LlavaDataModule(predict_json=str(records), predict_images=str(images), eval_batch_size=3, num_workers=0,
                           **DATA)  # fmt: skip
    trainer = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, callbacks=[PredictionWriter(output=str(out), model_name="kit")])  # fmt: skip
    trainer.predict(module, datamodule=data, return_predictions=False)
    return read_predictions(out)


def kit_pope(module, release: Path, folder: Path, generation: GenerationConfig) -> tuple[dict, dict[str, str]]:
    """`convert pope` -> `predict` -> POPE's scorer: the `all` row, and the replies by question id."""
    pope = get_benchmark("pope")
    args = argparse.Namespace(root=release, split="all", images=None, out=folder, json_only=True, prefix=None,
                              max_count=100)  # fmt: skip
    pope.convert(args)
    rows = kit_predict(module, folder / "pope_all.json", release / "val2014", folder / "predictions.jsonl", generation)
    answers, _ = read_answers(folder / "predictions.jsonl")
    result = pope.evaluate(pope.load(args).questions, answers)
    computed = {key.removeprefix("all/"): float(v) for key, v in result["computed"].items() if key.startswith("all/")}
    return computed, {row["id"]: row["answer"] for row in rows}


def lmms_pope_replies(results: dict, task: str) -> dict[str, str]:
    """lmms-eval's logged replies by the kit's question id (`<split>-<question_id>`)."""
    replies = {}
    for sample in results["samples"][task]:
        doc = sample["doc"]
        replies[f"{doc['category']}-{doc['question_id']}"] = sample["filtered_resps"][0]
    return replies


# ---- the tests ------------------------------------------------------------------------------------
def test_kit_is_a_registered_lmms_eval_model(lmms_eval):
    from lmms_eval.models import get_model

    from src.lmms_eval_model import KitModel

    names = [ep.name for ep in entry_points(group="lmms_eval.models")]
    assert "kit" in names, "the kit's entry point is missing: reinstall the kit (pip install -e .)"
    assert get_model("kit") is KitModel


def test_generate_until_answers_and_scores_as_predict_and_the_pope_scorer(lmms_eval, checkpoint, tmp_path):
    ckpt, config = checkpoint
    module = load(ckpt)
    release = write_pope_release(tmp_path / "pope")
    # the replies without a stop string; one of their later words becomes `until`, so the cut is exercised
    _, free = kit_pope(module, release, tmp_path / "free", GenerationConfig(max_new_tokens=4))
    stop = next(word for reply in free.values() for word in reply.split()[1:] if word.isalpha())
    generation = {"max_new_tokens": 4, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False,
                  "until": [stop]}  # fmt: skip
    tasks = pope_task(tmp_path, release, generation)
    results = run_lmms(lmms_eval, tasks, "kit_pope", "kit", f"checkpoint={ckpt},config={config},device=cpu", 3)

    ours, replies = kit_pope(module, release, tmp_path / "stopped", GenerationConfig(max_new_tokens=4, stop=[stop]))
    theirs = lmms_pope_replies(results, "kit_pope")
    assert theirs == replies  # the same 18 replies, question for question
    assert any(replies[key] != free[key] for key in replies)  # `until` cut some
    assert len({*replies.values()}) > 1
    scores = results["results"]["kit_pope"]
    for metric, column in POPE_METRICS.items():
        assert scores[f"{metric},none"] == pytest.approx(ours[column], abs=1e-9), metric


def lmms_loglikelihood_run(lmms_eval, tasks: Path, name: str, model_args: str) -> tuple[list, list[list], float]:
    """lmms-eval's own requests for a `multiple_choice` task (`construct_requests`), answered by the model's
    `loglikelihood`, scored by the task's `process_results` and `mean`: (docs, results per doc, accuracy).

    Not `simple_evaluate`: lmms-eval 0.7.3's evaluator passes every response through
    `unwrap_generation_output`, which turns a loglikelihood's (float, bool) into its str(), so no
    model's loglikelihood reaches `process_results` intact there (see docs/evaluation.md)."""
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager, get_task_dict

    manager = TaskManager("WARNING", include_path=str(tasks), include_defaults=False, model_name="kit")
    task = get_task_dict([name], manager)[name]
    lm = get_model("kit").create_from_arg_string(model_args, {"batch_size": 4})
    lm.task_dict[name] = task.dataset
    docs = list(task.test_docs())
    requests = [task.construct_requests(doc_id=i, ctx=task.doc_to_text(doc),
                                        metadata={"task": name, "doc_id": i, "repeats": 1, "split": "test"})
                for i, doc in enumerate(docs)]  # fmt: skip
    flat = [request for per_doc in requests for request in per_doc]
    answers = iter(lm.loglikelihood(flat))
    results = [[next(answers) for _ in per_doc] for per_doc in requests]
    accuracy = sum(task.process_results(doc, r)["acc"] for doc, r in zip(docs, results, strict=True)) / len(docs)
    return docs, results, accuracy


def test_loglikelihood_is_minus_score_candidates_and_mc_accuracy_is_the_kits(lmms_eval, checkpoint, shards, read_tar,
                                                                        tmp_path):  # fmt: skip
    ckpt, config = checkpoint
    tasks, rows = mc_task(tmp_path, shards["test"][0], read_tar)
    docs, results, accuracy = lmms_loglikelihood_run(
        lmms_eval, tasks, "kit_mc", f"checkpoint={ckpt},config={config},device=cpu"
    )

    module = load(ckpt)
    data = LlavaDataModule(test_shards=shards["test"], eval_view="mc", eval_batch_size=4, num_workers=0, **DATA)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (kit,) = trainer.test(module, datamodule=data, verbose=False)
    scores = []  # the kit's own ranking of each question's options (its `mc` view), in shard order
    for batch in data.test_dataloader():
        prompt_lengths = (batch["labels"] != IGNORE_INDEX).int().argmax(dim=1)
        with torch.no_grad():
            table = module.model.score_candidates(
                batch["input_ids"],
                prompt_lengths,
                pixel_values=batch["pixel_values"],
                candidates=batch["mc_candidates"],
            )
        scores += [row[: len(options)].tolist() for row, options in zip(table, batch["mc_candidates"], strict=True)]

    assert len(docs) == len(rows) == len(scores) == len(results)
    assert [doc["question"] for doc in docs] == [row["question"] for row in rows]
    for got, expected in zip(results, scores, strict=True):
        assert [-loss for loss, _ in got] == pytest.approx(expected, abs=1e-4)  # a loss: see KitModel.loglikelihood
        assert all(isinstance(greedy, bool) for _, greedy in got)
    assert accuracy == pytest.approx(float(kit["test/mc_accuracy"]), abs=1e-6)  # the kit logs a float32
    picked = {max(range(len(s)), key=s.__getitem__) for s in scores}
    assert len(picked) > 1  # the model does not pick one letter throughout: the accuracy has teeth


def test_llava_hf_answers_an_exported_folder_as_the_kit_predicts(lmms_eval, demo_dir, tmp_path):
    """lmms-eval's own `llava_hf` on `python -m src.export to-hf`'s folder, unchanged: the same replies as
    the kit's `predict` with the model that was exported. `--force_simple`: lmms-eval 0.7.3 otherwise
    resolves `llava_hf` to its chat variant, which needs tasks with `doc_to_messages`."""
    if importlib.util.find_spec("decord") is None:
        _needed("lmms-eval's llava_hf imports decord: pip install decord (the lmms extra has it)")
    from src.export import export
    from tests.test_export import make_module

    module = make_module(demo_dir / "tokenizer", max_new_tokens=4)  # a CLIP tower: transformers' Llava holds it
    widen(module)
    folder = export(module, tmp_path / "hf", template=DATA["template"], system_prompt=DATA["system_prompt"])
    release = write_pope_release(tmp_path / "pope")
    generation = {"max_new_tokens": 4, "temperature": 0, "top_p": 1.0, "num_beams": 1, "do_sample": False}
    tasks = pope_task(tmp_path, release, generation)
    results = run_lmms(lmms_eval, tasks, "kit_pope", "llava_hf", f"pretrained={folder},device=cpu,device_map=cpu,dtype=float32",
                       force_simple=True)  # fmt: skip

    ours, replies = kit_pope(module, release, tmp_path / "kit", GenerationConfig(max_new_tokens=4))
    assert lmms_pope_replies(results, "kit_pope") == replies
    assert len({*replies.values()}) > 1
    scores = results["results"]["kit_pope"]
    for metric, column in POPE_METRICS.items():
        assert scores[f"{metric},none"] == pytest.approx(ours[column], abs=1e-9), metric
