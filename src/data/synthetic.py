"""Deterministic demo data: scenes of coloured shapes, with captions, chats and multiple choice.

The demo must show, on a laptop CPU in minutes, that the model reads the image: every
question is about what is drawn, and the correct option is uniformly placed among four,
so from the text alone a model can do no better than chance (0.25).

Scenes are drawn on a grid of cells so that a tiny ViT whose patch equals a cell sees one
object per token; questions still need the model to relate words to the right tokens
(which shape is the red one, which of two objects is further left, how many are there).

    python -m src.data.synthetic --out data_shards/demo

regenerates the committed demo shards and tokenizer bit for bit.
"""

from __future__ import annotations

import argparse
import io
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from src.data.conversation import MC_FORMATS, OPTION_LETTERS, multiple_choice_answer, multiple_choice_prompt

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
    "purple": (150, 60, 190),
}
SHAPES = ("circle", "square", "triangle", "diamond")
COUNT_WORDS = ("one", "two", "three", "four")
RELATIONS = ("left", "right", "above", "below")
QUESTION_TYPES = ("colour", "shape", "count", "position")
BACKGROUND = (235, 235, 235)
OUTLINE = (20, 20, 20)
DEMO_MC_FORMAT = "option"  # see MC_FORMATS and the README: why the demo ranks option texts


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    row: int
    col: int

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class SceneSpec:
    """How scenes are laid out; the defaults are the committed demo's."""

    image_size: int = 64
    grid: int = 2
    max_objects: int = 4
    relative_position: bool = False
    """Position questions relate two objects ("where is A relative to B") instead of
    placing one in the image; a from-scratch model needs far longer to learn them."""


