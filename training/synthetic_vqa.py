"""A procedurally generated visual question answering task that separates the four patterns.

Every example is drawn from a seed, on the fly: a canvas of random size and aspect ratio holding a few coloured
shapes, or a short word in small print, and a question with a one-word answer. Canvases are tinted, white or
textured (noise or ruled lines, like paper); each shape has its own size, from an eighth of the canvas's shorter side
to nearly half of it when there is room, and a quarter of them are outlines drawn with a pen, as a visitor would
draw them. Question kinds:

- `color`, `shape`:  what colour is the circle? what shape is red?           (local appearance)
- `count`:           how many shapes are there?                              (the whole image)
- `position`:        is the red circle left or right of the blue square?      (spatial relations)
- `read`:            what word is written?                                   (small text: resolution matters)
- `compare`:         which image has more shapes? (two images)               (several images per prompt)

Every answer is one word. The model is trained to say it alone, but for `position`: there it first says in which
quarter of the canvas's width each named shape lies ("red circle one, blue square three: left", quarters counted
from the left), and then the answer. Trained on the word alone, no family here ever left the answer's prior: the
answer flips when the two shapes swap, so nothing that sees both alike helps, and the language model got no signal
towards telling them apart. Saying each shape's place first gives each place its own signal; with the places also
in what the language model reads, that took LLaVA from chance to 75%, and neither alone did (the README's left/right
bullet). `Example.reply` is what the model is trained to say; scoring reads the word after the colon.

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
PAIRS = tuple((color, shape) for color in COLORS for shape in SHAPES)  # every object a scene can hold
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
    # How the images were drawn: `scenes`, one per image, each with its `background` and (but for words) `objects`.
    meta: dict = field(default_factory=dict)
    # What the model is trained to say: the answer, or for `position` each shape's place and then the answer.
    reply: str = ""

    def __post_init__(self):
        self.reply = self.reply or self.answer


BACKGROUNDS = ("tint", "white", "texture")
OUTLINED = 0.25  # the share of shapes drawn as outlines
# A shape's side, as a share of the canvas's shorter side: from MIN_SHARE up to the largest that lets `count`
# shapes of that size sit side by side (nearly half the side for one shape); never under MIN_SIZE pixels.
MIN_SHARE, MAX_SHARE_BY_COUNT, MIN_SIZE = 0.125, {1: 0.45, 2: 0.35, 3: 0.3, 4: 0.27}, 12


def _canvas(rng: np.random.Generator) -> tuple[PIL.Image.Image, str]:
    """A light canvas, so that every colour stands out: a random tint, white, or textured like paper; and which."""
    width, height = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, size=2))
    background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    if background == "white":
        return PIL.Image.new("RGB", (width, height), (255, 255, 255)), background
    tint = rng.integers(200, 256, size=3)
    if background == "tint":
        return PIL.Image.new("RGB", (width, height), tuple(int(v) for v in tint)), background
    pixels = np.broadcast_to(tint.astype(np.int16), (height, width, 3)).copy()
    if rng.integers(2):  # grain: the same small offset on the three channels of a pixel, so it stays grey
        pixels += rng.integers(-14, 15, size=(height, width, 1), dtype=np.int16)
    else:  # ruled paper: faint lines every few pixels
        spacing = int(rng.integers(6, 14))
        pixels[int(rng.integers(spacing)) :: spacing] -= 45
    return PIL.Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)), background


def _sizes(rng: np.random.Generator, canvas: PIL.Image.Image, count: int) -> list[int]:
    """One size per shape (the side of its bounding square), each drawn on its own."""
    short = min(canvas.size)
    low = max(MIN_SIZE, round(MIN_SHARE * short))
    high = max(low + 1, round(MAX_SHARE_BY_COUNT[min(count, 4)] * short))
    return [int(v) for v in rng.integers(low, high + 1, size=count)]


def _place(rng: np.random.Generator, width: int, height: int, size: int, taken: list) -> tuple[int, int] | None:
    """A free spot (top-left corner) for a size x size object, away from the others; None if the canvas is full."""
    for _ in range(50):
        x, y = int(rng.integers(2, width - size - 2)), int(rng.integers(2, height - size - 2))
        if all(abs(x - tx) > (size + ts) // 2 + 3 or abs(y - ty) > (size + ts) // 2 + 3 for tx, ty, ts in taken):
            return x, y
    return None


def draw_shape(draw: PIL.ImageDraw.ImageDraw, shape: str, color: str, x: int, y: int, size: int, pen: int = 0) -> None:
    """A filled shape, or with `pen` > 0 its outline drawn that many pixels wide."""
    box = [x, y, x + size, y + size]
    style = dict(outline=COLORS[color], width=pen) if pen else dict(fill=COLORS[color])
    if shape == "circle":
        draw.ellipse(box, **style)
    elif shape == "square":
        draw.rectangle(box, **style)
    else:
        draw.polygon([(x + size / 2, y), (x, y + size), (x + size, y + size)], **style)


def _pen(rng: np.random.Generator, size: int) -> int:
    """0 for a filled shape; otherwise an outline's width, thick enough to keep its colour readable."""
    return 0 if rng.random() >= OUTLINED else max(2, size // int(rng.integers(5, 9)))


def draw_scene(rng: np.random.Generator, count: int, distinct: bool = True) -> tuple[PIL.Image.Image, dict]:
    """A canvas with `count` shapes; with `distinct`, no two share both colour and shape. Returns the image and the
    scene: its background and its objects (colour, shape, centre, size, pen: 0 when filled)."""
    for _ in range(20):
        image, background = _canvas(rng)
        draw = PIL.ImageDraw.Draw(image)
        objects, taken = [], []
        order = rng.permutation(len(PAIRS)) if distinct else rng.integers(0, len(PAIRS), size=count)
        for index, size in zip(order[:count], _sizes(rng, image, count), strict=True):
            spot = _place(rng, image.width, image.height, size, taken)
            if spot is None:
                break
            color, shape = PAIRS[int(index)]
            pen = _pen(rng, size)
            draw_shape(draw, shape, color, *spot, size, pen=pen)
            taken.append((*spot, size))
            objects.append(dict(color=color, shape=shape, x=spot[0] + size / 2, y=spot[1] + size / 2, size=size,
                                pen=pen))  # fmt: skip
        if len(objects) == count:
            return image, dict(background=background, objects=objects)
    raise RuntimeError("could not place the shapes")  # unreachable for the sizes used


def draw_word(rng: np.random.Generator) -> tuple[PIL.Image.Image, dict]:
    """A canvas with one word in small print somewhere on it. Returns the image and the scene: its background and
    the word."""
    image, background = _canvas(rng)
    word = WORDS[int(rng.integers(len(WORDS)))]
    draw = PIL.ImageDraw.Draw(image)
    font = _font(int(rng.integers(10, 15)))
    left, top, right, bottom = draw.textbbox((0, 0), word, font=font)
    x = int(rng.integers(2, max(3, image.width - (right - left) - 2)))
    y = int(rng.integers(2, max(3, image.height - (bottom - top) - 2)))
    draw.text((x - left, y - top), word, fill=(20, 20, 20), font=font)
    return image, dict(background=background, word=word)


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
        image, scene = draw_scene(rng, int(rng.integers(1, 4)))
        target = scene["objects"][int(rng.integers(len(scene["objects"])))]
        # The question must single out one object: its shape (or colour) must be unique in the scene.
        key = "shape" if kind == "color" else "color"
        if sum(o[key] == target[key] for o in scene["objects"]) > 1:
            image, scene = _redraw_single(rng, target)
        question = QUESTION_TEMPLATES[kind].format(**target)
        return Example([image], question, target["color" if kind == "color" else "shape"], kind, dict(scenes=[scene]))
    if kind == "count":
        count = int(rng.integers(1, 5))
        image, scene = draw_scene(rng, count, distinct=False)
        return Example([image], QUESTION_TEMPLATES["count"], NUMBERS[count], kind, dict(scenes=[scene]))
    if kind == "position":
        image, scene = draw_scene(rng, 2)
        while abs(scene["objects"][0]["x"] - scene["objects"][1]["x"]) < 8:  # too close to call: redraw
            image, scene = draw_scene(rng, 2)
        a, b = scene["objects"]
        question = QUESTION_TEMPLATES["position"].format(
            color=a["color"], shape=a["shape"], color2=b["color"], shape2=b["shape"]
        )
        answer = "left" if a["x"] < b["x"] else "right"
        reply = position_reply(a, b, image.width, answer)
        return Example([image], question, answer, kind, dict(scenes=[scene]), reply)
    if kind == "read":
        image, scene = draw_word(rng)
        return Example([image], QUESTION_TEMPLATES["read"], scene.pop("word"), kind, dict(scenes=[scene]))
    # compare: two scenes with different counts
    first, second = (int(v) for v in rng.choice(np.arange(1, 5), size=2, replace=False))
    image_a, scene_a = draw_scene(rng, first, distinct=False)
    image_b, scene_b = draw_scene(rng, second, distinct=False)
    answer = "first" if first > second else "second"
    return Example([image_a, image_b], QUESTION_TEMPLATES["compare"], answer, kind, dict(scenes=[scene_a, scene_b]))


PLACES = NUMBERS[1:]  # the quarters of the canvas's width, from the left, as a position reply names them


def position_reply(first: dict, second: dict, width: int, answer: str) -> str:
    """The reply a position question is trained on: each named shape's quarter of the width, then the answer."""

    def place(thing: dict) -> str:
        return PLACES[min(len(PLACES) - 1, int(len(PLACES) * thing["x"] / width))]

    return (f"{first['color']} {first['shape']} {place(first)}, {second['color']} {second['shape']} {place(second)}: "
            f"{answer}")  # fmt: skip


def reply_places(reply: str) -> tuple[str, ...]:
    """The places a position reply names before its colon ("red circle one, blue square three: left" -> ("one",
    "three")); () for a reply without them."""
    named, colon, _ = reply.rpartition(":")
    if not colon:
        return ()
    return tuple(part.split()[-1] for part in named.split(",") if part.split())


def answer_word(reply: str) -> str:
    """The answer in what a model said: the first word after the last colon, or the first word when there is none
    (every reply but position's is the answer alone)."""
    words = reply.rpartition(":")[2].replace("?", " ").replace(".", " ").replace(",", " ").split()
    return words[0].lower() if words else ""


def _redraw_single(rng: np.random.Generator, target: dict) -> tuple[PIL.Image.Image, dict]:
    """A scene of the target object alone (when the drawn scene could not single it out)."""
    image, background = _canvas(rng)
    (size,) = _sizes(rng, image, 1)
    x, y = _place(rng, image.width, image.height, size, [])
    pen = _pen(rng, size)
    draw_shape(PIL.ImageDraw.Draw(image), target["shape"], target["color"], x, y, size, pen=pen)
    alone = dict(target, x=x + size / 2, y=y + size / 2, size=size, pen=pen)
    return image, dict(background=background, objects=[alone])


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
    """The split as a `datasets.Dataset` (columns images, question, answer, reply, kind), generated on the fly."""
    import datasets

    def generate():
        for example in examples(split, size, seed, multi_image):
            yield dict(images=example.images, question=example.question, answer=example.answer, reply=example.reply,
                       kind=example.kind)  # fmt: skip

    features = datasets.Features(
        images=datasets.Sequence(datasets.Image()),
        question=datasets.Value("string"),
        answer=datasets.Value("string"),
        reply=datasets.Value("string"),
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
    words.update(PLACES)
    words.update((",", ":"))  # a position reply's punctuation
    words -= {"color2", "shape2"}
    return sorted(words)
