"""The `vlm-patterns` command line: convert, export, verify, generate, tiny, demo, train, evaluate, compare, space.

Which families and source layouts exist comes from the registry (families.py); each command imports what it
needs when it runs, so `vlm-patterns --help` answers without torch.
"""

import argparse
import sys
from pathlib import Path

from .families import FAMILIES, SOURCE_LAYOUTS

EXPORTABLE = sorted(name for name, (_, layout) in SOURCE_LAYOUTS.items() if layout.exporter)


DTYPES = ("bfloat16", "float16", "float32")  # torch dtype names


def torch_dtype(name: str | None):
    import torch

    return getattr(torch, name) if name else None


def shard_size(text: str) -> int:
    """Bytes, read as transformers and huggingface_hub read a shard size: "5GB" is 5 * 10^9, "2GiB" 2 * 2^30,
    "500MB" 5 * 10^8; a plain number is bytes."""
    from transformers.utils.hub import convert_file_size_to_int

    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        size = convert_file_size_to_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: write a number and a unit, e.g. 5GB or 2GiB"
        ) from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive size")
    return size


def cmd_convert(args) -> int:
    _, layout = SOURCE_LAYOUTS[args.family]
    kwargs = dict(dtype=torch_dtype(args.dtype), overwrite=args.overwrite, max_shard_bytes=args.max_shard_size)
    if args.vision_tower:
        if args.family != "llava":
            raise ValueError("--vision-tower is for the original LLaVA layout only")
        kwargs["vision_tower"] = args.vision_tower
    if args.family == "openflamingo":
        if not (args.vision and args.language):
            raise ValueError("openflamingo needs --vision (its CLIP tower) and --language (its base language model)")
        kwargs.update(vision=args.vision, language=args.language, tokenizer=args.tokenizer)
    elif args.vision or args.language or args.tokenizer:
        raise ValueError("--vision, --language and --tokenizer are for openflamingo only")
    output = layout.convert(args.source, args.output, **kwargs)
    print(f"Converted {args.source} -> {output}")
    if args.verify:
        report = layout.verify(args.source, output, device=args.device, **source_options(args))
        print(report.summary())
        if not report.passed:
            return 1
    if args.push_to_hub:
        from .publishing import push_folder

        url = push_folder(output, args.push_to_hub, layout.name, source=str(args.source), private=args.private)
        print(f"Pushed to {url}")
    return 0


def cmd_export(args) -> int:
    output = SOURCE_LAYOUTS[args.family][1].export(args.ours, args.output, overwrite=args.overwrite)
    print(f"Exported {args.ours} -> {output} (transformers' layout)")
    return 0


def source_options(args) -> dict:
    """The extra sources a layout's verification reads (the original LLaVA's CLIP tower; OpenFlamingo's bases)."""
    if args.family == "openflamingo":
        return dict(vision=args.vision, language=args.language)
    return dict(vision_tower=args.vision_tower) if args.vision_tower else {}


def cmd_verify(args) -> int:
    layout = SOURCE_LAYOUTS[args.family][1]
    report = layout.verify(
        args.source, args.converted, device=args.device, dtype=torch_dtype(args.dtype), **source_options(args)
    )
    print(report.summary())
    return 0 if report.passed else 1


def cmd_generate(args) -> int:
    from .inference import main

    return main(args)


def cmd_tiny(args) -> int:
    SOURCE_LAYOUTS[args.family][1].build_tiny(args.output, seed=args.seed)
    what = "checkpoint.pt, clip/ and llama/" if args.family == "openflamingo" else "a checkpoint"
    print(f"Wrote a tiny random {args.family} ({what}) in the public layout to {args.output}")
    return 0


def cmd_demo(args) -> int:
    """Build a tiny public-layout LLaVA, convert it with parity verification, and answer a prompt with it."""
    from .conversion.tiny import example_image
    from .inference import generate, load

    layout = FAMILIES["llava"].layout("llava")

    workdir = Path(args.workdir)
    source, converted = workdir / "llava-hf-tiny", workdir / "llava-tiny"
    if not source.exists():
        layout.build_tiny(source)
        print(f"1. built a tiny random LLaVA in the llava-hf layout: {source}")
    if not converted.exists():
        layout.convert(source, converted)
        print(f"2. converted it to ours: {converted}")
    report = layout.verify(source, converted)
    print("3. parity with transformers' LlavaForConditionalGeneration:\n" + report.summary())
    image_path = workdir / "example.png"
    example_image(320, 240, seed=1).save(image_path)
    model, processor = load(converted)
    print(
        f"4. USER: <{image_path.name}> {args.prompt}\n   ASSISTANT (random weights, so the words are noise):", end=" "
    )
    generate(model, processor, [str(image_path)], args.prompt, max_new_tokens=args.max_new_tokens, stream=sys.stdout)
    print()
    return 0 if report.passed else 1


