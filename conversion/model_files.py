"""What a converted folder needs besides weights: config.json with `auto_map`, the modeling code for
`trust_remote_code`, generation_config.json; and the target model's expected tensors for strict checks.
"""

from pathlib import Path

import torch
from transformers import GenerationConfig, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save


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
