"""A vision encoder's own first stage: learning to see before the whole model learns to answer.

The real patterns start from encoders trained on images first (LLaVA from CLIP, Qwen2-VL from its own pretrained
ViT, Flamingo from a contrastively trained encoder). Trained from scratch only through the language model, the
small encoders here never learned to tell a circle from a square: naming the only shape in a picture stayed at
chance while its colour was always right. The answer's signal reaches the encoder through the projector and the
language model, and that path is slow. This stage gives the encoder a direct one, on pictures drawn as the task
draws them: a linear head on the mean of its tokens names the one object of a one-shape picture (its colour and
shape: 12 classes). With `--pictures mixed`, half the pictures are such; a third hold two to four shapes, which
another head counts, and a sixth a word, which a third head reads: each picture teaches its own head. (Measured
on LLaVA, the mixed stage names shapes far slower and the whole model trained on from it does no better: the
README's shape bullet.)

Naming what a picture holds teaches the encoder to forget where it is: a linear read-out of each LLaVA token's
column from what its language model reads explained 16% of the column's variance after this stage, 37% at random
initialisation. Unless `--no-token-places`, a last head therefore names each token's own place, its column and
row in eighths of the picture, from that token alone; kept by the encoder, the place reaches the language model
in the very values it reads about each shape, and a position question needs it there (the README's left/right
bullet). The heads are thrown away; the checkpoint saved is the whole model with the trained
encoder, and `vlm-patterns train FAMILY --from OUTPUT` teaches the task on top, with `--freeze vision` to keep the
encoder as this stage leaves it, or `--vision-learning-rate` to let it adapt slowly.

Each family's recipe says where its encoder's tokens come from (`encoder_tokens`). Fuyu has no encoder (its
patches go through one Linear into the language model): that is its pattern, so there is nothing to train alone,
as the real Fuyu has no separately trained encoder.
"""

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import torch
from torch import nn

from .options import TrainOptions, VisionPretrainOptions
from .synthetic_vqa import NUMBERS, PAIRS, SHAPES, WORDS, draw_scene, draw_word

CLASSES = PAIRS  # the one object of a one-shape picture, named
# What the stage's pictures are, in what shares: one shape (named), two to four (counted) or a word (read).
KINDS = ("one_shape", "shapes", "word")
MIXES = {"one-shape": (1, 0, 0), "mixed": (1 / 2, 1 / 3, 1 / 6)}
MAX_COUNT = len(NUMBERS) - 1
PLACE_BINS = 8  # a token's column and row are each named in eighths of the picture
# The stage's pictures come from streams of their own: (STREAM, seed, TRAINING) and (STREAM, seed, HELD_OUT).
STREAM, TRAINING, HELD_OUT = 17, 0, 1


def encoder_of(family: str) -> ModuleType | None:
    """The family's recipe when it has a vision encoder to train alone (its `encoder_tokens`), else None."""
    from .recipes import recipe

    module = recipe(family)
    return module if hasattr(module, "encoder_tokens") else None


@dataclass
class Batch:
    """Pictures ready for the encoder and what each teaches: `kind` (pictures,) indexes KINDS; `label` is the
    object's class (CLASSES), the number of shapes less two, or the word's index (WORDS)."""

    inputs: dict
    kind: torch.Tensor
    label: torch.Tensor

    @classmethod
    def draw(cls, rng: np.random.Generator, processor, count: int, mix: str) -> "Batch":
        """`count` pictures as the task draws them, each of a kind drawn in the shares of MIXES[mix]."""
        images, kinds, labels = [], [], []
        for kind in rng.choice(len(KINDS), size=count, p=MIXES[mix]):
            if kind == 0:
                image, scene = draw_scene(rng, 1)
                (thing,) = scene["objects"]
                label = CLASSES.index((thing["color"], thing["shape"]))
            elif kind == 1:  # some share colour and shape, as the task's counting pictures do
                image, scene = draw_scene(rng, int(rng.integers(2, MAX_COUNT + 1)), distinct=bool(rng.integers(2)))
                label = len(scene["objects"]) - 2
            else:
                image, scene = draw_word(rng)
                label = WORDS.index(scene["word"])
            images.append(image)
            kinds.append(int(kind))
            labels.append(label)
        inputs = dict(processor.image_processor(images, return_tensors="pt"))
        return cls(inputs, torch.tensor(kinds), torch.tensor(labels))


