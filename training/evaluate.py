"""Held-out accuracy per question kind, visual tokens per image and latency, for any checkpoint of ours; and the
four-family comparison (markdown table and PNG plots).

An answer is right when the model's answer word is the expected word: the first word it says, or the word after its
last colon when it names the shapes' places first, as a position reply does (`synthetic_vqa.answer_word`).
"""

import json
import math
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .collate import VQACollator
from .synthetic_vqa import KINDS, PLACES, SINGLE_IMAGE_KINDS, answer_word, examples, kinds_for, reply_places

# Enough new tokens for the longest reply (a position reply: two shapes with their places, then the answer) and the
# family's end token.
REPLY_TOKENS = 12


@dataclass
class Evaluation:
    family: str
    examples: int
    seed: int
    accuracy: float
    accuracy_by_kind: dict[str, float]
    chance_by_kind: dict[str, float]
    visual_tokens_per_image: float
    latency_ms: float
    parameters: int
    errors: list[dict] = field(default_factory=list)
    questions_by_kind: dict[str, int] = field(default_factory=dict)
    # Colour and shape questions by the number of shapes in the picture ("1", "2", "3"): with one shape, naming its
    # shape is recognition alone; with more, the question must also single out the shape it names.
    accuracy_by_shapes: dict[str, dict[str, float]] = field(default_factory=dict)
    # What the position replies got right before their answer: `places_right`, the share naming both shapes' quarters
    # right; `places_swapped`, the share naming the two quarters that hold the shapes, each for the other shape (the
    # places found, not which shape is where); `answer_follows_places`, of the replies naming two different quarters,
    # the share whose answer is the one those quarters give (right or wrong). Together they say what fails: the
    # answer, the finding of places, or telling the two shapes apart.
    position_replies: dict[str, float] = field(default_factory=dict)

    def margin(self, kind: str | None = None) -> float:
        """Two binomial standard errors of an accuracy (overall, or of one kind): another held-out draw of the
        same size lands within this about 95% of the time."""
        if kind is None:
            return 2 * math.sqrt(self.accuracy * (1 - self.accuracy) / self.examples)
        p = self.accuracy_by_kind[kind]
        return 2 * math.sqrt(p * (1 - p) / self.questions_by_kind[kind])

    @property
    def chance(self) -> float:
        """What uniform guessing scores, averaged over the question kinds."""
        return sum(self.chance_by_kind.values()) / len(self.chance_by_kind)

    @property
    def single_image_accuracy(self) -> float:
        """Accuracy over the one-image kinds only: comparable across families whether or not they take several
        images (the two-image question is among the easiest)."""
        kinds = [k for k in SINGLE_IMAGE_KINDS if k in self.accuracy_by_kind]
        right = sum(self.accuracy_by_kind[k] * self.questions_by_kind[k] for k in kinds)
        return right / sum(self.questions_by_kind[k] for k in kinds)

    def markdown(self) -> str:
        kinds = [k for k in KINDS if k in self.accuracy_by_kind]
        head = "| kind | " + " | ".join(kinds) + " | all |\n|---|" + "---|" * (len(kinds) + 1) + "\n"
        acc = "| accuracy | " + " | ".join(f"{100 * self.accuracy_by_kind[k]:.1f}%" for k in kinds)
        chance = "| chance | " + " | ".join(f"{100 * self.chance_by_kind[k]:.0f}%" for k in kinds)
        summary = (
            f"{self.family}: {self.examples} held-out questions (seed {self.seed}), "
            f"{self.visual_tokens_per_image:.1f} visual tokens per image, {self.latency_ms:.1f} ms per answer, "
            f"{self.parameters / 1e6:.2f}M parameters; overall accuracy ±{100 * self.margin():.1f} points "
            "(two standard errors)"
        )
        by_shapes = "".join(
            f"\n- {kind} questions by shapes in the picture: "
            + ", ".join(f"{count}: {100 * value:.0f}%" for count, value in by_count.items())
            for kind, by_count in self.accuracy_by_shapes.items()
        )
        replies = self.position_replies
        places = (
            f"\n- position replies: both quarters named right {100 * replies['places_right']:.0f}%, swapped "
            f"{100 * replies['places_swapped']:.0f}%; answers that follow the reply's own quarters "
            f"{100 * replies['answer_follows_places']:.0f}%"
            if replies
            else ""
        )
        return f"{summary}\n\n{head}{acc} | {100 * self.accuracy:.1f}% |\n{chance} | |\n{by_shapes}{places}"


