"""Refresh the checkpoints shipped in training/checkpoints: the same weights, re-saved with the code that
`trust_remote_code` loads (modeling and processing files, `auto_map`) and with the family's current processor
(chat template included).

Run after changing anything in `modeling/` or `processing/`: `python -m vlm_patterns.training.ship` (a test compares the shipped
code with the repository's and says so when it is stale). The weights are checked to be unchanged, bit for bit.
"""

import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from .recipes import build_processor, recipe_names
from .train import VISION_LOG

CHECKPOINTS = Path(__file__).resolve().parent / "checkpoints"
# Written by training, evaluation and the vision encoder's stage, not by save_pretrained.
KEPT_FILES = ("training_log.json", "evaluation.json", VISION_LOG)


def refresh(folder: str | Path, family: str) -> Path:
    """Re-save one shipped checkpoint in place (through a staging folder swapped in at the end)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = Path(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)
    # The recipe's processor around the shipped tokenizer: today's chat template and processor settings.
    processor = build_processor(family, AutoProcessor.from_pretrained(folder).tokenizer)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        for name in KEPT_FILES:
            if (folder / name).exists():
                shutil.copy2(folder / name, staging / name)
        before, after = load_file(folder / "model.safetensors"), load_file(staging / "model.safetensors")
        if before.keys() != after.keys() or any(not torch.equal(before[k], after[k]) for k in before):
            raise RuntimeError(f"Re-saving {folder} changed its weights; nothing was replaced")
        old = folder.with_name(f".{folder.name}.old")
        folder.rename(old)
        staging.rename(folder)
        shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return folder


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_patterns.training.ship", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("families", nargs="*", metavar="FAMILY",
                        help=f"which shipped checkpoints to refresh, of {', '.join(recipe_names())} (default: all)")  # fmt: skip
    args = parser.parse_args(argv)
    unknown = sorted(set(args.families) - set(recipe_names()))
    if unknown:
        parser.error(f"unknown families {unknown}; choose from {', '.join(recipe_names())}")
    for family in args.families or recipe_names():
        print(f"refreshed {refresh(CHECKPOINTS / family, family)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