def raster_places(columns: int, rows: int) -> torch.Tensor:
    """(rows * columns, 2): each cell's column and row centre as fractions of the grid's sides, in raster order."""
    column = (torch.arange(columns) + 0.5) / columns
    row = (torch.arange(rows) + 0.5) / rows
    return torch.stack([column.repeat(rows), row.repeat_interleave(columns)], dim=-1)


def vit_places(model, images: int) -> list[torch.Tensor]:
    """Each image's token places for a square ViT read in raster order (LLaVA's, Flamingo's); NaN for the class
    token where the features keep it (`vision_feature_select_strategy` "full"), as it lies nowhere."""
    vision = model.config.vision_config
    places = raster_places(vision.image_size // vision.patch_size, vision.image_size // vision.patch_size)
    if model.config.vision_feature_select_strategy != "default":
        places = torch.cat([torch.full((1, 2), float("nan")), places])
    return [places] * images


class Heads(nn.Module):
    """Linear read-outs of the pooled tokens, one per kind of picture, and with `places` one of each token's own
    place. Dropped after the stage."""

    def __init__(self, width: int, places: bool = True):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(width, n) for n in (len(CLASSES), MAX_COUNT - 1, len(WORDS)))
        self.places = nn.Linear(width, 2 * PLACE_BINS) if places else None

    def forward(self, tokens: list[torch.Tensor], kind: torch.Tensor) -> list[torch.Tensor | None]:
        """Per kind, the logits of the pictures of that kind (None when the batch has none)."""
        pooled = torch.stack([image.mean(0) for image in tokens])
        return [head(pooled[kind == k]) if (kind == k).any() else None for k, head in enumerate(self.heads)]

    def place_logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """(tokens, 2, PLACE_BINS): each token's column and row, named from the token alone."""
        return self.places(tokens).view(len(tokens), 2, PLACE_BINS)

    def loss(self, tokens: list[torch.Tensor], batch: Batch, places: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Each picture's cross-entropy on its own head, averaged over the pictures; plus, with `places` (each
        token's column and row as fractions, from the recipe's `encoder_token_places`), the cross-entropy of its
        tokens' places, averaged over its tokens and then over the pictures."""
        logits = self(tokens, batch.kind)
        loss = sum(nn.functional.cross_entropy(out, batch.label[batch.kind == k], reduction="sum")
                   for k, out in enumerate(logits) if out is not None)  # fmt: skip
        if self.places is not None and places is not None:
            loss = loss + sum(
                nn.functional.cross_entropy(self.place_logits(image).flatten(0, 1), place_bins(where).flatten())
                for image, where in zip(tokens, places, strict=True)
            )
        return loss / len(batch.kind)


def place_bins(places: torch.Tensor) -> torch.Tensor:
    """The eighths the places fall in; -100 (ignored by the loss and the probe) for a token that lies nowhere."""
    return (places.nan_to_num(-1) * PLACE_BINS).long().clamp(0, PLACE_BINS - 1).masked_fill(places.isnan(), -100)


