"""The training recipe: any family on the synthetic task, from scratch or from a checkpoint, on transformers'
`Trainer` (so `accelerate launch -m vlm_patterns.training.train ...` spreads it over GPUs or nodes unchanged).

Freezing strategies, the usual three:
- `none`: train everything (from scratch there is nothing worth keeping);
- `vision`: keep the vision encoder fixed (Fuyu has none: nothing is frozen);
- `connector`: train only what joins vision to language (LLaVA's projector, Qwen2-VL's PatchMerger, Fuyu's patch
  Linear, Flamingo's resampler and gated cross-attention blocks).
`lora` adds low-rank adapters (peft) to the language model's projections and trains them with the connector;
they are merged into the saved checkpoint, and also saved on their own under `adapter/`.
"""

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch
from torch.utils.data import IterableDataset

from .collate import VQACollator
from .options import TrainOptions, add_arguments, options_from
from .synthetic_vqa import SINGLE_IMAGE_KINDS, examples, kinds_for, make_example, training_seed

VISION_LOG = "vision_pretraining.json"  # written by pretrain_vision.py
LORA_TARGETS = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"


class SyntheticStream(IterableDataset):
    """An endless stream of training examples (dicts), each drawn from its own seed, in batches of `batch_size`.

    Questions about two images come in batches of their own (`batch_kinds`): in a mixed batch, one of them would pad
    every prompt to the length of two images' visual tokens (LLaVA: 64 more per prompt, about twice the step's work).
    The stream is the same whatever the number of DataLoader workers: worker w of n draws batches w, w + n, ...,
    and the DataLoader hands them out in that order. `start_batch` skips batches without drawing them, so a resumed
    run reads on where the interrupted one stopped at no cost (Trainer's own skip would draw and discard them)."""

    def __init__(self, seed: int, multi_image: bool, kinds: tuple[str, ...] | None = None, batch_size: int = 1):
        self.seed, self.kinds, self.batch_size = seed, kinds_for(multi_image, kinds), batch_size
        self.start_batch = 0
        self.single = tuple(k for k in self.kinds if k in SINGLE_IMAGE_KINDS)
        self.multi = tuple(k for k in self.kinds if k not in SINGLE_IMAGE_KINDS)

    def batch_kinds(self, batch: int) -> tuple[str, ...]:
        """The kinds batch `batch` draws its questions from: of every len(kinds) batches, as many as there are
        two-image kinds draw from those, the others from the one-image kinds, so each kind keeps its even share."""
        if not self.single or not self.multi:
            return self.kinds
        return self.multi if batch % len(self.kinds) >= len(self.single) else self.single

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        first, stride = (0, 1) if worker is None else (worker.id, worker.num_workers)
        if worker is not None:
            torch.set_num_threads(1)  # the processors' tensor work would contend with the training process's threads
        batch = self.start_batch + first
        while True:
            kinds = self.batch_kinds(batch)
            for index in range(batch * self.batch_size, (batch + 1) * self.batch_size):
                yield vars(make_example(training_seed(index, self.seed), kinds))
            batch += stride


class ResumeStream:
    """On a resumed run, start the stream at the first batch the checkpoint has not trained on."""

    def __init__(self, stream: SyntheticStream):
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                # Trainer skips batches itself unless told not to (the recipe tells it; a user may not).
                consumed = state.global_step * args.gradient_accumulation_steps * args.world_size
                stream.start_batch = consumed if args.ignore_data_skip else 0

        self.callback = Callback()


def apply_freezing(model, strategy: str) -> int:
    """Set requires_grad by strategy (the model names its vision encoder and connector); returns the number of
    trainable parameters."""
    if strategy not in ("none", "vision", "connector"):
        raise ValueError(f"--freeze must be none, vision or connector, not {strategy!r}")
    for name, parameter in model.named_parameters():
        if strategy == "vision":
            parameter.requires_grad_(not name.startswith(model.vision_encoder_prefixes))
        elif strategy == "connector":
            parameter.requires_grad_(name.startswith(model.connector_prefixes))
        else:
            parameter.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def check_vision_learning_rate(model, options: TrainOptions) -> None:
    """A separate rate for the vision encoder needs an encoder that trains, under its own names."""
    if options.vision_learning_rate is None:
        return
    if not model.vision_encoder_prefixes:
        raise ValueError(f"--vision-learning-rate: {options.family} has no vision encoder")
    if options.freeze != "none" or options.lora:
        raise ValueError("--vision-learning-rate needs the vision encoder to train: not with --freeze or --lora")


