"""The training recipe's options and its command-line flags: nothing here imports torch, so `vlm-patterns --help`
answers at once."""

import argparse
from dataclasses import dataclass

from .recipes import recipe_names


@dataclass
class TrainOptions:
    family: str
    output: str
    steps: int = 6000
    batch_size: int = 32
    # 1e-3 left Flamingo on the answer prior for over a thousand steps (measured at 1500 steps: 40% held-out
    # against 59% at 5e-4); the other three learn as fast or faster at 5e-4.
    learning_rate: float = 5e-4
    warmup_steps: int = 200
    weight_decay: float = 0.01
    freeze: str = "none"
    # The vision encoder's own peak rate (None: learning_rate), lower to keep what `pretrain-vision` taught it.
    vision_learning_rate: float | None = None
    init_from: str | None = None
    lora: bool = False
    lora_rank: int = 16
    gate_init: float = 0.5
    # The language model's size, the same for every family so that they stay comparable (from scratch only).
    text_width: int = 128
    text_layers: int = 3
    # The learned positions start as the patches' places (training/vit_positions.py): a new model's, not small
    # ones, or with --from the checkpoint's, replaced.
    positions_as_places: bool = False
    without_code: bool = False
    seed: int = 0
    eval_every: int = 500
    eval_examples: int = 192
    # Question kinds to train and check on; empty: every kind the family reads.
    kinds: tuple[str, ...] = ()
    report_to: str = "none"
    # Continue from the latest Trainer checkpoint under OUTPUT/trainer (a run stopped, e.g. at the end of a session).
    resume: bool = False
    # Any other `TrainingArguments` (bf16, gradient accumulation, gradient checkpointing, checkpoint saving,
    # resume_from_checkpoint, push_to_hub, ...), as command-line flags in transformers' own spelling.
    trainer_args: tuple[str, ...] = ()


@dataclass
class VisionPretrainOptions:
    """`vlm-patterns pretrain-vision`: the vision encoder's own stage (training/pretrain_vision.py)."""

    family: str
    output: str
    steps: int = 2000
    batch_size: int = 32
    learning_rate: float = 5e-4
    weight_decay: float = 0.01
    init_from: str | None = None
    text_width: int = 128
    text_layers: int = 3
    positions_as_places: bool = False  # as for TrainOptions
    without_code: bool = False
    seed: int = 0
    eval_every: int = 250
    eval_examples: int = 600
    # one-shape: every picture one shape, named; mixed: also two to four shapes counted and words read.
    pictures: str = "one-shape"
    # Also name each token's own column and row from that token, so that the encoder keeps where things are.
    token_places: bool = True


def add_optimizer_arguments(parser: argparse.ArgumentParser, defaults, per_step: str) -> None:
    """--steps, --batch-size, --learning-rate and --weight-decay, as both stages take them."""
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer steps (default: %(default)s)")
    parser.add_argument(
        "--batch-size", type=int, default=defaults.batch_size, help=f"{per_step} (default: %(default)s)"
    )
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate,
                        help="AdamW peak rate, cosine decay after warm-up (default: %(default)s)")  # fmt: skip
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay,
                        help="AdamW decoupled weight decay (default: %(default)s)")  # fmt: skip


def add_positions_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--positions-as-places", action="store_true",
                        help="start the learned positions as 2D sin-cos of each patch's place, twice as large as the "
                             "patches' own embeddings: a new model's, not small and random, or with --from the "
                             "checkpoint's, replaced (LLaVA's and Flamingo's ViT positions; Qwen2-VL's and Fuyu's "
                             "resampled table, added to a checkpoint without one; training/vit_positions.py)")  # fmt: skip


def add_vision_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = VisionPretrainOptions(family="", output="")
    parser.add_argument("family", choices=recipe_names(), help="the pattern whose vision encoder to pre-train")
    parser.add_argument("--output", required=True, help="checkpoint folder to write (the whole model)")
    parser.add_argument("--from", dest="init_from",
                        help="start from this checkpoint of ours (default: a new model of the recipe's size)")  # fmt: skip
    add_optimizer_arguments(parser, defaults, per_step="pictures per step")
    parser.add_argument("--text-width", type=int, default=defaults.text_width,
                        help="a new model's language model width, as for train (default: %(default)s)")  # fmt: skip
    parser.add_argument("--text-layers", type=int, default=defaults.text_layers,
                        help="a new model's language model layers (default: %(default)s)")  # fmt: skip
    add_positions_argument(parser)
    parser.add_argument("--without-code", action="store_true",
                        help="no code files for trust_remote_code (checkpoints kept inside this repository)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=defaults.seed, help="weights and pictures (default: %(default)s)")
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every,
                        help="steps between held-out checks (default: %(default)s)")  # fmt: skip
    parser.add_argument("--eval-examples", type=int, default=defaults.eval_examples,
                        help="held-out pictures per check (default: %(default)s)")  # fmt: skip
    parser.add_argument("--pictures", choices=["one-shape", "mixed"], default=defaults.pictures,
                        help="one-shape: name the one object of each picture; mixed: half such, a third of two to "
                             "four shapes to count, a sixth of a word to read (default: %(default)s)")  # fmt: skip
    parser.add_argument("--no-token-places", dest="token_places", action="store_false",
                        help="do not also teach the encoder to name each token's own column and row (the stage as "
                             "the shipped models had it)")  # fmt: skip
    parser.epilog = "Then: vlm-patterns train FAMILY --from OUTPUT --output ... (the task on top of the encoder)."