def cmd_train(args) -> int:
    from .training.options import options_from
    from .training.train import train

    log = train(options_from(args, args.trainer_args))
    if log and log["held_out_curve"]:
        print(
            f"Trained in {log['seconds']:.0f} s; held-out accuracy {100 * log['held_out_curve'][-1]['accuracy']:.1f}%"
        )
    return 0


def cmd_pretrain_vision(args) -> int:
    from .training.options import vision_options_from
    from .training.pretrain_vision import pretrain_vision

    log = pretrain_vision(vision_options_from(args))
    last = log["held_out_curve"][-1]
    print(f"Pre-trained in {log['seconds']:.0f} s; held-out {100 * last['accuracy']:.1f}% "
          f"(shape {100 * last['shape_accuracy']:.1f}%); next: vlm-patterns train {args.family} --from {args.output}")  # fmt: skip
    return 0


def cmd_evaluate(args) -> int:
    from .training.evaluate import evaluate

    result = evaluate(args.checkpoint, num_examples=args.examples, seed=args.seed, batch_size=args.batch_size,
                      kinds=tuple(k.strip() for k in args.kinds.split(",") if k.strip()) or None)  # fmt: skip
    print(result.markdown())
    if args.json:
        import dataclasses
        import json

        Path(args.json).write_text(json.dumps(dataclasses.asdict(result), indent=2))
    return 0


def cmd_compare(args) -> int:
    from .publishing import write_readme_section
    from .training.evaluate import compare

    table = compare(args.checkpoints, args.output, num_examples=args.examples, seed=args.seed)
    print(table)
    print(f"Wrote comparison.md, comparison.json and comparison.png to {args.output}")
    if args.readme:
        write_readme_section(args.readme, "compare", table)
    return 0


def cmd_space(args) -> int:
    from .publishing import assemble_space

    print(f"Space folder written to {assemble_space(args.output)}")
    return 0


def cmd_serve(args) -> int:
    try:
        from .serving import serve
    except ImportError as e:
        raise ImportError(f'{e}; the server needs the serve extra: pip install "vlm-patterns[serve]"') from e

    serve(args.folders, host=args.host, port=args.port, device=args.device, dtype=args.dtype,
          max_in_flight=args.max_in_flight, log_level=args.log_level,
          step_mode="compiled" if args.decode == "compiled" else None)  # fmt: skip
    return 0