def with_vision_rate(trainer_class, vision_rate: float | None):
    """`trainer_class` whose optimizer gives the vision encoder's weights groups of their own at `vision_rate` (the
    schedule scales every group's peak alike); `trainer_class` itself when `vision_rate` is None."""
    if vision_rate is None:
        return trainer_class

    class VisionRateTrainer(trainer_class):
        def create_optimizer(self, model=None):
            fresh = self.optimizer is None
            optimizer = super().create_optimizer(model)
            if fresh:  # no step taken yet: regrouping loses no state, and a resumed run's state has these groups
                named = (model or self.model).named_parameters()
                encoder = {id(p) for name, p in named if name.startswith(self.model.vision_encoder_prefixes)}
                groups = []
                for group in optimizer.param_groups:
                    groups.append(dict(group, params=[p for p in group["params"] if id(p) not in encoder]))
                    if mine := [p for p in group["params"] if id(p) in encoder]:
                        groups.append(dict(group, params=mine, lr=vision_rate))
                optimizer.param_groups = groups
            return optimizer

    return VisionRateTrainer


def add_lora(model, rank: int):
    """Low-rank adapters on the language model's projections; the connector trains fully beside them."""
    from peft import LoraConfig, get_peft_model

    connector = [name.removeprefix("model.").rstrip(".") for name in model.connector_prefixes]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS,
                        modules_to_save=connector)  # fmt: skip
    return get_peft_model(model, config)


class HeldOutCurve:
    """Held-out accuracy every `every` steps: the learning curve `vlm-patterns compare` plots. Each point goes into
    the Trainer's log history, which its checkpoints keep, so a resumed run continues the curve."""

    def __init__(self, processor, every: int, num_examples: int, multi_image: bool,
                 kinds: tuple[str, ...] | None = None):  # fmt: skip
        from transformers import TrainerCallback

        outer = self
        self.data = [vars(e) for e in examples("held_out", num_examples, seed=0, multi_image=multi_image, kinds=kinds)]

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, model=None, **kwargs):
                if state.global_step % every == 0 or state.global_step == state.max_steps:
                    accuracy = outer.measure(model, processor, state.global_step)
                    per_step = args.train_batch_size * args.gradient_accumulation_steps * args.world_size
                    state.log_history.append(dict(step=state.global_step, examples=state.global_step * per_step,
                                                  held_out_accuracy=accuracy))  # fmt: skip

        self.callback = Callback()

    @staticmethod
    def points(log_history: list[dict]) -> list[dict]:
        return [dict(step=e["step"], examples=e["examples"], accuracy=e["held_out_accuracy"])
                for e in log_history if "held_out_accuracy" in e]  # fmt: skip

    def measure(self, model, processor, step: int) -> float:
        from .evaluate import answer

        was_training = model.training
        model.eval()
        right = 0
        for start in range(0, len(self.data), 64):
            batch = self.data[start : start + 64]
            right += sum(p == e["answer"] for p, e in zip(answer(model, processor, batch), batch, strict=True))
        model.train(was_training)
        accuracy = right / len(self.data)
        print(f"step {step}: held-out accuracy {100 * accuracy:.1f}% ({len(self.data)} questions)", flush=True)
        return accuracy