def sample_scene(rng: random.Random, spec: SceneSpec) -> list[SceneObject]:
    """1..max_objects objects in distinct cells; no two share both colour and shape."""
    n = rng.randint(1, spec.max_objects)
    cells = rng.sample(range(spec.grid * spec.grid), n)
    kinds = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
    return [SceneObject(c, s, cell // spec.grid, cell % spec.grid) for (c, s), cell in zip(kinds, cells, strict=True)]


def render_scene(objects: list[SceneObject], spec: SceneSpec, rng: random.Random) -> Image.Image:
    image = Image.new("RGB", (spec.image_size, spec.image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    cell = spec.image_size / spec.grid
    for obj in objects:
        size = cell * rng.uniform(0.65, 0.85)
        cx = (obj.col + 0.5) * cell + rng.uniform(-0.5, 0.5) * (cell - size) / 2
        cy = (obj.row + 0.5) * cell + rng.uniform(-0.5, 0.5) * (cell - size) / 2
        half = size / 2
        box = (cx - half, cy - half, cx + half, cy + half)
        fill = COLOURS[obj.colour]
        # a dark outline makes the silhouette visible whatever the fill colour
        line = {"fill": fill, "outline": OUTLINE, "width": max(1, round(cell / 16))}
        if obj.shape == "circle":
            draw.ellipse(box, **line)
        elif obj.shape == "square":
            draw.rectangle(box, **line)
        elif obj.shape == "triangle":
            draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], **line)
        else:  # diamond
            draw.polygon([(cx, cy - half), (cx + half, cy), (cx, cy + half), (cx - half, cy)], **line)
    return image


def relation(a: SceneObject, b: SceneObject) -> str | None:
    """Where a is relative to b, by the dominant axis; None when the axes tie."""
    dx, dy = a.col - b.col, a.row - b.row
    if abs(dx) == abs(dy):
        return None
    if abs(dx) > abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def caption(objects: list[SceneObject]) -> str:
    """Every object in reading order (dense grounding of colour and shape for stage 1).

    Regions ("at the top left") are left out: measured on the demo, they slowed the
    learning of shapes and did not speed up that of positions."""
    names = [f"a {o.name}" for o in sorted(objects, key=lambda o: (o.row, o.col))]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    noun = "object" if len(objects) == 1 else "objects"
    return f"{COUNT_WORDS[len(objects) - 1].capitalize()} {noun} on a grey background: {listed}."


def _bands(grid: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (
        (("top", "middle", "bottom"), ("left", "centre", "right"))
        if grid == 3
        else (("top", "bottom"), ("left", "right"))
    )


def region(obj: SceneObject, grid: int) -> str:
    """The part of the image an object lies in: "top left", "bottom right", "centre" ..."""
    rows, cols = _bands(grid)
    row, col = rows[obj.row * len(rows) // grid], cols[obj.col * len(cols) // grid]
    return "centre" if (row, col) == ("middle", "centre") else f"{row} {col}"


def regions(grid: int) -> list[str]:
    rows, cols = _bands(grid)
    return ["centre" if (r, c) == ("middle", "centre") else f"{r} {c}" for r in rows for c in cols]


def ask(
    kind: str, objects: list[SceneObject], rng: random.Random, spec: SceneSpec = SceneSpec()
) -> tuple[str, str, list[str]] | None:
    """One question of a kind: (question, correct answer word, all possible answers)."""
    if kind == "colour":
        unique = [o for o in objects if sum(p.shape == o.shape for p in objects) == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        return f"What colour is the {o.shape}?", o.colour, list(COLOURS)
    if kind == "shape":
        unique = [o for o in objects if sum(p.colour == o.colour for p in objects) == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        return f"What shape is the {o.colour} object?", o.shape, list(SHAPES)
    if kind == "count":
        return "How many objects are there?", COUNT_WORDS[len(objects) - 1], list(COUNT_WORDS)
    if not spec.relative_position:
        o = rng.choice(objects)
        return f"Where in the image is the {o.name}?", region(o, spec.grid), regions(spec.grid)
    pairs = [(a, b) for a in objects for b in objects if a is not b and relation(a, b)]
    if not pairs:
        return None
    a, b = rng.choice(pairs)
    return f"Where is the {a.name} relative to the {b.name}?", relation(a, b), list(RELATIONS)  # type: ignore[return-value]


def multiple_choice(
    kind: str, objects: list[SceneObject], rng: random.Random, spec: SceneSpec = SceneSpec()
) -> dict | None:
    """A 4-option question whose correct letter is uniform over A-D."""
    asked = ask(kind, objects, rng, spec)
    if asked is None:
        return None
    question, answer, vocabulary = asked
    distractors = rng.sample([w for w in vocabulary if w != answer], 3)
    options = distractors[:]
    answer_index = rng.randrange(4)
    options.insert(answer_index, answer)
    return {"type": kind, "question": question, "options": options, "answer": answer_index}


def open_answer(kind: str, answer: str) -> str:
    if kind == "colour":
        return f"It is {answer}."
    if kind == "shape":
        return f"It is a {answer}."
    if kind == "count":
        return f"There {'is' if answer == 'one' else 'are'} {answer}."
    if answer in RELATIONS:
        return f"It is {answer if answer in ('above', 'below') else 'to the ' + answer + ' of'} it."
    return f"It is in the {answer}."


def conversation(
    objects: list[SceneObject], rng: random.Random, turns: int, spec: SceneSpec = SceneSpec()
) -> list[dict[str, str]]:
    """A multi-turn chat in LLaVA's format: open questions and multiple choice, mixed."""
    messages: list[dict[str, str]] = []
    while len(messages) < 2 * turns:
        kind = rng.choice(QUESTION_TYPES)
        if rng.random() < 0.75:
            mc = multiple_choice(kind, objects, rng, spec)
            if mc is None:
                continue
            human = multiple_choice_prompt(mc["question"], mc["options"], DEMO_MC_FORMAT)
            gpt = multiple_choice_answer(mc["options"], mc["answer"], DEMO_MC_FORMAT)
        else:
            asked = ask(kind, objects, rng, spec)
            if asked is None:
                continue
            human, gpt = asked[0], open_answer(kind, asked[1])
        if not messages:
            human = "<image>\n" + human
        messages += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt}]
    return messages


def make_sample(index: int, seed: int, spec: SceneSpec) -> dict:
    """Everything written for one scene: the JPEG bytes and its JSON record."""
    rng = random.Random(f"{seed}-{index}")
    objects = sample_scene(rng, spec)
    image = render_scene(objects, spec, rng)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    mcs = [m for m in (multiple_choice(k, objects, rng, spec) for k in QUESTION_TYPES) if m is not None]
    record = {
        "id": f"scene{seed}_{index:06d}",
        "caption": caption(objects),
        "conversations": conversation(objects, rng, turns=rng.randint(3, 5), spec=spec),
        "mc": mcs,
        "objects": [asdict(o) for o in objects],
    }
    return {
        "__key__": record["id"],
        "jpg": buffer.getvalue(),
        "json": json.dumps(record, separators=(",", ":")).encode(),
    }


def make_predict_sample(index: int, seed: int, spec: SceneSpec) -> dict:
    """A scene of `make_sample` asked one of its multiple-choice questions, as the demo trains on them
    (the `mc` view: the image first, the question, its options, the option's text as the reply), so
    `predict` asks what the demo learned; the question's kind rotates with the index."""
    sample = make_sample(index, seed, spec)
    record = json.loads(sample["json"])
    mc = record["mc"][index % len(record["mc"])]
    human = "<image>\n" + multiple_choice_prompt(mc["question"], mc["options"], DEMO_MC_FORMAT)
    gpt = multiple_choice_answer(mc["options"], mc["answer"], DEMO_MC_FORMAT)
    predict = {"id": f"{record['id']}_{mc['type']}", "conversations": [
        {"from": "human", "value": human}, {"from": "gpt", "value": gpt}], "mc": [mc]}  # fmt: skip
    return {"__key__": predict["id"], "jpg": sample["jpg"], "json": json.dumps(predict, separators=(",", ":")).encode()}


def write_split(
    out: Path, split: str, count: int, seed: int, per_shard: int, spec: SceneSpec, make=make_sample
) -> list[Path]:
    """Write one split as shards named `{split}-000000.tar` ... and a sizes.json beside them."""
    import webdataset as wds

    out.mkdir(parents=True, exist_ok=True)
    paths, sizes = [], {}
    for shard, start in enumerate(range(0, count, per_shard)):
        path = out / f"{split}-{shard:06d}.tar"
        n = min(per_shard, count - start)
        with open(path, "wb") as stream, wds.TarWriter(stream, encoder=False, mtime=0.0) as writer:
            for index in range(start, start + n):
                writer.write(make(index, seed, spec))
        paths.append(path)
        sizes[path.name] = n
    table_path = out / "sizes.json"  # samples per shard, so loaders know epoch sizes unread
    table = json.loads(table_path.read_text()) if table_path.is_file() else {}
    table = {name: n for name, n in table.items() if not name.startswith(f"{split}-")} | sizes
    table_path.write_text(json.dumps(dict(sorted(table.items())), indent=1) + "\n")
    return paths


# Words the demo tokenizer knows beyond those of the generated text: the conversation
# templates' own words (see src/data/conversation.py) and the letters.
TEMPLATE_TEXT = (
    "USER: ASSISTANT: A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions. "
    "Human: Assistant: ### user assistant system"
)


def demo_corpus(spec: SceneSpec, count: int = 2000) -> list[str]:
    texts = [TEMPLATE_TEXT, " ".join(OPTION_LETTERS), *MC_FORMATS.values(), "The answer is"]
    for index in range(count):
        record = json.loads(make_sample(index, seed=-1, spec=spec)["json"])
        texts.append(record["caption"])
        texts += [m["value"] for m in record["conversations"]]
        texts += [multiple_choice_prompt(m["question"], m["options"], fmt) for m in record["mc"] for fmt in MC_FORMATS]
    texts += [open_answer(k, a) for k in QUESTION_TYPES for a in (*COLOURS, *SHAPES, *COUNT_WORDS, *RELATIONS)]
    # every grid's region names and the relative form, so one vocabulary serves each layout
    texts += [*regions(2), *regions(3), "Where is the relative to the ? It is in the centre ."]
    return texts


def build_tokenizer(out: Path, texts: list[str]) -> Path:
    """A word-level tokenizer with `<image>`, saved so `AutoTokenizer.from_pretrained` loads it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for text in texts for w, _ in pre.pre_tokenize_str(text.replace("<image>", " "))})
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens=["<image>"],
    )
    fast.save_pretrained(out)
    return out


def generate_demo(out: Path, train: int, val: int, test: int, per_shard: int, spec: SceneSpec) -> None:
    """The demo set: disjoint seeds per split, so no test scene was seen in training; `predict` asks
    one question of each test scene."""
    write_split(out, "train", train, seed=0, per_shard=per_shard, spec=spec)
    write_split(out, "val", val, seed=1, per_shard=per_shard, spec=spec)
    write_split(out, "test", test, seed=2, per_shard=per_shard, spec=spec)
    write_split(out, "predict", test, seed=2, per_shard=per_shard, spec=spec, make=make_predict_sample)
    build_tokenizer(out / "tokenizer", demo_corpus(spec))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("data_shards/demo"))
    parser.add_argument("--train", type=int, default=2000, help="training scenes")
    parser.add_argument("--val", type=int, default=200, help="validation scenes")
    parser.add_argument("--test", type=int, default=400, help="test scenes")
    parser.add_argument("--per-shard", type=int, default=400, help="scenes per tar shard")
    parser.add_argument("--image-size", type=int, default=SceneSpec.image_size, help="pixels per side")
    parser.add_argument("--grid", type=int, default=SceneSpec.grid, help="cells per side")
    parser.add_argument("--relative-position", action="store_true", help="ask where one object is relative to another")
    args = parser.parse_args(argv)
    spec = SceneSpec(image_size=args.image_size, grid=args.grid, relative_position=args.relative_position)
    generate_demo(args.out, args.train, args.val, args.test, args.per_shard, spec)
    print(f"wrote demo shards and tokenizer to {args.out}")


if __name__ == "__main__":
    main()
