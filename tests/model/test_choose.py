"""src.training.module.LlavaLitModule.choose: the model's option per question, in each format.

The reference runs every (prompt + candidate) sequence on its own through the language
model's full logits, so the batched paths of score_candidates and generate are checked
end to end against the data pipeline's batches (prompt lengths from the label mask).
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_lit_module

from src.data.conversation import IGNORE_INDEX, ConversationEncoder, build_template
from src.data.datamodule import ShardStream
from src.data.samples import ExampleBuilder
from src.eval.answers import read_choice
from src.training.module import LlavaLitModule

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def module(demo_dir) -> LlavaLitModule:
    lit = tiny_lit_module(demo_dir, patch_size=16, layers=1, positions=256, max_new_tokens=5)
    lit.configure_model()
    return lit.eval()


def mc_batch(module, shards, fmt: str, rows: int = 6) -> dict:
    spec = module.data_spec()
    encoder = ConversationEncoder(spec["tokenizer"], build_template("vicuna_v1", ""), image_tokens=spec["image_tokens"])
    builder = ExampleBuilder(encoder, spec["image_transform"], "mc", mc_format=fmt)
    return next(iter(ShardStream(shards["val"], builder, batch_size=rows, pad_id=0)))


def prompts_of(batch: dict) -> list[list[int]]:
    out = []
    for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
        first = int((labels != IGNORE_INDEX).nonzero()[0])
        out.append(ids[:first].tolist())
    return out


def reference_score(model, prompt: list[int], pixels, candidate: list[int]) -> float:
    logits = model.llm(inputs_embeds=model.embed(torch.tensor([prompt + candidate]), pixels)).logits[0]
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    return sum(log_probs[len(prompt) - 1 + i, t].item() for i, t in enumerate(candidate))


@pytest.mark.parametrize("fmt", ["letter", "option"])
def test_ranked_formats_pick_the_best_scored_candidate(module, shards, fmt):
    batch = mc_batch(module, shards, fmt)
    with torch.no_grad():
        predicted, answer, types = module.choose(batch)
        expected = []
        for row, (prompt, candidates) in enumerate(zip(prompts_of(batch), batch["mc_candidates"], strict=True)):
            pixels = batch["pixel_values"][row : row + 1]  # one image per question
            scores = [reference_score(module.model, prompt, pixels, c) for c in candidates]
            expected.append(max(range(len(scores)), key=scores.__getitem__))
    assert predicted.tolist() == expected
    assert torch.equal(answer, batch["mc_answer"]) and types == batch["mc_type"]


def test_reasoned_format_parses_the_greedy_reply(module, shards, greedy_reference):
    batch = mc_batch(module, shards, "reasoned", rows=4)
    tokenizer = module.tokenizer
    with torch.no_grad():
        predicted, _, _ = module.choose(batch)
        expected = []
        for row, prompt in enumerate(prompts_of(batch)):
            reply = greedy_reference(
                module.model, prompt, batch["pixel_values"][row : row + 1], 5, tokenizer.eos_token_id
            )
            choice = read_choice(tokenizer.decode(reply, skip_special_tokens=True).strip(), 4, "official")
            expected.append(-1 if choice is None else choice)
    assert predicted.tolist() == expected


def test_reasoned_replies_are_read_as_letters(module, shards, monkeypatch):
    """The generated ids are decoded and read by the official rule (src/eval/answers.py): a reply
    that names no option is -1, always wrong; "The answer is C" with nothing after it names none
    (LLaVA's pattern needs a character after the letter; the lenient mode would read C)."""
    batch = mc_batch(module, shards, "reasoned", rows=4)
    tokenizer = module.tokenizer
    texts = ["red . The answer is C .", "The answer is C", "B", "The answer is D . The answer is A ."]
    seen = {}

    def fake_generate(
        input_ids, prompt_lengths, pixel_values, max_new_tokens, eos_token_id, all_done=None, image_sizes=None
    ):
        seen.update(lengths=prompt_lengths.tolist(), max_new_tokens=max_new_tokens, eos=eos_token_id)
        seen["all_done"] = all_done
        seen["image_sizes"] = image_sizes
        return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]

    monkeypatch.setattr(module.model, "generate", fake_generate)
    predicted, _, _ = module.choose(batch)
    assert predicted.tolist() == [2, -1, 1, -1]
    assert torch.equal(seen.pop("image_sizes"), batch["image_sizes"])  # anyres needs each image's size
    assert seen == {
        "lengths": [len(p) for p in prompts_of(batch)],
        "max_new_tokens": 5,
        "eos": tokenizer.eos_token_id,
        "all_done": None,  # one process, no FSDP: nothing to agree on
    }
    # under FSDP (a device mesh) every rank must make the same decoder calls: generation asks all ranks
    monkeypatch.setattr(type(module), "device_mesh", property(lambda self: "mesh"))
    module.choose(batch)
    assert seen["all_done"] == module._all_ranks_done


def test_a_batch_mixing_questions_and_chats_is_refused(module, shards):
    spec = module.data_spec()
    encoder = ConversationEncoder(spec["tokenizer"], build_template("vicuna_v1", ""), image_tokens=spec["image_tokens"])
    builder = ExampleBuilder(encoder, spec["image_transform"], ["mc", "conversations"])
    batch = next(iter(ShardStream(shards["val"], builder, batch_size=8, pad_id=0)))
    assert (batch["mc_answer"] < 0).any()  # the conversation rows
    with pytest.raises(ValueError, match="a multiple-choice evaluation batch must hold only questions"):
        module.choose(batch)