class Probe:
    """Held-out accuracy of the encoder and its heads on pictures of the stage's own mix: `accuracy`, the one object
    named (colour and shape); `shape_accuracy`, its shape alone; `count_accuracy`, two to four shapes counted;
    `word_accuracy`, the word read; `place_accuracy`, the tokens whose column and row are both named right."""

    def __init__(self, processor, num_examples: int, seed: int, mix: str):
        rng = np.random.default_rng([STREAM, seed, HELD_OUT])
        self.batches = [Batch.draw(rng, processor, min(64, num_examples - i), mix) for i in range(0, num_examples, 64)]

    @torch.no_grad()
    def measure(self, family: ModuleType, model, heads: Heads) -> dict:
        predicted = {k: [] for k in range(len(KINDS))}
        truth = {k: [] for k in range(len(KINDS))}
        places_right = []
        for batch in self.batches:
            tokens = family.encoder_tokens(model, batch.inputs)
            for k, out in enumerate(heads(tokens, batch.kind)):
                if out is not None:
                    predicted[k].append(out.argmax(-1))
                    truth[k].append(batch.label[batch.kind == k])
            if heads.places is not None:
                for image, where in zip(tokens, family.encoder_token_places(model, batch.inputs), strict=True):
                    bins = place_bins(where)
                    right = (heads.place_logits(image).argmax(-1) == bins).all(-1)
                    places_right.append(right[(bins >= 0).all(-1)])
        predicted, truth = ({k: torch.cat(v) for k, v in d.items() if v} for d in (predicted, truth))
        shape_of = torch.tensor([SHAPES.index(shape) for _, shape in CLASSES])
        right = {k: (predicted[k] == truth[k]).float().mean().item() for k in predicted}
        place_accuracy = torch.cat(places_right).float().mean().item() if places_right else None
        return dict(accuracy=right.get(0), count_accuracy=right.get(1), word_accuracy=right.get(2),
                    place_accuracy=place_accuracy,
                    shape_accuracy=(shape_of[predicted[0]] == shape_of[truth[0]]).float().mean().item()
                    if 0 in predicted else None)  # fmt: skip


def percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.1f}%"


def pretrain_vision(options: VisionPretrainOptions, progress: bool = True) -> dict:
    """Train the family's vision encoder to say what pictures hold; save the whole model (`options.output`) with the
    log (`vision_pretraining.json`: options, seconds, the held-out curve). Returns the log."""
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup

    from .recipes import recipe
    from .train import VISION_LOG, build_model_and_processor, portable_options, strip_code

    family = encoder_of(options.family)  # an unknown family fails here
    if family is None:
        raise ValueError(f"{options.family} has no vision encoder to pre-train: {recipe(options.family).NO_ENCODER}; "
                         f"train it with `vlm-patterns train {options.family}`")  # fmt: skip
    if options.pictures not in MIXES:
        raise ValueError(f"--pictures must be one of {', '.join(MIXES)}, not {options.pictures!r}")
    torch.manual_seed(options.seed)
    model, processor = build_model_and_processor(TrainOptions(
        family=options.family, output=options.output, init_from=options.init_from, seed=options.seed,
        text_width=options.text_width, text_layers=options.text_layers,
        positions_as_places=options.positions_as_places,
    ))  # fmt: skip
    encoder = [p for name, p in model.named_parameters() if name.startswith(model.vision_encoder_prefixes)]
    model.requires_grad_(False)
    for parameter in encoder:
        parameter.requires_grad_(True)
    probe = Probe(processor, options.eval_examples, options.seed, options.pictures)
    rng = np.random.default_rng([STREAM, options.seed, TRAINING])
    with torch.no_grad():
        width = family.encoder_tokens(model, probe.batches[0].inputs)[0].shape[-1]
    heads = Heads(width, places=options.token_places)
    optimizer = torch.optim.AdamW(encoder + list(heads.parameters()), lr=options.learning_rate,
                                  weight_decay=options.weight_decay)  # fmt: skip
    # Warm-up over a tenth of the run (at most 100 steps), then cosine decay, as the task's recipe does.
    schedule = get_cosine_schedule_with_warmup(optimizer, min(100, options.steps // 10), options.steps)
    curve, started = [], time.time()
    model.train()
    bar = tqdm(range(1, options.steps + 1), desc=f"{options.family} vision encoder", disable=not progress)
    for step in bar:
        batch = Batch.draw(rng, processor, options.batch_size, options.pictures)
        places = family.encoder_token_places(model, batch.inputs) if options.token_places else None
        loss = heads.loss(family.encoder_tokens(model, batch.inputs), batch, places)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % options.eval_every == 0 or step == options.steps:
            model.eval()
            point = dict(step=step, **probe.measure(family, model, heads))
            model.train()
            curve.append(point)
            bar.write(f"step {step}, held-out: one object named {percent(point['accuracy'])} (its shape "
                      f"{percent(point['shape_accuracy'])}), shapes counted {percent(point['count_accuracy'])}, "
                      f"words read {percent(point['word_accuracy'])}, token places named "
                      f"{percent(point['place_accuracy'])}; loss {loss.item():.3f}")  # fmt: skip
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
