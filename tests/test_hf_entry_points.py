"""transformers' own entry points on the four shipped checkpoints: gradient checkpointing on padded batches (and
through `Trainer`), disk offload with `device_map="auto"`, exactly as a plain load answers."""

import tempfile
from pathlib import Path

import pytest
import torch

import vlm_patterns  # noqa: F401  (registers the Auto classes)
from vlm_patterns.families import FAMILIES as REGISTRY  # noqa: E402

CHECKPOINTS = Path(__file__).resolve().parents[1] / "training" / "checkpoints"
EXAMPLES = Path(__file__).resolve().parents[1] / "spaces" / "examples"
FAMILIES = list(REGISTRY)  # the registry's families
VISION_PREFIXES = ("model.vision_tower", "model.visual", "model.vision_embed_tokens", "model.vision_model", "")


def load(family: str, **kwargs):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    path = CHECKPOINTS / family
    return AutoModelForImageTextToText.from_pretrained(path, **kwargs), AutoProcessor.from_pretrained(path)


def padded_batch(family: str, processor) -> dict:
    """Two examples of different lengths, left-padded, with labels on the real tokens."""
    questions = ["What color is the square?", "Is the green triangle left or right of the yellow circle? Answer"]
    files = [str(EXAMPLES / "color-0.png"), str(EXAMPLES / "position-0.png")]
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}], add_generation_prompt=True
        )
        for q in questions
    ]
    images = files if family == "fuyu" else [[f] for f in files]
    inputs = dict(processor(images=images, text=prompts, padding_side="left"))
    for key in ("image_patch_grid", "image_sizes", "image_scale_factors"):
        inputs.pop(key, None)
    assert (inputs["attention_mask"] == 0).any(), "the batch must be padded"
    inputs["labels"] = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    return inputs


def loss_and_gradients(model, inputs) -> tuple[torch.Tensor, dict]:
    model.zero_grad()
    loss = model(**inputs).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", FAMILIES)
def test_gradient_checkpointing_on_a_padded_batch(family):
    model, processor = load(family)
    model.train()
    inputs = padded_batch(family, processor)
    plain_loss, plain_grads = loss_and_gradients(model, inputs)
    model.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    loss, grads = loss_and_gradients(model, inputs)
    torch.testing.assert_close(loss, plain_loss, rtol=0, atol=1e-6)
    assert grads.keys() == plain_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], rtol=1e-5, atol=1e-6, msg=name)


def test_one_trainer_step_with_gradient_checkpointing(tmp_path):
    from transformers import Trainer, TrainingArguments

    model, processor = load("qwen2_vl")
    batch = padded_batch("qwen2_vl", processor)

    class OneBatch(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, index):
            return index

    args = TrainingArguments(
        output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=1, gradient_checkpointing=True,
        report_to=[], save_strategy="no", use_cpu=True, learning_rate=1e-3,
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model=model, args=args, train_dataset=OneBatch(), data_collator=lambda _: batch)
    result = trainer.train()
    assert result.global_step == 1 and torch.isfinite(torch.tensor(result.training_loss))
    assert model.is_gradient_checkpointing
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) > 10


@pytest.mark.parametrize("family", FAMILIES)
def test_disk_offload_answers_as_a_plain_load(family):
    plain, processor = load(family)
    plain.eval()
    size = sum(t.numel() * t.element_size() for t in plain.state_dict().values())
    inputs = padded_batch(family, processor)
    inputs.pop("labels")
    with tempfile.TemporaryDirectory() as folder:
        offloaded, _ = load(family, device_map="auto", max_memory={"cpu": int(size * 0.2)}, offload_folder=folder)
        offloaded.eval()
        on_disk = [name for name, device in offloaded.hf_device_map.items() if device == "disk"]
        assert any(name.startswith(VISION_PREFIXES) for name in on_disk), offloaded.hf_device_map
        with torch.no_grad():
            torch.testing.assert_close(offloaded(**inputs).logits, plain(**inputs).logits, rtol=0, atol=1e-5)
        tokens = offloaded.generate(**inputs, max_new_tokens=6, do_sample=False)
        assert torch.equal(tokens, plain.generate(**inputs, max_new_tokens=6, do_sample=False))


def conversation(question: str, answer: str, image) -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": question}]},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]


@pytest.mark.parametrize("family", FAMILIES)
def test_assistant_masks_cover_exactly_the_answers(family):
    """`apply_chat_template(..., return_assistant_tokens_mask=True)`, as TRL's SFT calls it: the mask covers the
    answer and the family's end token, nothing of the question, the image or the padding; batched and multi-turn."""
    import PIL.Image

    _, processor = load(family)
    tokenizer = processor.tokenizer
    image = PIL.Image.open(EXAMPLES / "color-0.png")
    batch = [conversation("What color is the square?", "green", image),
             conversation("Is the green triangle left or right of the yellow circle?", "left of", image)]  # fmt: skip
    out = processor.apply_chat_template(batch, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                                        return_tensors="pt", processor_kwargs={"padding_side": "left"})  # fmt: skip
    masks = torch.as_tensor(out["assistant_masks"]).bool()
    assert masks.shape == out["input_ids"].shape and "offset_mapping" not in out
    for row, answer in enumerate(["green", "left of"]):
        expected = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        assert out["input_ids"][row][masks[row]].tolist() == expected
        assert not masks[row][out["attention_mask"][row] == 0].any()

    two_turns = conversation("What color is the square?", "green", image) + [
        {"role": "user", "content": [{"type": "text", "text": "How many shapes are there?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "one"}]},
    ]
    out = processor.apply_chat_template(two_turns, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids = torch.as_tensor(out["input_ids"])[0]
    marked = ids[torch.as_tensor(out["assistant_masks"])[0].bool()].tolist()
    eos = tokenizer.eos_token_id
    assert marked == tokenizer("green", add_special_tokens=False)["input_ids"] + [eos] + tokenizer(
        "one", add_special_tokens=False
    )["input_ids"] + [eos]
