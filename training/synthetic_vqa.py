"""A procedurally generated visual question answering task that separates the four patterns.

Every example is drawn from a seed, on the fly: a canvas of random size and aspect ratio holding a few coloured
shapes, or a short word in small print, and a question with a one-word answer. Question kinds:

- `color`, `shape`:  what colour is the circle? what shape is red?           (local appearance)
- `count`:           how many shapes are there?                              (the whole image)
- `position`:        is the red circle left or right of the blue square?      (spatial relations)
- `read`:            what word is written?                                   (small text: resolution matters)
- `compare`:         which image has more shapes? (two images)               (several images per prompt)

The same seed gives the same example on any machine (numpy's PCG64 and Pillow's bitmap font); the held-out split
draws from seeds the training stream never uses.
"""

from dataclasses import dataclass, field

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (50, 80, 220), "yellow": (235, 200, 30)}
SHAPES = ("circle", "square", "triangle")
NUMBERS = ("zero", "one", "two", "three", "four")
WORDS = ("cat", "dog", "sun", "car", "tree", "fish", "bird", "book")
KINDS = ("color", "shape", "count", "position", "read", "compare")
SINGLE_IMAGE_KINDS = KINDS[:-1]

# Every word a question or an answer can contain (the tokenizer's vocabulary is built from these).
QUESTION_TEMPLATES = {
    "color": "What color is the {shape}?",
    "shape": "What shape is {color}?",
    "count": "How many shapes are there?",
    "position": "Is the {color} {shape} left or right of the {color2} {shape2}?",
    "read": "What word is written?",
    "compare": "Which image has more shapes, the first or the second?",
}
ANSWERS = {
    "color": tuple(COLORS),
    "shape": SHAPES,
    "count": NUMBERS[1:],
    "position": ("left", "right"),
    "read": WORDS,
    "compare": ("first", "second"),
}

MIN_SIDE, MAX_SIDE = 64, 160


@dataclass
class Example:
    images: list[PIL.Image.Image]
    question: str
    answer: str
    kind: str
    meta: dict = field(default_factory=dict)


def _canvas(rng: np.random.Generator) -> PIL.Image.Image:
    width, height = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    background = tuple(int(v) for v in rng.integers(200, 256, size=3))  # light, so every colour stands out
    return PIL.Image.new("RGB", (width, height), background)


def _place(rng: np.random.Generator, width: int, height: int, size: int, taken: list) -> tuple[int, int] | None:
    """A free spot (top-left corner) for a size x size object, away from the others; None if the canvas is full."""
    for _ in range(50):
        x, y = int(rng.integers(2, width - size - 2)), int(rng.integers(2, height - size - 2))
        if all(abs(x - tx) > (size + ts) // 2 + 3 or abs(y - ty) > (size + ts) // 2 + 3 for tx, ty, ts in taken):
            return x, y
    return None


def _draw(draw: PIL.ImageDraw.ImageDraw, shape: str, color: str, x: int, y: int, size: int) -> None:
    box = [x, y, x + size, y + size]
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x + size / 2, y), (x, y + size), (x + size, y + size)], fill=fill)


def draw_scene(rng: np.random.Generator, count: int, distinct: bool = True) -> tuple[PIL.Image.Image, list[dict]]:
    """A canvas with `count` shapes; with `distinct`, no two share both colour and shape. Returns the objects."""
    for _ in range(20):
        image = _canvas(rng)
        draw = PIL.ImageDraw.Draw(image)
        size = int(rng.integers(14, 24))
        objects, taken = [], []
        pairs = [(c, s) for c in COLORS for s in SHAPES]
        order = rng.permutation(len(pairs)) if distinct else rng.integers(0, len(pairs), size=count)
        for index in order[:count]:
            spot = _place(rng, image.width, image.height, size, taken)
            if spot is None:
                break
            color, shape = pairs[int(index)]
            _draw(draw, shape, color, *spot, size)
            taken.append((*spot, size))
            objects.append(dict(color=color, shape=shape, x=spot[0] + size / 2, y=spot[1] + size / 2))
        if len(objects) == count:
            return image, objects
    raise RuntimeError("could not place the shapes")  # unreachable for the sizes used


def _font(size: int) -> PIL.ImageFont.ImageFont:
    try:
        return PIL.ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return PIL.ImageFont.load_default()