def load_checkpoint(path: str | Path):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor, model.config.model_type.removesuffix("_pattern")  # model_type is `<family>_pattern`


def answer(model, processor, batch: list[dict], max_new_tokens: int = REPLY_TOKENS) -> list[str]:
    """Greedy answers (their answer word) to a batch of examples."""
    return answer_inputs(model, processor, collate_prompts(processor, batch), max_new_tokens)


def collate_prompts(processor, batch: list[dict]) -> dict[str, torch.Tensor]:
    return VQACollator(processor, with_answers=False)(batch)


@torch.inference_mode()
def answer_inputs(model, processor, inputs: dict[str, torch.Tensor], max_new_tokens: int = REPLY_TOKENS) -> list[str]:
    """Greedy answers (their answer word) to already collated prompts; generation stops once every reply has
    ended."""
    return [answer_word(reply) for reply in reply_inputs(model, processor, inputs, max_new_tokens)]


@torch.inference_mode()
def reply_inputs(model, processor, inputs: dict[str, torch.Tensor], max_new_tokens: int = REPLY_TOKENS) -> list[str]:
    """Greedy replies, whole (a position reply's places too), to already collated prompts."""
    inputs = {k: v.to(model.device) for k, v in inputs.items()}
    out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return processor.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def visual_tokens(processor, batch: list[dict]) -> list[int]:
    """How many visual tokens each image of the batch becomes for the language model, as the processor counts
    them (`_get_num_multimodal_tokens`, the same count the Space shows)."""
    sizes = [(image.height, image.width) for example in batch for image in example["images"]]
    return list(processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens) if sizes else []


def evaluate(
    checkpoint: str | Path,
    num_examples: int = 3000,
    seed: int = 1,
    batch_size: int = 32,
    latency_samples: int = 20,
    kinds: tuple[str, ...] | None = None,
) -> Evaluation:
    """Accuracy on `num_examples` held-out questions drawn with `seed` (the tests and README use others than
    training does: the held-out split never shares a seed with the training stream), of every kind the family is
    asked or only of `kinds`."""
    model, processor, family = load_checkpoint(checkpoint)
    multi_image = processor.max_images_per_prompt != 1
    # Batched by kind: a batch of one-word replies then stops after two new tokens, not after a position reply's ten.
    drawn = [vars(e) for e in examples("held_out", num_examples, seed, multi_image, kinds)]
    data = sorted(drawn, key=lambda e: KINDS.index(e["kind"]))
    right, total = defaultdict(int), defaultdict(int)
    right_by_shapes, total_by_shapes = defaultdict(int), defaultdict(int)
    errors, tokens, places = [], [], defaultdict(int)
    for start in range(0, len(data), batch_size):
        batch = data[start : start + batch_size]
        inputs = collate_prompts(processor, batch)
        for example, reply in zip(batch, reply_inputs(model, processor, inputs), strict=True):
            predicted = answer_word(reply)
            total[example["kind"]] += 1
            if example["kind"] == "position":
                count_places(places, reply_places(reply), reply_places(example["reply"]), predicted)
            right[example["kind"]] += predicted == example["answer"]
            if example["kind"] in ("color", "shape"):
                group = (example["kind"], str(len(example["meta"]["scenes"][0]["objects"])))
                total_by_shapes[group] += 1
                right_by_shapes[group] += predicted == example["answer"]
            if predicted != example["answer"] and sum(e["kind"] == example["kind"] for e in errors) < 4:
                errors.append(dict(kind=example["kind"], question=example["question"], answer=example["answer"],
                                   predicted=predicted))  # fmt: skip
        tokens += visual_tokens(processor, batch)
    timings = []
    for example in drawn[:latency_samples]:  # the kinds as they come
        started = time.perf_counter()
        answer(model, processor, [example])
        timings.append(time.perf_counter() - started)
    from .synthetic_vqa import ANSWERS

    kinds = [k for k in kinds_for(multi_image, kinds) if total[k]]
    position_replies = {}
    if total["position"]:
        position_replies = dict(places_right=places["right"] / total["position"],
                                places_swapped=places["swapped"] / total["position"],
                                answer_follows_places=places["followed"] / max(1, places["apart"]))  # fmt: skip
    by_shapes = defaultdict(dict)
    for (kind, count), questions in sorted(total_by_shapes.items()):
        by_shapes[kind][count] = right_by_shapes[kind, count] / questions
    return Evaluation(
        family=family,
        examples=len(data),
        seed=seed,
        accuracy=sum(right.values()) / len(data),
        accuracy_by_kind={k: right[k] / total[k] for k in kinds},
        chance_by_kind={k: 1 / len(ANSWERS[k]) for k in kinds},
        visual_tokens_per_image=statistics.mean(tokens),
        latency_ms=1e3 * statistics.median(timings),
        parameters=sum(p.numel() for p in model.parameters()),
        errors=errors,
        questions_by_kind={k: total[k] for k in kinds},
        accuracy_by_shapes=dict(by_shapes),
        position_replies=position_replies,
    )


