"""Benchmark a family against the transformers reference and print a markdown table and JSON.

python benchmarks/run.py llava                                  # CPU preset, 2 threads
python benchmarks/run.py llava --preset llava-1.5-7b --device cuda --dtype bfloat16
python benchmarks/run.py llava --readme README.md               # also refresh the README's table
python benchmarks/run.py llava --preset embedded                # the shipped checkpoint: fast path vs generate
bash benchmarks/gpu.sh                                          # every GPU preset in one go (H100/H200)
"""

import argparse
import importlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # harness.py and the family modules

from harness import write_readme_section  # noqa: E402

from vlm_patterns.families import FAMILIES  # noqa: E402  (each family's benchmark is benchmarks/<family>.py)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("family", choices=sorted(FAMILIES), help="the pattern to benchmark against transformers")
    parser.add_argument(
        "--preset",
        default="cpu",
        help="model shapes; see PRESETS in benchmarks/<family>.py, or `embedded`: the shipped checkpoint, fast path "
        "against transformers' generate (default: %(default)s)",
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: %(default)s)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="(default: %(default)s)")
    parser.add_argument(
        "--threads", type=int, default=2, help="CPU threads (the processor always uses these) (default: %(default)s)"
    )
    parser.add_argument(
        "--new-tokens", type=int, default=64, help="decoded tokens per generate call (default: %(default)s)"
    )
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per measurement, the median kept (default: %(default)s)"
    )
    parser.add_argument("--json", type=Path, help="also write the report as JSON here")
    parser.add_argument("--readme", type=Path, help="replace this family's table in the README")
    parser.add_argument("--processor-only", action="store_true", help="time the image processors only")
    parser.add_argument("--measure-memory", choices=["ours", "reference"], help=argparse.SUPPRESS)  # child process
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    module = importlib.import_module(args.family)
    if args.preset == "embedded":  # the shipped checkpoint, fast path against transformers' generate
        from harness import run_embedded

        report = run_embedded(args.family, args.new_tokens, args.repeats)
        print(report.markdown())
        print(report.to_json())
        if args.json:
            args.json.write_text(report.to_json())
        if args.readme:
            write_readme_section(args.readme, f"{args.family}:embedded:cpu", report.markdown())
        return 0
    if args.preset not in module.PRESETS:
        parser.error(f"unknown preset {args.preset!r}; choose from {sorted(module.PRESETS)}")
    if args.measure_memory:
        print(module.measure_memory(args.measure_memory, args.preset, args.device, DTYPES[args.dtype], args.new_tokens))
        return 0
    if args.processor_only:
        report = module.run_processor(args.repeats)
    else:
        report = module.run(args.preset, args.device, DTYPES[args.dtype], args.new_tokens, args.repeats)
    table = report.markdown()
    print(table)
    print(report.to_json())
    if args.json:
        args.json.write_text(report.to_json())
    if args.readme:
        key = f"{args.family}:processor" if args.processor_only else f"{args.family}:{args.preset}:{args.device}"
        write_readme_section(args.readme, key, table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
