"""`python -m src.chat --ckpt CKPT [--image PATH] ["question"]`: talk to a trained checkpoint.

With a question it prints the answer and exits. Without one it is a conversation: each line
is a question, the history is kept and rendered with the run's template, `/image PATH`
starts a new conversation about another image, `/reset` forgets the history (the image
stays), `/help` lists the commands, Ctrl-D (end of input) exits. Lines piped into stdin are
read the same way, without prompts.

The model and tokenizer come from the checkpoint's hyperparameters (as
`LlavaLitModule.load_from_checkpoint` rebuilds it); the template, system prompt and max
length from the checkpoint's data settings, or from `--config` (a run's YAML), which wins.
Replies are greedy, at most the model's `max_new_tokens` long, unless `--config` has a
`model.generation` section; flags override both.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import TextIO

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402
from PIL import Image  # noqa: E402

from src.core.config_files import load_merged  # noqa: E402
from src.data.conversation import IMAGE_TAG, ConversationEncoder, SampleError, build_template  # noqa: E402
from src.model.generation import (  # noqa: E402
    GenerationConfig,
    StopStrings,
    decode_reply,
    generate,
    row_generators,
)
from src.model.weights import NotACheckpoint, read_checkpoint  # noqa: E402

DATA_DEFAULTS = {"template": "vicuna_v1", "system_prompt": None, "max_length": 2048}
HELP = "commands: /image PATH (a new conversation about that image), /reset (forget the history), /help; Ctrl-D exits"


class ChatSession:
    """A conversation with one model: the history, the current image, and how replies are generated."""

    def __init__(
        self, module, template: str, system_prompt: str | None, max_length: int, generation: GenerationConfig
    ) -> None:
        self.module = module.eval()
        self.tokenizer = module.tokenizer
        self.encoder = ConversationEncoder(
            self.tokenizer,
            build_template(template, system_prompt, tokenizer=self.tokenizer),
            image_tokens=module.model.image_tokens,
            max_length=max_length,
        )
        self.transform = module.model.vision.image_transform()
        self.generation = generation
        self.max_new_tokens = generation.max_new_tokens or module.hparams.get("max_new_tokens", 32)
        self.pixels: torch.Tensor | None = None
        self.image_size: tuple[int, int] | None = None  # (width, height) of the current image
        self.token_count = module.model.image_token_count  # anyres: an image's tokens follow its size
        self.history: list[dict] = []
        self.turns = 0

    def set_image(self, path: str | Path | None) -> None:
        """A new conversation about this image (None: text only)."""
        self.history = []
        if path is None:
            self.pixels = self.image_size = None
            return
        with Image.open(path) as image:
            view = self.transform(image.convert("RGB"))
            self.image_size = image.size
        self.pixels = view[None] if view.dim() == 3 else view  # (views, 3, H, W)

    def reset(self) -> None:
        self.history = []

    def _image_tokens(self) -> int:
        """The current image's placeholder tokens, as the data pipeline counts them."""
        if self.token_count is not None:
            return self.token_count(*self.image_size)
        return self.pixels.shape[0] * self.encoder.image_tokens

    def ask(self, question: str) -> str:
        """The model's reply to `question` after the history; both join the history."""
        text = question.strip()
        if not self.history and self.pixels is not None and IMAGE_TAG not in text:
            text = f"{IMAGE_TAG}\n{text}"  # LLaVA's convention: the image before the first question
        messages = [*self.history, {"from": "human", "value": text}]
        images = 1 if self.pixels is not None else 0
        counts = [self._image_tokens()] if images else None
        encoded = self.encoder.encode_prompt(messages, num_images=images, image_tokens=counts)
        device = self.module.device
        ids = torch.tensor([encoded.input_ids], device=device)
        pixels = self.pixels.to(device) if images else None
        sizes = torch.tensor([self.image_size[::-1]], device=device) if images else None  # (height, width)
        cfg = self.generation
        generators = row_generators(cfg.seed, [f"chat-{self.turns}"], device) if cfg.sampling else None
        (reply,) = generate(
            self.module.model, ids, torch.tensor([ids.shape[1]], device=device), pixels, self.max_new_tokens,
            self.tokenizer.eos_token_id, temperature=cfg.temperature, top_p=cfg.top_p, generators=generators,
            stop=StopStrings(self.tokenizer, cfg.stop) if cfg.stop else None, image_sizes=sizes,
        )  # fmt: skip
        answer = decode_reply(self.tokenizer, reply, cfg.stop)
        self.history = [*messages, {"from": "gpt", "value": answer or "..."}]
        self.turns += 1
        return answer


