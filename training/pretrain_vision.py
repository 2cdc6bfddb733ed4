"""A vision encoder's own first stage: learning to see before the whole model learns to answer.

The real patterns start from encoders trained on images first (LLaVA from CLIP, Qwen2-VL from its own pretrained
ViT, Flamingo from a contrastively trained encoder). Trained from scratch only through the language model, the
small encoders here never learned to tell a circle from a square: naming the only shape in a picture stayed at
chance while its colour was always right. The answer's signal reaches the encoder through the projector and the
language model, and that path is slow. This stage gives the encoder a direct one: it names the one object in a
picture of the task's own kind (its colour and shape: 12 classes) through a linear head on its mean-pooled
features. The head is thrown away; the checkpoint saved is the whole model with the trained encoder, and
`vlm-patterns train FAMILY --from OUTPUT` teaches the task on top (with `--freeze vision` to keep the encoder as
this stage leaves it). How much of it the whole model then uses is measured in the README's shape bullet.

Fuyu has no encoder (its patches go through one Linear into the language model): that is its pattern, so there is
nothing to train alone, as the real Fuyu has no separately trained encoder.
"""

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .options import TrainOptions, VisionPretrainOptions
from .synthetic_vqa import COLORS, SHAPES, draw_scene

CLASSES = [(color, shape) for color in COLORS for shape in SHAPES]
# The stage's pictures come from streams of their own: (STREAM, seed, TRAINING) and (STREAM, seed, HELD_OUT).
STREAM, TRAINING, HELD_OUT = 17, 0, 1


def pooled_features_of(family: str) -> Callable[[nn.Module, dict], torch.Tensor] | None:
    """The family's encoder features, mean-pooled per image as the connector would receive them (images, width):
    its recipe's `pooled_encoder_features`, None for a family without an encoder."""
    from .recipes import recipe

    return getattr(recipe(family), "pooled_encoder_features", None)


def pictures(rng: np.random.Generator, count: int) -> tuple[list, torch.Tensor]:
    """`count` pictures of one object each, as the task draws them, and their classes."""
    images, labels = [], []
    for _ in range(count):
        image, scene = draw_scene(rng, 1)
        (thing,) = scene["objects"]
        images.append(image)
        labels.append(CLASSES.index((thing["color"], thing["shape"])))
    return images, torch.tensor(labels)


def image_inputs(processor, images: list) -> dict:
    return dict(processor.image_processor(images, return_tensors="pt"))


class Probe:
    """Held-out accuracy of the encoder and its head: of the whole class, and of the shape alone."""

    def __init__(self, processor, num_examples: int, seed: int):
        images, self.labels = pictures(np.random.default_rng([STREAM, seed, HELD_OUT]), num_examples)
        self.inputs = [image_inputs(processor, images[i : i + 64]) for i in range(0, num_examples, 64)]

    @torch.no_grad()
    def measure(self, model, head: nn.Module, pooled) -> dict:
        predicted = torch.cat([head(pooled(model, inputs)).argmax(-1) for inputs in self.inputs])
        shape_of = torch.tensor([SHAPES.index(shape) for _, shape in CLASSES])
        return dict(accuracy=(predicted == self.labels).float().mean().item(),
                    shape_accuracy=(shape_of[predicted] == shape_of[self.labels]).float().mean().item())  # fmt: skip


def pretrain_vision(options: VisionPretrainOptions, progress: bool = True) -> dict:
    """Train the family's vision encoder to name single objects; save the whole model (`options.output`) with the
    log (`vision_pretraining.json`: options, seconds, the held-out curve). Returns the log."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from .recipes import recipe
    from .train import VISION_LOG, build_model_and_processor, portable_options, strip_code

    pooled = pooled_features_of(options.family)  # an unknown family fails here
    if pooled is None:
        raise ValueError(f"{options.family} has no vision encoder to pre-train: {recipe(options.family).NO_ENCODER}; "
                         f"train it with `vlm-patterns train {options.family}`")  # fmt: skip
    torch.manual_seed(options.seed)
    model, processor = build_model_and_processor(TrainOptions(
        family=options.family, output=options.output, init_from=options.init_from, seed=options.seed,
        text_width=options.text_width, text_layers=options.text_layers,
    ))  # fmt: skip
    encoder = [p for name, p in model.named_parameters() if name.startswith(model.vision_encoder_prefixes)]
    model.requires_grad_(False)
    for parameter in encoder:
        parameter.requires_grad_(True)
    probe = Probe(processor, options.eval_examples, options.seed)
    rng = np.random.default_rng([STREAM, options.seed, TRAINING])
    width = pooled(model, probe.inputs[0]).shape[-1]
    head = nn.Linear(width, len(CLASSES))
    optimizer = torch.optim.AdamW(encoder + list(head.parameters()), lr=options.learning_rate,
                                  weight_decay=options.weight_decay)  # fmt: skip
    # Warm-up over a tenth of the run (at most 100 steps), then cosine decay, as the task's recipe does.
    schedule = get_cosine_schedule_with_warmup(optimizer, min(100, options.steps // 10), options.steps)
    curve, started = [], time.time()
    model.train()
    bar = tqdm(range(1, options.steps + 1), desc=f"{options.family} vision encoder", disable=not progress)
    for step in bar:
        images, labels = pictures(rng, options.batch_size)
        loss = nn.functional.cross_entropy(head(pooled(model, image_inputs(processor, images))), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % options.eval_every == 0 or step == options.steps:
            model.eval()
            point = dict(step=step, **probe.measure(model, head, pooled))
            model.train()
            curve.append(point)
            bar.write(f"step {step}: held-out {100 * point['accuracy']:.1f}% (shape {100 * point['shape_accuracy']:.1f}%)"
                      f", loss {loss.item():.3f}")  # fmt: skip
    model.requires_grad_(True)
    output = Path(options.output)
    model.save_pretrained(output)
    processor.save_pretrained(output)
    if options.without_code:
        strip_code(output)
    earlier = Path(options.init_from or "", "training_log.json")
    if options.init_from and earlier.exists() and Path(options.init_from).resolve() != output.resolve():
        # The task's earlier runs stay on record: `train --from OUTPUT` keeps them under "started_from".
        shutil.copyfile(earlier, output / "training_log.json")
    log = dict(options=portable_options(options), seconds=round(time.time() - started, 1), held_out_curve=curve)
    (output / VISION_LOG).write_text(json.dumps(log, indent=2))
    return log
