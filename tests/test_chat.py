"""`python -m src.chat`: one question from the command line, and a conversation fed line by line.

A tiny model trains one step on the demo shards and is saved as a real Lightning checkpoint;
every expected answer is the greedy reply generated in process to the prompt the template
renders for the same history.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Trainer
from PIL import Image
from tiny_models import tiny_lit_module

from src.chat import main
from src.data.conversation import ConversationEncoder, build_template
from src.data.datamodule import LlavaDataModule
from src.training.module import LlavaLitModule

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def trained(demo_dir, shards, tmp_path_factory) -> tuple[Path, LlavaLitModule]:
    module = tiny_lit_module(demo_dir, max_new_tokens=5)
    data = LlavaDataModule(
        train_shards=shards["train"], train_view="conversations", batch_size=2, samples_per_epoch=4, num_workers=0,
        template="vicuna_v1", system_prompt="", max_length=400,
    )  # fmt: skip
    trainer = Trainer(
        accelerator="cpu", max_steps=1, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    ckpt = tmp_path_factory.mktemp("chat") / "tiny.ckpt"
    trainer.save_checkpoint(ckpt)
    return ckpt, module.eval()


@pytest.fixture(scope="module")
def image_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("img") / "scene.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    return path


def expected_reply(module: LlavaLitModule, messages: list[dict], image: Path | None, steps: int = 5) -> str:
    """The greedy reply to the chat `messages`, rendered by the checkpoint's template (vicuna_v1, no system)."""
    encoder = ConversationEncoder(module.tokenizer, build_template("vicuna_v1", ""), module.model.image_tokens, 400)
    pixels = None
    if image is not None:
        pixels = module.model.vision.image_transform()(Image.open(image).convert("RGB"))
        pixels = pixels[None] if pixels.dim() == 3 else pixels
    ids = encoder.encode_prompt(messages, 1 if image else 0).input_ids
    with torch.no_grad():
        (reply,) = module.model.generate(torch.tensor([ids]), torch.tensor([len(ids)]), pixels, steps, 3)
    return module.tokenizer.decode(reply, skip_special_tokens=True).strip()


def test_one_question_from_the_command_line(trained, image_path):
    ckpt, module = trained
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "src.chat", "--ckpt", str(ckpt), "--image", str(image_path), "--device", "cpu",
         "What colour is the square?"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    question = [{"from": "human", "value": "<image>\nWhat colour is the square?"}]
    assert done.stdout.strip().splitlines()[-1] == expected_reply(module, question, image_path)


def test_a_conversation_keeps_its_history_and_obeys_commands(trained, image_path, tmp_path):
    ckpt, module = trained
    other = tmp_path / "blue.png"
    Image.new("RGB", (64, 64), (30, 30, 200)).save(other)
    first = [{"from": "human", "value": "<image>\nWhat shape is it?"}]
    a1 = expected_reply(module, first, image_path, 8)

    def after_history(q: str) -> str:
        return expected_reply(
            module, [*first, {"from": "gpt", "value": a1}, {"from": "human", "value": q}], image_path, 8
        )

    def fresh(q: str) -> str:
        return expected_reply(module, [{"from": "human", "value": f"<image>\n{q}"}], image_path, 8)

    # a follow-up the near-random model answers differently with and without the history: the check has teeth
    candidates = ["Where is it?", "And the colour?", "How many are there?", "Is it big?", "Why?", "What is it?"]
    follow_up = next(q for q in candidates if after_history(q) != fresh(q))
    lines = ["What shape is it?", follow_up, "/reset", follow_up, f"/image {other}", "What colour is it?",
             "/nonsense", "/image /no/such/file.png"]  # fmt: skip
    out = io.StringIO()
    args = ["--ckpt", str(ckpt), "--image", str(image_path), "--device", "cpu", "--max-new-tokens", "8"]
    assert main(args, io.StringIO("\n".join(lines)), out) == 0
    printed = out.getvalue().splitlines()
    blue = expected_reply(module, [{"from": "human", "value": "<image>\nWhat colour is it?"}], other, 8)
    assert printed[:6] == [a1, after_history(follow_up), "(history cleared)", fresh(follow_up),
                           f"(new conversation about {other})", blue]  # fmt: skip
    assert printed[6].startswith("commands: /image PATH") and printed[7].startswith("(cannot open image:")
    assert len(printed) == 8  # end of input ends the conversation


