"""Ten questions about pictures drawn as a visitor draws them, asked of the Space's four models as the page asks them.

The task's own pictures are small (64 to 160 pixels a side) and the held-out questions come from the same generator as
the training stream. A visitor draws on a larger white canvas, with a pen, shapes of their own size: these five
pictures (480 x 320, white) are drawn that way here, two questions each, in the task's words. Ten questions are an
anecdote, not a measurement (`vlm-patterns evaluate` measures); they show whether what was measured carries over to a
picture nobody generated.

    python spaces/ask_drawn.py                # the embedded models: every reply, then the count right per family
    python spaces/ask_drawn.py --save DIR     # also keep the five pictures (to try them in the Space)
"""

import argparse
import tempfile
from pathlib import Path

import PIL.Image
import PIL.ImageDraw

from vlm_patterns.spaces import app
from vlm_patterns.training.synthetic_vqa import answer_word, draw_shape

PEN = 7  # an outline's width in pixels, about what a mouse or finger leaves on the page's canvas


def canvas(*shapes: tuple[str, str, tuple[int, int], int, bool]) -> PIL.Image.Image:
    """A white 480 x 320 canvas with `shapes`, each (shape, colour, centre, size, filled), drawn as the task draws
    them (outlines PEN wide)."""
    image = PIL.Image.new("RGB", (480, 320), "white")
    draw = PIL.ImageDraw.Draw(image)
    for shape, color, (x, y), size, filled in shapes:
        draw_shape(draw, shape, color, x - size // 2, y - size // 2, size, pen=0 if filled else PEN)
    return image


PICTURES = {
    "pen circle, filled square": canvas(("circle", "red", (130, 160), 120, False),
                                        ("square", "blue", (350, 160), 110, True)),
    "one large triangle": canvas(("triangle", "green", (240, 160), 240, True)),
    "outlined square": canvas(("square", "yellow", (240, 160), 180, False)),
    "four circles in a row": canvas(*(("circle", color, (75 + 110 * i, 160), 80, True)
                                      for i, color in enumerate(("red", "blue", "green", "yellow")))),
    "circle beside a triangle": canvas(("triangle", "blue", (140, 170), 150, True),
                                       ("circle", "red", (340, 160), 130, True)),
}  # fmt: skip
QUESTIONS = [  # (picture, question, the expected answer)
    ("pen circle, filled square", "What color is the circle?", "red"),
    ("pen circle, filled square", "Is the red circle left or right of the blue square?", "left"),
    ("one large triangle", "What shape is green?", "triangle"),
    ("one large triangle", "How many shapes are there?", "one"),
    ("outlined square", "What shape is yellow?", "square"),
    ("outlined square", "What color is the square?", "yellow"),
    ("four circles in a row", "How many shapes are there?", "four"),
    ("four circles in a row", "Is the green circle left or right of the blue circle?", "right"),
    ("circle beside a triangle", "What shape is blue?", "triangle"),
    ("circle beside a triangle", "Is the red circle left or right of the blue triangle?", "right"),
]


def ask(folder: Path, models: app.ModelSet) -> list[dict[str, str]]:
    """Save the pictures in `folder` and ask every question in a new chat of its own, as the page would; return
    each question's replies by family."""
    paths = {}
    for name, picture in PICTURES.items():
        paths[name] = folder / (name.replace(" ", "-").replace(",", "") + ".png")
        picture.save(paths[name])
    replies = []
    for name, question, _ in QUESTIONS:
        message = {"text": question, "files": [str(paths[name])]}
        *_, (_, _, _, histories) = app.answer_all(message, {f: [] for f in app.FAMILIES}, models,
                                                  app.Settings(max_new_tokens=16))  # fmt: skip
        replies.append({family: histories[family][-1]["text"] for family in app.FAMILIES})
    return replies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--save", type=Path, help="keep the five pictures in this folder")
    args = parser.parse_args()
    models = app.ModelSet("embedded")
    if args.save:
        args.save.mkdir(parents=True, exist_ok=True)
        replies = ask(args.save, models)
    else:
        with tempfile.TemporaryDirectory() as folder:
            replies = ask(Path(folder), models)
    right = dict.fromkeys(app.FAMILIES, 0)
    for (name, question, expected), by_family in zip(QUESTIONS, replies, strict=True):
        print(f"{name}: {question} (expected: {expected})")
        for family, reply in by_family.items():
            correct = answer_word(reply) == expected
            right[family] += correct
            print(f"  {family:>9}: {'right' if correct else 'wrong'}  {reply}")
    print(f"right of {len(QUESTIONS)}: " + ", ".join(f"{family} {count}" for family, count in right.items()))


if __name__ == "__main__":
    main()
