"""Reading public checkpoints shard by shard, writing ours shard by shard, and never leaving half an output.

Peak memory during a conversion is about one source tensor plus one output shard: source shards are
memory-mapped (safetensors, or torch's mmap for `.bin`), and output shards are flushed as they fill.
"""

import contextlib
import ctypes
import json
import os
import pickle
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

# transformers' and huggingface_hub's default shard size, "5GB" (decimal gigabytes).
DEFAULT_SHARD_BYTES = 5_000_000_000

# The files a conversion reads from a Hub repository (weights, configs, tokenizer and processor files).
SOURCE_PATTERNS = ["*.json", "*.safetensors", "*.bin", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


def resolve_source(source: str | os.PathLike, allow_patterns: list[str] | None = None) -> Path:
    """A local folder as is, or a Hub repository id downloaded (or found in the cache) as a snapshot."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{source} is a file; pass the folder that holds config.json and the weights")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        return Path(snapshot_download(str(source), allow_patterns=allow_patterns or SOURCE_PATTERNS))
    except HFValidationError as e:
        raise FileNotFoundError(f"{source} is neither a local folder nor a valid Hub repository id") from e
    except Exception as e:  # offline, unknown repository, gated repository, ...
        raise OSError(f"Could not download {source} from the Hugging Face Hub: {e}") from e


def read_json(path: Path) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def weight_files(folder: Path) -> list[Path]:
    """The weight shards of a checkpoint folder, in index order: safetensors preferred, else PyTorch `.bin`."""
    for index_name, single_name in [
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ]:
        if (folder / index_name).exists():
            shards = dict.fromkeys(read_json(folder / index_name)["weight_map"].values())
            return [folder / shard for shard in shards]
        if (folder / single_name).exists():
            return [folder / single_name]
    loose = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not loose:
        raise FileNotFoundError(f"No weights (*.safetensors or *.bin) in {folder}")
    return loose


def checkpoint_keys(folder: Path) -> list[str]:
    """All tensor names of a checkpoint, read from its index or headers, without loading tensors."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index_name).exists():
            return list(read_json(folder / index_name)["weight_map"])
    keys = []
    for path in weight_files(folder):
        if path.suffix == ".safetensors":
            with named_errors(path), safe_open(path, framework="pt") as f:
                keys.extend(f.keys())
        else:
            keys.extend(key for key, _ in iter_shard(path))
    return keys


# Where a source folder keeps its image and video processor settings: transformers 5.x nests them in
# processor_config.json; the Hub's historical folders have one file each.
LEGACY_PROCESSOR_FILES = {
    "image_processor": "preprocessor_config.json",
    "video_processor": "video_preprocessor_config.json",
}


def source_processor_config(folder: Path, key: str = "image_processor", required: bool = True) -> dict | None:
    """The source's image (or video) processor settings, from processor_config.json (as transformers 5.x saves
    them) or from the historical preprocessor_config.json / video_preprocessor_config.json."""
    if (folder / "processor_config.json").exists():
        nested = read_json(folder / "processor_config.json").get(key)
        if nested:
            return nested
    legacy = folder / LEGACY_PROCESSOR_FILES[key]
    if legacy.exists():
        return read_json(legacy)
    if required:
        raise FileNotFoundError(
            f"No {key.replace('_', ' ')} settings in {folder} (processor_config.json or {legacy.name})"
        )
    return None


class CorruptCheckpointError(ValueError):
    """A weight file that cannot be read: truncated, corrupt, or not a checkpoint at all."""


@contextlib.contextmanager
def named_errors(path: Path) -> Iterator[None]:
    """Re-raise a reader's error (safetensors' or torch's, which name no file) as one that names the file."""
    try:
        yield
    except (SafetensorError, pickle.UnpicklingError, EOFError, RuntimeError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise CorruptCheckpointError(f"{path} is not a readable weight file (truncated or corrupt?): {e}") from e


def iter_shard(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of one shard, loaded one tensor at a time."""
    if path.suffix == ".safetensors":
        with named_errors(path), safe_open(path, framework="pt") as f:
            for key in f.keys():
                with named_errors(path):
                    tensor = f.get_tensor(key)
                yield key, tensor
    else:
        with named_errors(path):
            try:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError:  # files in torch's legacy (pre-zip) format cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
        for key in list(state):
            yield key, state.pop(key)


class ShardWriter:
    """Accumulates tensors and writes `model-XXXXX-of-YYYYY.safetensors` shards plus their index."""

    def __init__(self, folder: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES):
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.total_bytes = 0

    def add(self, key: str, tensor: torch.Tensor) -> None:
        if key in self.pending or any(key in shard for shard in self.shards):
            raise ValueError(f"Two source tensors map to the same key {key}")
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_shard_bytes:
            self.flush()
        self.pending[key] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def flush(self) -> None:
        if not self.pending:
            return
        save_file(self.pending, self.folder / f"shard-{len(self.shards):05d}.tmp", metadata={"format": "pt"})
        self.shards.append(list(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish(self) -> list[str]:
        """Name the shards by their final count and write the index; returns the shard file names."""
        self.flush()
        count = len(self.shards)
        names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        for i, name in enumerate(names):
            os.replace(self.folder / f"shard-{i:05d}.tmp", self.folder / name)
        if count > 1:
            weight_map = {key: name for name, keys in zip(names, self.shards, strict=True) for key in keys}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            with open(self.folder / "model.safetensors.index.json", "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
        return names


# Every output this project writes carries this file, so that `overwrite` replaces only what it wrote itself.
OUTPUT_MARKER = ".vlm-patterns-output.json"
OUR_MODEL_TYPES = ("llava_pattern", "qwen2_vl_pattern", "fuyu_pattern", "flamingo_pattern")


def is_our_output(folder: Path) -> bool:
    """A folder this project wrote: it has our marker, or (outputs older than the marker) an our-family config."""
    if (folder / OUTPUT_MARKER).is_file():
        return True
    try:
        return read_json(folder / "config.json").get("model_type") in OUR_MODEL_TYPES
    except (OSError, ValueError):
        return False


def check_output(target: str | os.PathLike, overwrite: bool, sources: list[str | os.PathLike] = ()) -> Path:
    """Refuse, before any work, an output that would lose data: one that is, holds or lies inside a source, an
    existing file, or (with `overwrite`) a folder this project did not write. Returns the resolved target."""
    target = Path(target).resolve()
    for source in sources:
        source_path = Path(source)
        if not source_path.exists():
            continue  # a Hub id: it is downloaded into the cache, which an output folder never is
        source_path = source_path.resolve()
        if target == source_path or source_path.is_relative_to(target) or target.is_relative_to(source_path):
            raise ValueError(
                f"The output {target} is, contains or lies inside the source {source_path}; writing it would "
                "replace the source. Choose an output folder outside the source"
            )
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"The output {target} is an existing file; choose a folder path")
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} already exists; choose another output folder or pass overwrite")
        if any(target.iterdir()) and not is_our_output(target):
            raise FileExistsError(
                f"{target} holds files that are not an output of vlm-patterns; overwrite replaces only a previous "
                "conversion. Remove the folder yourself if you mean to, or choose another output folder"
            )
    return target


def _staging_owner_alive(staging: Path) -> bool:
    """Staging folders are named .<target>.<pid>.<random>.partial: is the process that made this one running?"""
    try:
        pid = int(staging.name.split(".")[-3])
    except (IndexError, ValueError):
        return False
    try:
        os.kill(pid, 0)  # PermissionError: alive, another user's
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def remove_stale_staging(target: Path) -> list[Path]:
    """Delete what killed conversions of `target` left beside it (their staging folders); returns what went.

    Where a replacement by two renames was interrupted between them (systems without an atomic swap), the old
    output waits, whole, under an `.old.partial` name: it is put back first."""
    if not target.exists():
        for aside in target.parent.glob(f".{target.name}.*.old.partial"):
            if aside.is_dir() and is_our_output(aside):
                os.replace(aside, target)
                break
    stale = [
        path
        for path in target.parent.glob(f".{target.name}.*.partial")
        if path.is_dir() and not _staging_owner_alive(path)
    ]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    return result == 0


def replace_folder(new: Path, target: Path) -> None:
    """Put the complete folder `new` at `target`. Where the system can swap two paths atomically, `target` is at
    every instant the complete old or the complete new folder; elsewhere the old one is first renamed aside (never
    deleted in place), so an interruption leaves both whole on disk."""
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new)  # now the old output, under the staging name: stale staging if this is interrupted
        return
    aside = new.with_name(new.name.replace(".partial", ".old.partial"))
    os.replace(target, aside)
    os.replace(new, target)
    shutil.rmtree(aside)


@contextlib.contextmanager
def atomic_output_dir(
    target: str | os.PathLike, overwrite: bool = False, sources: list[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield a staging folder beside `target` that becomes `target` only if the block succeeds.

    Checked first (see `check_output`): the target is no source and no file, and `overwrite` replaces only an
    output of this project. Staging left by killed runs for the same target is removed. The replacement is by
    renames, never by deleting the old output in place.
    """
    target = check_output(target, overwrite, sources)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.{os.getpid()}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
        with open(staging / OUTPUT_MARKER, "w", encoding="utf-8") as f:
            json.dump({"written_by": "vlm-patterns"}, f)
        check_output(target, overwrite, sources)  # again: something may have appeared there meanwhile
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