def add_openflamingo_sources(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vision", help="openflamingo: its CLIP tower in transformers' layout (e.g. openai/clip-vit-large-patch14)"
    )
    parser.add_argument("--language", help="openflamingo: its base language model (a Llama folder or Hub id)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-patterns", description="The VLM architecture patterns, on Hugging Face.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert", help="convert a public checkpoint (Hub id or folder) into ours")
    p.add_argument("family", choices=sorted(SOURCE_LAYOUTS), metavar="LAYOUT",
                   help=f"the source's layout: {', '.join(sorted(SOURCE_LAYOUTS))}")  # fmt: skip
    p.add_argument(
        "source", help="Hub repository id or local folder in the public layout (openflamingo: checkpoint.pt)"
    )
    p.add_argument("output", help="folder to create")
    p.add_argument("--verify", action="store_true", help="check parity with transformers' reference afterwards")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating weights (default: keep the checkpoint's)")
    p.add_argument(
        "--vision-tower", help="original LLaVA layout: the CLIP tower (default: the config's mm_vision_tower)"
    )
    add_openflamingo_sources(p)
    p.add_argument("--tokenizer", help="openflamingo: the tokenizer it was trained with (default: --language's)")
    p.add_argument("--push-to-hub", metavar="REPO", help="upload the result, with a model card, to this Hub repository")
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repository")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.add_argument("--max-shard-size", type=shard_size, default="5GB",
                   help="largest output shard, as transformers reads it: 5GB = 5e9 bytes, 2GiB = 2^31 (default: 5GB)")  # fmt: skip
    p.add_argument("--device", default="cpu", help="device for --verify")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("export", help="write our checkpoint in transformers' own layout (for vLLM, SGLang, ...)")
    p.add_argument("family", choices=EXPORTABLE, metavar="LAYOUT", help=f"the layout to write: {', '.join(EXPORTABLE)}")
    p.add_argument("ours", help="a checkpoint folder of ours (what convert wrote)")
    p.add_argument("output", help="folder to create, in the public layout")
    p.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("verify", help="parity of a converted checkpoint with transformers' reference")
    p.add_argument("family", choices=sorted(SOURCE_LAYOUTS), metavar="LAYOUT",
                   help=f"the layout: {', '.join(sorted(SOURCE_LAYOUTS))}")  # fmt: skip
    p.add_argument("source", help="the public checkpoint it was converted from (Hub id or folder)")
    p.add_argument("converted", help="the converted folder")
    p.add_argument("--device", default="cpu", help="where both models run: cpu, cuda, cuda:1 (default: %(default)s)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="precision of both models; float32 compares exactly (default: %(default)s)")  # fmt: skip
    p.add_argument("--vision-tower", help="original LLaVA layout: the CLIP tower (default: the config's)")
    add_openflamingo_sources(p)
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("generate", help="answer a prompt about images with a checkpoint")
    p.add_argument("model", help="checkpoint folder or Hub id")
    p.add_argument("--image", action="append", help="image file (repeat for several)")
    p.add_argument("--prompt", required=True, help="the question; the checkpoint's chat template wraps it")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default: %(default)s)")
    p.add_argument(
        "--top-p", type=float, default=1.0, help="nucleus sampling, with --temperature (default: %(default)s)"
    )
    p.add_argument("--device", default="cpu", help="where the model runs: cpu, cuda, cuda:1 (default: %(default)s)")
    p.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto",
                   help="weights' precision; auto keeps the checkpoint's (default: %(default)s)")  # fmt: skip
    p.add_argument("--raw-prompt", action="store_true", help="use the prompt as is, without the chat template")
    p.add_argument("--trust-remote-code", action="store_true", help="load the model code from the checkpoint")
    p.add_argument("--decode", choices=["static", "compiled", "transformers"], default="static",
                   help="the static decode path (same greedy tokens, less overhead per step, a CUDA graph on GPUs), "
                   "the same with its step compiled by torch.compile (fastest on CPU after tens of seconds of "
                   "compilation), or transformers' own generate loop (default: %(default)s)")  # fmt: skip
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("tiny", help="write a tiny random checkpoint in a public layout (for tests and demos)")
    p.add_argument("family", choices=sorted(SOURCE_LAYOUTS), metavar="LAYOUT",
                   help=f"the layout: {', '.join(sorted(SOURCE_LAYOUTS))}")  # fmt: skip
    p.add_argument("output", help="folder to create")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    p.set_defaults(func=cmd_tiny)

    from .training.options import add_arguments, add_vision_arguments

    p = sub.add_parser("train", help="train a family on the synthetic visual QA task (from scratch, or --from)")
    add_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("pretrain-vision", help="train a family's vision encoder alone first, on single objects")
    add_vision_arguments(p)
    p.set_defaults(func=cmd_pretrain_vision)

    p = sub.add_parser("evaluate", help="held-out accuracy per question kind, visual tokens, latency")
    p.add_argument("checkpoint", help="a checkpoint folder trained on the synthetic task")
    p.add_argument("--examples", type=int, default=3000, help="held-out questions (default: %(default)s)")
    p.add_argument(
        "--seed", type=int, default=1, help="held-out draw; training never uses held-out seeds (default: %(default)s)"
    )
    p.add_argument("--batch-size", type=int, default=32, help="questions per forward pass (default: %(default)s)")
    p.add_argument("--kinds", default="", metavar="KIND[,KIND...]",
                   help="only these question kinds (default: every kind the family reads)")  # fmt: skip
    p.add_argument("--json", help="also write the result as JSON here")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="evaluate several checkpoints: a markdown table and a PNG plot")
    p.add_argument("checkpoints", nargs="+", help="checkpoint folders trained on the synthetic task")
    p.add_argument("--output", default="comparison", help="folder for the table and plot (default: %(default)s)")
    p.add_argument("--examples", type=int, default=3000, help="held-out questions each (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1, help="held-out draw (default: %(default)s)")
    p.add_argument("--readme", help="also replace the table between <!-- compare:start/end --> in this file")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("space", help="write a self-contained Hugging Face Space folder (app, packages, checkpoints)")
    p.add_argument("output", help="folder to create (must be new or empty)")
    p.set_defaults(func=cmd_space)

    p = sub.add_parser("serve", help="serve checkpoints behind the OpenAI chat API (/v1/chat/completions)")
    p.add_argument("folders", nargs="*", metavar="FOLDER",
                   help="checkpoint folders of ours, named by folder (default: the four shipped models, by family)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default: %(default)s)")
    p.add_argument(
        "--dtype", default="auto", help="float32, bfloat16, ... or auto: the checkpoint's (default: %(default)s)"
    )
    p.add_argument("--max-in-flight", type=int, default=64,
                   help="chat requests queued or generating at once; more get 429 (default: %(default)s)")  # fmt: skip
    p.add_argument("--decode", choices=["static", "compiled"], default="static",
                   help="static: the static decode path, a CUDA graph on GPUs; compiled: its step compiled by "
                        "torch.compile (CPU: several times faster per token, after 5-30 s of compilation per model "
                        "and length bucket on first use) (default: %(default)s)")  # fmt: skip
    p.add_argument("--log-level", default="warning", help="uvicorn's log level (default: %(default)s)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="build, convert, verify and run a tiny LLaVA, offline")
    p.add_argument("--workdir", default="vlm-patterns-demo", help="where to write (default: %(default)s)")
    p.add_argument("--prompt", default="What is in the image?", help="the question asked (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="most tokens to generate (default: %(default)s)")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "func", None) is not cmd_train:  # only `train` passes flags on (to TrainingArguments)
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    args.trainer_args = extra
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, NotImplementedError, KeyError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