def count_places(counts: dict[str, int], said: tuple[str, ...], true: tuple[str, ...], answer: str) -> None:
    """Count a position reply in `counts`: "right" if it named both quarters right; "swapped" if it named the
    shapes' two different quarters the wrong way round; "apart" if it named two different quarters, and "followed" if
    its answer is then the one they give."""
    counts["right"] += said == true
    counts["swapped"] += len(true) == 2 and true[0] != true[1] and said == true[::-1]
    if len(said) == 2 and all(place in PLACES for place in said) and said[0] != said[1]:
        counts["apart"] += 1
        counts["followed"] += answer == ("left" if PLACES.index(said[0]) < PLACES.index(said[1]) else "right")


def compare(checkpoints: list[str | Path], output: str | Path, num_examples: int = 3000, seed: int = 1) -> str:
    """Evaluate several checkpoints; write comparison.md, comparison.json and comparison.png (accuracy vs
    training examples, from each checkpoint's training_log.json, and vs visual tokens per image) into `output`."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    results = [evaluate(path, num_examples, seed) for path in checkpoints]
    curves, run_starts = {}, {}
    for path, result in zip(checkpoints, results, strict=True):
        log = Path(path) / "training_log.json"
        if log.exists():
            record = json.loads(log.read_text())
            curves[result.family], _ = learning_curve(record)
            run_starts.update(run_labels(record))
    kinds = [k for k in KINDS if any(k in r.accuracy_by_kind for r in results)]
    overall = max(r.margin() for r in results)
    per_kind = max(r.margin(k) for r in results for k in r.accuracy_by_kind)
    lines = [
        f"Held-out accuracy, {num_examples} questions per family (seed {seed}); chance in brackets. Another draw of "
        f"this size lands within ±{100 * overall:.1f} points overall and ±{100 * per_kind:.0f} per kind "
        "(two standard errors).",
        "",
        "| family | visual tokens / image | "
        + " | ".join(kinds)
        + " | one-image kinds | all | ms / answer | parameters |",
        "|---|---|" + "---|" * (len(kinds) + 4),
    ]
    for r in results:
        cells = [
            f"{100 * r.accuracy_by_kind[k]:.0f}% ({100 * r.chance_by_kind[k]:.0f}%)" if k in r.accuracy_by_kind else "-"
            for k in kinds
        ]
        lines.append(
            f"| {r.family} | {r.visual_tokens_per_image:.1f} | " + " | ".join(cells)
            + f" | {100 * r.single_image_accuracy:.1f}% | {100 * r.accuracy:.1f}% | {r.latency_ms:.1f} | {r.parameters / 1e6:.2f}M |"
        )  # fmt: skip
    table = "\n".join(lines)
    (output / "comparison.md").write_text(table + "\n")
    (output / "comparison.json").write_text(json.dumps([asdict(r) for r in results], indent=2))
    plot(results, curves, output / "comparison.png", run_starts)
    return table


def learning_curve(log: dict) -> tuple[list[dict], list[int]]:
    """The held-out curve of a checkpoint's whole training, from its training_log.json: a fine-tune's points follow
    those of the checkpoint it started from (`started_from`), its examples counted on from there. Also returns the
    example counts at which each later run began. A run on some question kinds only (`--kinds`) was checked on those
    alone, so its points are left out; its examples still count."""
    curve, starts, _, _ = _runs_curve(log)
    return curve, starts


def run_labels(log: dict) -> dict[int, str]:
    """Where each later run of a checkpoint's training began (examples seen) and its name on the plot: "run 2",
    "run 3", ..., with the question kinds of a run on some kinds only."""
    _, starts, _, kinds = _runs_curve(log)
    return {start: f"run {number}" + (f" ({', '.join(run_kinds)} only)" if run_kinds else "")
            for number, (start, run_kinds) in enumerate(zip(starts, kinds[1:], strict=True), 2)}  # fmt: skip


def _runs_curve(log: dict) -> tuple[list[dict], list[int], int, list[list[str]]]:
    """learning_curve's points and run starts, the examples seen by the end of the log's last run, and each run's
    question kinds (empty: every kind)."""
    earlier, starts, offset, kinds = _runs_curve(log["started_from"]) if "started_from" in log else ([], [], None, [])
    options, checked = log["options"], log["held_out_curve"]
    # Examples per step as the run counted them (gradient accumulation included), over all of its steps.
    per_step = checked[-1]["examples"] / checked[-1]["step"] if checked else options["batch_size"]
    seen = round(options["steps"] * per_step)
    kinds = [*kinds, list(options.get("kinds") or [])]
    points = [] if kinds[-1] else checked
    if offset is None:
        return list(points), [], seen, kinds
    later = [dict(point, examples=point["examples"] + offset) for point in points]
    return earlier + later, [*starts, offset], offset + seen, kinds


def plot(results: list[Evaluation], curves: dict, path: Path, run_starts: dict[int, str] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for family, curve in curves.items():
        left.plot([p["examples"] for p in curve], [100 * p["accuracy"] for p in curve], marker="o", label=family)
    left.set(xlabel="training examples seen", ylabel="held-out accuracy (%)", title="Learning curves")
    left.xaxis.set_major_formatter(matplotlib.ticker.EngFormatter(sep=""))  # 200k, not 200000 run into its neighbours
    left.grid(alpha=0.3)
    if curves:
        left.legend()
    for r in results:
        right.scatter(r.visual_tokens_per_image, 100 * r.accuracy, s=80)
        right.annotate(r.family, (r.visual_tokens_per_image, 100 * r.accuracy), textcoords="offset points",
                       xytext=(6, 4))  # fmt: skip
    right.set(xlabel="visual tokens per image", ylabel="held-out accuracy (%)", title="Accuracy vs visual tokens")
    right.grid(alpha=0.3)
    figure.tight_layout()
    # Each point is measured on the held-out questions of its own run; a run on some kinds only has no points.
    # Each label goes on the lowest line it fits on after the labels already there (measured once laid out), so
    # runs that start close together, or after a long label, stay readable.
    renderer, line_ends = figure.canvas.get_renderer(), []  # per line: where its last label ends, in pixels
    for start, label in sorted((run_starts or {}).items()):
        left.axvline(start, color="grey", linestyle=":")
        x = left.transData.transform((start, 0))[0]
        line = next((i for i, end in enumerate(line_ends) if end < x), len(line_ends))
        text = left.annotate(label, (start, 0), xycoords=("data", "axes fraction"), xytext=(4, 6 + 12 * line),
                             textcoords="offset points", color="grey")  # fmt: skip
        end = text.get_window_extent(renderer).x1 + 4
        line_ends[line : line + 1] = [end]
    figure.savefig(path, dpi=120)
    plt.close(figure)