def config_section(config: str, key: str) -> dict:
    """One top-level section of a run config, read as `python -m src.cli --config` reads the file: its
    `base:` files merged under it (`src.core.config_files`), `init_args` unwrapped."""
    merged = OmegaConf.to_container(load_merged([config]), resolve=False)
    section = merged.get(key) or {}
    return section.get("init_args", section)


def data_settings(ckpt: str, config: str | None) -> dict:
    """Template, system prompt and max length: defaults < the checkpoint's data settings < --config."""
    settings = dict(DATA_DEFAULTS)
    stored = read_checkpoint(ckpt, "--ckpt").get("datamodule_hyper_parameters")
    settings.update({k: v for k, v in (stored or {}).items() if k in DATA_DEFAULTS})
    if config is not None:
        data = config_section(config, "data")
        settings.update({k: v for k, v in data.items() if k in DATA_DEFAULTS})
    return settings


def load_session(
    ckpt: str, config: str | None = None, device: str | None = None, overrides: dict | None = None
) -> ChatSession:
    from src.training.module import LlavaLitModule

    read_checkpoint(ckpt, "--ckpt")  # a wrong file is one line naming it, before Lightning reads it
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    module = LlavaLitModule.load_from_checkpoint(ckpt, map_location=device)
    module.to(device)
    generation = module.generation_config
    if config is not None:  # the YAML's model.generation, if it has one
        model = config_section(config, "model")
        if model.get("generation"):
            generation = GenerationConfig(**{**asdict(generation), **model["generation"]})
    generation = replace(generation, **{k: v for k, v in (overrides or {}).items() if v is not None})
    settings = data_settings(ckpt, config)
    return ChatSession(module, settings["template"], settings["system_prompt"], settings["max_length"], generation)


def converse(session: ChatSession, stdin: TextIO, stdout: TextIO, interactive: bool) -> None:
    """Questions line by line until end of input; commands start with '/'."""
    terminal = interactive and stdin is sys.stdin and stdout is sys.stdout
    if terminal:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    if interactive:
        print(HELP, file=stdout)
    while True:
        if terminal:
            try:
                line = input("USER> ") + "\n"
            except EOFError:
                line = ""
        else:
            if interactive:
                print("USER> ", end="", file=stdout, flush=True)
            line = stdin.readline()
        if not line:  # Ctrl-D / end of input
            if interactive:
                print(file=stdout)
            return
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            command, _, argument = line.partition(" ")
            if command == "/reset":
                session.reset()
                print("(history cleared)", file=stdout)
            elif command == "/image" and argument.strip():
                try:
                    session.set_image(argument.strip())
                    print(f"(new conversation about {argument.strip()})", file=stdout)
                except OSError as error:
                    print(f"(cannot open image: {error})", file=stdout)
            else:
                print(HELP, file=stdout)
            continue
        try:
            answer = session.ask(line)
        except SampleError as error:
            print(f"({error}; /reset starts over)", file=stdout)
            continue
        print(f"ASSISTANT> {answer}" if interactive else answer, file=stdout, flush=True)


def main(argv: list[str] | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m src.chat", description=__doc__.split("\n\n")[0])
    parser.add_argument("question", nargs="?", help="ask once and exit; without it, a conversation")
    parser.add_argument("--ckpt", required=True, help="a Lightning checkpoint of LlavaLitModule")
    parser.add_argument("--config", help="the run's YAML: its data template / system prompt and model.generation")
    parser.add_argument("--image", help="the image to talk about")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--temperature", type=float, help="0 is greedy")
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--stop", action="append", help="a stop string (repeatable)")
    args = parser.parse_args(argv)
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    overrides = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
                 "seed": args.seed, "stop": args.stop}  # fmt: skip
    try:
        session = load_session(args.ckpt, args.config, args.device, overrides)
    except (NotACheckpoint, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    session.set_image(args.image)
    try:
        with torch.no_grad():
            if args.question is not None:
                print(session.ask(args.question), file=stdout)
            else:
                converse(session, stdin, stdout, interactive=stdin.isatty())
    except KeyboardInterrupt:  # Ctrl-C: leave quietly
        print(file=stdout)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