class TrainingTime:
    """Wall time per run, written beside the Trainer's checkpoints at every save, so that a model trained over
    several resumed runs reports its whole training time (the time after a run's last checkpoint is lost work)."""

    def __init__(self, folder: Path):
        from transformers import TrainerCallback

        self.path, self.started, self.first_step, outer = folder / "runs.json", time.time(), None, self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                outer.first_step = state.global_step

            def on_save(self, args, state, control, **kwargs):
                if state.is_world_process_zero:
                    outer.record(state.global_step)

        self.callback = Callback()

    def earlier_runs(self) -> list[dict]:
        """The runs whose checkpoints this one continues. A run that went past the checkpoint resumed from (an
        older one was chosen) counts pro rata, up to that checkpoint."""
        start = self.first_step or 0
        runs = json.loads(self.path.read_text()) if self.path.exists() else []
        earlier = []
        for run in runs:
            if run["from_step"] >= start:  # this run's own record, or one it replaces
                continue
            if run["to_step"] > start:
                share = (start - run["from_step"]) / (run["to_step"] - run["from_step"])
                run = dict(run, to_step=start, seconds=round(run["seconds"] * share, 1))
            earlier.append(run)
        return earlier

    def record(self, step: int) -> list[dict]:
        """This run up to `step`, after the earlier runs it continues; written when the folder exists."""
        runs = self.earlier_runs() + [dict(from_step=self.first_step or 0, to_step=step,
                                           seconds=round(time.time() - self.started, 1))]  # fmt: skip
        if self.path.parent.is_dir():
            self.path.write_text(json.dumps(runs, indent=2))
        return runs


def build_model_and_processor(options: TrainOptions):
    from .recipes import build_model, build_processor, text_size
    from .vqa_tokenizer import build_vqa_tokenizer

    defaults = TrainOptions(family=options.family, output=options.output)
    sized = (options.text_width, options.text_layers) != (defaults.text_width, defaults.text_layers)
    if options.init_from and sized:
        raise ValueError("--text-width and --text-layers size a new model; --from keeps its checkpoint's size")
    if options.init_from:
        from .evaluate import load_checkpoint

        model, processor, family = load_checkpoint(options.init_from)
        if family != options.family:
            raise ValueError(f"{options.init_from} is a {family} checkpoint, not {options.family}")
        return start_positions(model, processor, options), processor
    tokenizer = build_vqa_tokenizer(options.family)
    model = build_model(options.family, tokenizer, options.seed, text_size(options.text_width, options.text_layers))
    if hasattr(model.model, "gated_cross_attn_layers"):
        # Flamingo closes its gates (alpha = 0) to keep a pretrained language model intact at the start. From
        # scratch there is nothing to keep, and closed gates stall learning: the cross-attention gets no gradient
        # while tanh(alpha) is 0, and alpha none that points anywhere while the cross-attention is random.
        with torch.no_grad():
            for block in model.model.gated_cross_attn_layers:
                block.alpha_cross_attn.fill_(options.gate_init)
                block.alpha_dense.fill_(options.gate_init)
    processor = build_processor(options.family, tokenizer)
    return start_positions(model, processor, options), processor


def start_positions(model, processor, options: TrainOptions):
    """With --positions-as-places, the ViT's learned positions (a new model's, or with --from the checkpoint's,
    replaced) set to its patches' places; the model as it was otherwise."""
    from .recipes import recipe

    family = recipe(options.family)
    if options.positions_as_places and hasattr(family, "start_positions_as_places"):
        family.start_positions_as_places(model, processor.image_processor)
    return model