def vision_options_from(args: argparse.Namespace) -> VisionPretrainOptions:
    return VisionPretrainOptions(**{k: getattr(args, k) for k in VisionPretrainOptions.__dataclass_fields__})


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = TrainOptions(family="", output="")
    parser.add_argument("family", choices=recipe_names(), help="the pattern to train")
    parser.add_argument("--output", required=True, help="checkpoint folder to write")
    add_optimizer_arguments(parser, defaults, per_step="examples per step and device")
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps,
                        help="steps of linear warm-up to the peak rate (default: %(default)s)")  # fmt: skip
    parser.add_argument("--freeze", choices=["none", "vision", "connector"], default=defaults.freeze,
                        help="none: train all; vision: keep the vision encoder fixed; connector: train only it")  # fmt: skip
    parser.add_argument("--vision-learning-rate", type=float, default=defaults.vision_learning_rate,
                        help="the vision encoder's own peak rate, on the same schedule (default: --learning-rate); "
                             "lower, it adapts an encoder trained by pretrain-vision without forgetting it")  # fmt: skip
    parser.add_argument("--from", dest="init_from", help="start from this checkpoint of ours (fine-tuning)")
    parser.add_argument("--lora", action="store_true", help="LoRA adapters on the language model (peft)")
    parser.add_argument("--lora-rank", type=int, default=defaults.lora_rank, help="with --lora (default: %(default)s)")
    parser.add_argument("--gate-init", type=float, default=defaults.gate_init,
                        help="flamingo from scratch: the gates' starting alpha; 0 keeps them closed (default: %(default)s)")  # fmt: skip
    parser.add_argument("--text-width", type=int, default=defaults.text_width,
                        help="from scratch: the language model's width, a multiple of 32 (heads of 32, an MLP twice "
                             "as wide; default: %(default)s)")  # fmt: skip
    parser.add_argument("--text-layers", type=int, default=defaults.text_layers,
                        help="from scratch: the language model's layers (default: %(default)s)")  # fmt: skip
    add_positions_argument(parser)
    parser.add_argument("--without-code", action="store_true",
                        help="no code files for trust_remote_code (checkpoints kept inside this repository)")  # fmt: skip
    parser.add_argument(
        "--seed", type=int, default=defaults.seed, help="weights and training stream (default: %(default)s)"
    )
    parser.add_argument(
        "--eval-every",
        type=int,
        default=defaults.eval_every,
        help="steps between held-out checks (default: %(default)s)",
    )
    parser.add_argument("--eval-examples", type=int, default=defaults.eval_examples,
                        help="held-out questions per check (default: %(default)s)")  # fmt: skip
    parser.add_argument("--kinds", type=_kinds, default=defaults.kinds, metavar="KIND[,KIND...]",
                        help="train and check on these question kinds only (color, shape, count, position, read, "
                             "compare; default: every kind the family reads)")  # fmt: skip
    parser.add_argument("--report-to", default=defaults.report_to, help="Trainer loggers: none, tensorboard, ...")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest checkpoint under OUTPUT/trainer (saved with --save_strategy "
                             "steps --save_steps N), with the same options as the run it continues (others are refused)")  # fmt: skip
    parser.epilog = (
        "Any other transformers TrainingArguments flag passes through in transformers' spelling, e.g. --bf16, "
        "--gradient_accumulation_steps 4, --gradient_checkpointing, --save_strategy steps --save_steps 500, "
        "--resume_from_checkpoint OUTPUT/trainer/checkpoint-500, --push_to_hub --hub_model_id you/name."
    )


def _kinds(text: str) -> tuple[str, ...]:
    """Comma-separated kinds; they are checked against the task (and the family) when training starts."""
    return tuple(k.strip() for k in text.split(",") if k.strip())


def options_from(args: argparse.Namespace, trainer_args: list[str] = ()) -> TrainOptions:
    fields = {k: getattr(args, k) for k in TrainOptions.__dataclass_fields__ if k != "trainer_args"}
    return TrainOptions(**fields, trainer_args=tuple(trainer_args))
