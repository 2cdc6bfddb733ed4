"""Reading public checkpoints shard by shard, writing ours shard by shard, and never leaving half an output.

Peak memory during a conversion is about one source tensor plus one output shard: source shards are
memory-mapped (safetensors, or torch's mmap for `.bin`), and output shards are flushed as they fill.
"""

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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
            with safe_open(path, framework="pt") as f:
                keys.extend(f.keys())
        else:
            keys.extend(key for key, _ in iter_shard(path))
    return keys


def iter_shard(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) pairs of one shard, loaded one tensor at a time."""
    if path.suffix == ".safetensors":
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                yield key, f.get_tensor(key)
    else:
        try:
            state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError:  # files in torch's legacy (pre-zip) format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
        for key in list(state):
            yield key, state.pop(key)


class ShardWriter:
    """Accumulates tensors and writes `model-XXXXX-of-YYYYY.safetensors` shards plus their index."""

    def __init__(self, folder: Path, max_shard_bytes: int = 5 * 1024**3):
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


@contextlib.contextmanager
def atomic_output_dir(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target` that becomes `target` only if the block succeeds."""
    target = Path(target).resolve()
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; choose another output folder or pass overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)