def train(options: TrainOptions) -> dict:
    """Train, save the checkpoint (model, processor, tokenizer, training_log.json) to `options.output`."""
    from transformers import Trainer

    from .recipes import recipe

    recipe(options.family)  # an unknown family fails here, before any work
    # A fine-tune keeps the log of the checkpoint it started from (read now: the output may be the same folder).
    earlier = Path(options.init_from or "") / "training_log.json"
    started_from = json.loads(earlier.read_text()) if options.init_from and earlier.exists() else None
    stage_log = Path(options.init_from or "", VISION_LOG)
    stage = stage_log.read_text() if options.init_from and stage_log.exists() else None
    torch.manual_seed(options.seed)
    model, processor = build_model_and_processor(options)
    multi_image = processor.max_images_per_prompt != 1
    kinds = kinds_for(multi_image, options.kinds)  # a kind this family cannot be asked fails here
    trainable = apply_freezing(model, options.freeze)
    check_vision_learning_rate(model, options)
    if options.lora:
        model = add_lora(model, options.lora_rank)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(f"{options.family}: {trainable / 1e6:.2f}M of {total / 1e6:.2f}M parameters train", flush=True)

    output = Path(options.output)
    curve = HeldOutCurve(processor, options.eval_every, options.eval_examples, multi_image, kinds)
    # Unless checkpoints are saved or resumed from, the Trainer's own files go to a scratch folder, removed after.
    scratch = tempfile.mkdtemp(prefix="vlm-patterns-trainer-")
    args = training_arguments(options, output, scratch)
    if args.output_dir != scratch:
        check_resumed_options(Path(args.output_dir), options)
    stream = SyntheticStream(options.seed, multi_image, kinds, batch_size=args.train_batch_size)
    timing = TrainingTime(Path(args.output_dir))
    trainer = with_vision_rate(Trainer, options.vision_learning_rate)(
        model=model,
        args=args,
        train_dataset=stream,
        data_collator=VQACollator(processor),
        callbacks=[curve.callback, ResumeStream(stream).callback, timing.callback],
    )
    try:
        trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
        runs = timing.record(trainer.state.global_step)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not trainer.is_world_process_zero():
        return {}
    model = trainer.model
    if options.lora:
        model.save_pretrained(output / "adapter")
        portable_adapter_config(output / "adapter", options.init_from)
        model = model.merge_and_unload()
    model.save_pretrained(output)
    processor.save_pretrained(output)
    if options.without_code:
        strip_code(output)
    if args.push_to_hub:
        repo_id = args.hub_model_id or output.name
        model.push_to_hub(repo_id, private=args.hub_private_repo)
        processor.push_to_hub(repo_id, private=args.hub_private_repo)
    recorded = portable_options(options)
    recorded["trainer_args"] = [Path(a).name if Path(a).is_absolute() else a for a in options.trainer_args]
    log = dict(
        options=recorded,
        seconds=round(sum(run["seconds"] for run in runs), 1),
        runs=runs,
        trainable_parameters=trainable,
        parameters=total,
        held_out_curve=HeldOutCurve.points(trainer.state.log_history),
        loss_curve=[dict(step=e["step"], loss=e["loss"]) for e in trainer.state.log_history if "loss" in e],
    )
    if started_from:
        log["started_from"] = started_from
    (output / "training_log.json").write_text(json.dumps(log, indent=2))
    if stage is not None:  # the encoder's own stage stays on record in every checkpoint trained on from it
        (output / VISION_LOG).write_text(stage)
    return log


# What a resumed run may change: how it is watched and where it lands, not what it trains.
RESUMABLE_CHANGES = frozenset({"resume", "report_to", "eval_every", "eval_examples", "trainer_args", "output",
                               "without_code"})  # fmt: skip


def check_resumed_options(folder: Path, options: TrainOptions) -> None:
    """A checkpoint's optimizer state and schedule belong to the options its run started with: `--resume` with
    others would go on silently as a different run. The options are kept beside the checkpoints (`options.json`)
    and a resumed run must match them."""
    recorded = json.loads(json.dumps(asdict(options)))  # tuples as the JSON lists they are read back as
    if recorded["init_from"]:
        recorded["init_from"] = str(Path(recorded["init_from"]).resolve())  # the same folder, however it is named
    path = folder / "options.json"
    if options.resume and path.exists():
        # An option newer than the run's record was its default when the run started.
        started = json.loads(json.dumps(asdict(TrainOptions(family=options.family, output=options.output))))
        started.update(json.loads(path.read_text()))
        changed = [k for k in recorded if k not in RESUMABLE_CHANGES and started[k] != recorded[k]]
        if changed:
            differences = ", ".join(f"{k} {recorded[k]!r} (the run's: {started[k]!r})" for k in changed)
            raise ValueError(f"--resume continues the run in {folder} with the options it started with; these "
                             f"differ: {differences}. Give the same options, or another --output to start afresh")  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(recorded, indent=2))


def portable_options(options) -> dict:
    """The options as a dict for a log that gets shipped: folders given as absolute paths by their name only."""
    recorded = asdict(options)
    for key in ("output", "init_from"):
        if recorded[key] and Path(recorded[key]).is_absolute():
            recorded[key] = Path(recorded[key]).name
    return recorded


