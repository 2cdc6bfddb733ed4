"""The steps every converter shares: read a source's tensors, processor settings and chat template; build the target
on the meta device; write its weights (cast, checked strictly against the target's tensors, sharded) and the files
beside them (config.json with `auto_map`, the code `trust_remote_code` loads, generation_config.json).

A converter is then: its key map, its config translation and its processor, between `open_source` and
`write_converted`; an exporter, the same in reverse between `open_ours` and `write_exported`.
"""

from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save

from .checkpoint_io import (
    ShardWriter,
    atomic_output_dir,
    check_output,
    iter_shard,
    read_json,
    resolve_source,
    source_processor_config,
    weight_files,
)
from .key_mapping import KeyMap, check_against


def meta_model(model_class: type[PreTrainedModel], config) -> PreTrainedModel:
    """The model's module tree on the meta device: names and shapes, no memory."""
    with torch.device("meta"):
        return model_class(config)


def expected_tensors(model: PreTrainedModel) -> dict[str, torch.Size]:
    """Every tensor a checkpoint of `model` holds: its state dict minus tied copies (saved once, as the source)."""
    state = model.state_dict()
    for tied_target in getattr(model, "all_tied_weights_keys", {}):
        state.pop(tied_target, None)
    return {key: tensor.shape for key, tensor in state.items()}


def write_model_files(model: PreTrainedModel, folder: Path, generation_config: GenerationConfig | None = None) -> None:
    """config.json (architectures, dtype, auto_map), the code files it names, and generation_config.json."""
    model.config.architectures = [type(model).__name__]
    model.register_auto_map()
    custom_object_save(model, folder, config=model.config)
    model.config.save_pretrained(folder)
    generation_config = generation_config or GenerationConfig.from_model_config(model.config)
    generation_config.save_pretrained(folder)


# ----------------------------------------------------------------------------------------------------------
# Reading a source


def open_source(
    source: str | Path, output: str | Path, overwrite: bool, model_type: str, name: str
) -> tuple[Path, dict]:
    """Refuse an unsafe output before any work, fetch the source (a folder or a Hub id) and read its config.json,
    which must be `model_type`'s -> (the source's folder, its config as a dict)."""
    check_output(output, overwrite, [source])
    folder = resolve_source(source)
    hub_config = read_json(folder / "config.json")
    if hub_config.get("model_type") != model_type:
        raise ValueError(f"{source} is not a {name} checkpoint (model_type {hub_config.get('model_type')!r})")
    return folder, hub_config


def source_dtype(dtype: torch.dtype | None, hub_config: dict):
    """The dtype to write: the one asked for, else the source's own (under either of transformers' names)."""
    return dtype or hub_config.get("dtype") or hub_config.get("torch_dtype")


def source_generation_config(folder: Path) -> GenerationConfig | None:
    return GenerationConfig.from_pretrained(folder) if (folder / "generation_config.json").exists() else None


def source_image_config(folder: Path) -> dict:
    return source_processor_config(folder, "image_processor")


def source_chat_template(folder: Path) -> str | None:
    if (folder / "chat_template.jinja").exists():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    for name in ("chat_template.json", "processor_config.json"):
        if (folder / name).exists() and read_json(folder / name).get("chat_template"):
            return read_json(folder / name)["chat_template"]
    return None


def source_tensors(files: list[Path], description: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the source's weight files, shard by shard, with a progress bar."""
    for path in tqdm(files, desc=description, unit="shard"):
        yield from iter_shard(path)


# ----------------------------------------------------------------------------------------------------------
# Writing ours


def cast(items: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype | None) -> Iterator[tuple[str, torch.Tensor]]:
    for key, tensor in items:
        yield key, tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


def write_converted(
    output: str | Path,
    overwrite: bool,
    sources: list[Path],
    tensors: Iterator[tuple[str, torch.Tensor]],
    model: PreTrainedModel,
    processor,
    generation_config: GenerationConfig | None,
    dtype: torch.dtype | None,
    max_shard_bytes: int,
) -> Path:
    """Our checkpoint at `output`, written whole or not at all: the renamed `tensors` (read lazily, shard by
    shard), config.json with the code it names, generation_config.json and the processor's files."""
    with atomic_output_dir(output, overwrite, sources) as staging:
        write_weights(tensors, model, staging, dtype, max_shard_bytes)
        write_model_files(model, staging, generation_config)
        processor.save_pretrained(staging)
    return Path(output)


def open_ours(ours: str | Path, output: str | Path, overwrite: bool) -> Path:
    """Refuse an unsafe output before any work and fetch our checkpoint (a folder or a Hub id) to export."""
    check_output(output, overwrite, [ours])
    return resolve_source(ours)


def write_exported(
    folder: Path,
    output: str | Path,
    overwrite: bool,
    key_map: KeyMap,
    max_shard_bytes: int,
    write_files: Callable[[Path], None],
) -> Path:
    """Our checkpoint in `folder` -> a public layout at `output`, whole or not at all: every tensor through
    `key_map` (bit for bit), generation_config.json as it is, and what `write_files(staging)` writes (the public
    config and processor files)."""
    with atomic_output_dir(output, overwrite, [folder]) as staging:
        writer = ShardWriter(staging, max_shard_bytes)
        for key, tensor in key_map.apply(source_tensors(weight_files(folder), "exporting shards")):
            writer.add(key, tensor)
        writer.finish()
        if (folder / "generation_config.json").exists():
            GenerationConfig.from_pretrained(folder).save_pretrained(staging)
        write_files(staging)
    return Path(output)


def write_weights(items, model, folder: Path, dtype, max_shard_bytes: int) -> list[str]:
    """Renamed tensors -> shards in `folder`, each checked against `model`'s expected names and shapes (a
    missing or unexpected key is an error); returns the shard file names."""
    writer = ShardWriter(folder, max_shard_bytes)
    for key, tensor in check_against(cast(items, dtype), expected_tensors(model)):
        writer.add(key, tensor)
    return writer.finish()