def test_flags_override_the_generation_settings(trained, image_path):
    ckpt, module = trained
    out = io.StringIO()
    main(["--ckpt", str(ckpt), "--image", str(image_path), "--device", "cpu", "--max-new-tokens", "2", "Hi?"],
         io.StringIO(), out)  # fmt: skip
    full = expected_reply(module, [{"from": "human", "value": "<image>\nHi?"}], image_path)
    short = out.getvalue().strip()
    assert len(module.tokenizer(short, add_special_tokens=False)["input_ids"]) <= 2
    assert full.startswith(short)


class Terminal(io.StringIO):
    """Typed lines: an input stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_the_help_prompts_and_a_clean_exit(trained, image_path):
    ckpt, module = trained
    out = io.StringIO()
    assert main(["--ckpt", str(ckpt), "--image", str(image_path), "--device", "cpu"], Terminal("Hi?\n"), out) == 0
    answer = expected_reply(module, [{"from": "human", "value": "<image>\nHi?"}], image_path)
    assert out.getvalue().splitlines() == [
        "commands: /image PATH (a new conversation about that image), /reset (forget the history), /help; Ctrl-D exits",
        f"USER> ASSISTANT> {answer}",
        "USER> ",
    ]


def test_a_config_gives_the_template_and_generation_settings(trained, image_path, tmp_path):
    """--config (a run's YAML) wins over the checkpoint's data settings; its model.generation applies."""
    ckpt, module = trained
    config = tmp_path / "run.yaml"
    config.write_text(
        "model:\n  generation: {max_new_tokens: 3}\n"
        "data:\n  template: vicuna_v1\n  system_prompt: A system prompt the checkpoint never saw.\n"
    )
    out = io.StringIO()
    main(["--ckpt", str(ckpt), "--config", str(config), "--image", str(image_path), "--device", "cpu", "Hi?"],
         io.StringIO(), out)  # fmt: skip
    encoder = ConversationEncoder(
        module.tokenizer, build_template("vicuna_v1", "A system prompt the checkpoint never saw."),
        module.model.image_tokens, 400,
    )  # fmt: skip
    ids = encoder.encode_prompt([{"from": "human", "value": "<image>\nHi?"}], 1).input_ids
    pixels = module.model.vision.image_transform()(Image.open(image_path).convert("RGB"))
    pixels = pixels[None] if pixels.dim() == 3 else pixels
    with torch.no_grad():
        (reply,) = module.model.generate(torch.tensor([ids]), torch.tensor([len(ids)]), pixels, 3, 3)
    assert out.getvalue().strip() == module.tokenizer.decode(reply, skip_special_tokens=True).strip()
    assert "generation" not in torch.load(ckpt, weights_only=True, mmap=True)["hyper_parameters"]


def test_a_config_is_read_with_its_base_files(tmp_path):
    """A recipe with `base:` (experiments/llava15_7b/*.yaml) gives chat the sections its bases hold, as
    `python -m src.cli --config` reads it: the file wins over its bases; `init_args` is unwrapped."""
    from src.chat import config_section

    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "base.yaml").write_text("data:\n  template: plain\n  max_length: 64\n")
    run = tmp_path / "run.yaml"
    run.write_text(
        "base: [parts/base.yaml]\ndata:\n  max_length: 128\nmodel:\n  init_args: {generation: {top_p: 0.5}}\n"
    )
    assert config_section(str(run), "model") == {"generation": {"top_p": 0.5}}
    assert config_section(str(run), "data") == {"template": "plain", "max_length": 128}
    recipe = config_section("experiments/llava15_7b/stage2_finetune.yaml", "data")
    assert recipe["template"] == "vicuna_v1" and recipe["max_length"] == 2048  # from experiments/llava15/