def portable_adapter_config(folder: Path, base: str | None) -> None:
    """peft records the base model as it was loaded, here a local folder's absolute path; an adapter that is
    shared names its base by the folder's name (or the Hub id it was given as) instead."""
    path = folder / "adapter_config.json"
    config = json.loads(path.read_text())
    recorded = config.get("base_model_name_or_path")
    if recorded and Path(recorded).is_absolute():
        config["base_model_name_or_path"] = Path(recorded).name
    elif base and Path(base).is_absolute():
        config["base_model_name_or_path"] = Path(base).name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def training_arguments(options: TrainOptions, output: Path, scratch: str | None = None):
    """`TrainingArguments` from the recipe, with any flag of `options.trainer_args` (transformers' own spelling,
    read by `HfArgumentParser`) on top. The recipe's own options (--steps, --learning-rate, ...) set the fields
    they name; the Trainer's files (checkpoints, logs) go to OUTPUT/trainer when checkpoints are saved or resumed
    from, and to `scratch` otherwise (transformers' own default would be ./trainer_output)."""
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser(TrainingArguments)
    for action in parser._actions:  # only what was given on the command line overrides the recipe
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(list(options.trainer_args)))
    recipe = dict(
        output_dir=None,
        max_steps=options.steps,
        per_device_train_batch_size=options.batch_size,
        learning_rate=options.learning_rate,
        warmup_steps=options.warmup_steps,
        lr_scheduler_type="cosine",
        weight_decay=options.weight_decay,
        logging_steps=max(1, min(50, options.steps // 20)),
        save_strategy="no",
        report_to=options.report_to,
        remove_unused_columns=False,
        # Drawing and processing examples takes a quarter of a CPU step; beside a GPU, worker processes draw them
        # in parallel. On a CPU they compete with the step's own threads: one worker on 2 cores cut 1.8 steps/s
        # to 1.4.
        dataloader_num_workers=min(8, (os.cpu_count() or 1) - 1) if torch.cuda.is_available() else 0,
        dataloader_pin_memory=torch.cuda.is_available(),
        ignore_data_skip=True,  # the stream starts at the resumed step itself (`ResumeStream`)
        seed=options.seed,
        disable_tqdm=False,
    )
    merged = {**recipe, **given}
    if options.resume:
        if merged.get("resume_from_checkpoint"):
            raise ValueError("give --resume or --resume_from_checkpoint, not both")
        merged["resume_from_checkpoint"] = latest_checkpoint(Path(merged["output_dir"] or output / "trainer"))
    if merged["output_dir"] is None and (merged["save_strategy"] != "no" or merged.get("resume_from_checkpoint")):
        merged["output_dir"] = str(output / "trainer")
    elif merged["output_dir"] is None:
        merged["output_dir"] = scratch
    return TrainingArguments(**merged)


def latest_checkpoint(folder: Path) -> str:
    """The Trainer checkpoint of the most steps in `folder` (what `--resume` continues from)."""
    from transformers.trainer_utils import get_last_checkpoint

    found = get_last_checkpoint(str(folder)) if folder.is_dir() else None
    if found is None:
        raise FileNotFoundError(f"--resume: no checkpoint-* folder in {folder}; save them with --save_strategy steps "
                                "--save_steps N")  # fmt: skip
    return found


def strip_code(folder: Path) -> None:
    """Drop the model and processor code copied for `trust_remote_code` (and the `auto_map` pointing at it): a
    checkpoint shipped inside this repository loads with the repository's own code, which never goes stale."""
    for path in folder.glob("*.py"):
        path.unlink()
    for name in ("config.json", "processor_config.json", "tokenizer_config.json"):
        path = folder / name
        if path.exists():
            data = json.loads(path.read_text())
            if data.pop("auto_map", None) is not None:
                path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_patterns.training.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    add_arguments(parser)
    args, trainer_args = parser.parse_known_args(argv)
    log = train(options_from(args, trainer_args))
    if log:
        final = log["held_out_curve"][-1]["accuracy"] if log["held_out_curve"] else math.nan
        print(f"trained in {log['seconds']:.0f} s; held-out accuracy {100 * final:.1f}%")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