def make_example(seed: int, kinds: tuple[str, ...] = KINDS) -> Example:
    """The example of this seed; its kind is drawn uniformly from `kinds`."""
    rng = np.random.default_rng(seed)
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind in ("color", "shape"):
        image, objects = draw_scene(rng, int(rng.integers(1, 4)))
        target = objects[int(rng.integers(len(objects)))]
        # The question must single out one object: its shape (or colour) must be unique in the scene.
        key = "shape" if kind == "color" else "color"
        if sum(o[key] == target[key] for o in objects) > 1:
            image = _redraw_single(rng, target)
        question = QUESTION_TEMPLATES[kind].format(**target)
        return Example([image], question, target["color" if kind == "color" else "shape"], kind)
    if kind == "count":
        count = int(rng.integers(1, 5))
        image, _ = draw_scene(rng, count, distinct=False)
        return Example([image], QUESTION_TEMPLATES["count"], NUMBERS[count], kind)
    if kind == "position":
        image, objects = draw_scene(rng, 2)
        a, b = objects
        while abs(a["x"] - b["x"]) < 8:  # too close to call: redraw
            image, objects = draw_scene(rng, 2)
            a, b = objects
        question = QUESTION_TEMPLATES["position"].format(
            color=a["color"], shape=a["shape"], color2=b["color"], shape2=b["shape"]
        )
        return Example([image], question, "left" if a["x"] < b["x"] else "right", kind)
    if kind == "read":
        image = _canvas(rng)
        word = WORDS[int(rng.integers(len(WORDS)))]
        draw = PIL.ImageDraw.Draw(image)
        font = _font(int(rng.integers(10, 15)))
        left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
        x = int(rng.integers(2, max(3, image.width - (right - left) - 2)))
        y = int(rng.integers(2, max(3, image.height - (bottom - top) - 2)))
        draw.text((x - left, y - top), word, fill=(20, 20, 20), font=font)
        return Example([image], QUESTION_TEMPLATES["read"], word, kind)
    # compare: two scenes with different counts
    first, second = (int(v) for v in rng.choice(np.arange(1, 5), size=2, replace=False))
    image_a, _ = draw_scene(rng, first, distinct=False)
    image_b, _ = draw_scene(rng, second, distinct=False)
    answer = "first" if first > second else "second"
    return Example([image_a, image_b], QUESTION_TEMPLATES["compare"], answer, kind)


def _redraw_single(rng: np.random.Generator, target: dict) -> PIL.Image.Image:
    """A scene of the target object alone (when the drawn scene could not single it out)."""
    image = _canvas(rng)
    size = int(rng.integers(14, 24))
    _draw(
        PIL.ImageDraw.Draw(image),
        target["shape"],
        target["color"],
        *_place(rng, image.width, image.height, size, []),
        size,
    )
    return image


# Seeds: training streams count up from TRAIN_SEED_BASE; the held-out split uses another range entirely.
TRAIN_SEED_BASE = 0
HELD_OUT_SEED_BASE = 10**9


def training_seed(index: int, seed: int = 0) -> int:
    return TRAIN_SEED_BASE + seed * 10**7 + index


def held_out_seed(index: int, seed: int = 0) -> int:
    return HELD_OUT_SEED_BASE + seed * 10**7 + index


def kinds_for(multi_image: bool, only: tuple[str, ...] | None = None) -> tuple[str, ...]:
    """The question kinds a family is asked: all of them, or `only` those named (in the task's order); a family that
    reads one image per prompt is never asked to compare two."""
    readable = KINDS if multi_image else SINGLE_IMAGE_KINDS
    if not only:
        return readable
    unknown = [k for k in only if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown question kind(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    unreadable = [k for k in only if k not in readable]
    if unreadable:
        raise ValueError(f"{', '.join(unreadable)} needs several images per prompt, and this family reads one")
    return tuple(k for k in KINDS if k in only)


def examples(split: str, size: int, seed: int = 0, multi_image: bool = True, kinds: tuple[str, ...] | None = None):
    """`size` examples of the split ("train" or "held_out") as `Example`s, of all kinds or only of `kinds`."""
    seed_of = training_seed if split == "train" else held_out_seed
    chosen = kinds_for(multi_image, kinds)
    return [make_example(seed_of(i, seed), chosen) for i in range(size)]


def as_dataset(split: str, size: int, seed: int = 0, multi_image: bool = True):
    """The split as a `datasets.Dataset` (columns images, question, answer, kind), generated on the fly."""
    import datasets

    def generate():
        for example in examples(split, size, seed, multi_image):
            yield dict(images=example.images, question=example.question, answer=example.answer, kind=example.kind)

    features = datasets.Features(
        images=datasets.Sequence(datasets.Image()),
        question=datasets.Value("string"),
        answer=datasets.Value("string"),
        kind=datasets.Value("string"),
    )
    return datasets.Dataset.from_generator(generate, features=features, keep_in_memory=True)


def vocabulary() -> list[str]:
    """Every word of every question and answer, plus their punctuation."""
    words = set()
    for template in QUESTION_TEMPLATES.values():
        words.update(template.replace("{", " ").replace("}", " ").replace("?", " ? ").replace(",", " , ").split())
    for answers in ANSWERS.values():
        words.update(answers)
    words.update(COLORS)
    words.update(SHAPES)
    words -= {"color2", "shape2"}
    return sorted(words)
