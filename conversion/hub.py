"""Publishing a converted folder: a model card built with huggingface_hub's `ModelCard`, then one upload of the
model and processor files."""

import os
import re
from pathlib import Path

from .checkpoint_io import OUTPUT_MARKER, read_json

# The pattern sentence of each converter's output, keyed by the source layout (IDEFICS and OpenFlamingo both
# become the Flamingo pattern).
PATTERNS = {
    "llava": "projection: CLIP ViT features, projected by an MLP, replace the `<image>` placeholder embeddings of "
    "the language model",
    "qwen2_vl": "projection at native resolution: a ViT reads each image at its own size (2D RoPE, 2x2 PatchMerger) "
    "and feeds a language model with multimodal RoPE",
    "fuyu": "early fusion: raw image patches pass one Linear layer into the decoder's token stream, no vision encoder",
    "idefics": "cross-attention (Flamingo): a Perceiver Resampler turns each image into a fixed set of latents that "
    "the language model reads through tanh-gated cross-attention layers (IDEFICS weights)",
    "openflamingo": "cross-attention (Flamingo): a Perceiver Resampler turns each image into a fixed set of latents "
    "that the language model reads through tanh-gated cross-attention layers (OpenFlamingo weights)",
}
# Licenses of the public checkpoints the converters are made for; other sources get "other" (see the source).
LICENSES = {
    "llava-hf/llava-1.5-7b-hf": "llama2",
    "liuhaotian/llava-v1.5-7b": "llama2",
    "llava-hf/llava-interleave-qwen-0.5b-hf": "other",
    "Qwen/Qwen2-VL-2B-Instruct": "apache-2.0",
    "Qwen/Qwen2-VL-7B-Instruct": "apache-2.0",
    "adept/fuyu-8b": "cc-by-nc-4.0",
    "HuggingFaceM4/idefics-9b": "other",
    "HuggingFaceM4/idefics-9b-instruct": "other",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

USAGE = """```python
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.image_utils import load_image

model = AutoModelForImageTextToText.from_pretrained("{repo_id}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
image = load_image("https://huggingface.co/datasets/huggingface/documentation-images/resolve/main/bee.jpg")
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the image?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=image, text=prompt)
output = model.generate(**inputs, max_new_tokens=64)
print(processor.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```"""


def is_hub_id(source: str | None) -> bool:
    """A Hub repository id (owner/name), not a local folder: only those are written as `base_model` and linked."""
    return bool(source) and not os.path.exists(source) and bool(_HUB_ID.match(source))


def model_card(folder: str | Path, repo_id: str, family: str, source: str | None = None):
    """The card of a converted folder (a `huggingface_hub.ModelCard`): metadata (license, base model when the
    source is on the Hub, pipeline, tags), the pattern in one sentence, provenance, a usage snippet that runs as
    written, and the architecture read from config.json."""
    from huggingface_hub import ModelCard, ModelCardData

    config = read_json(Path(folder) / "config.json")
    text = config.get("text_config", {})
    on_hub = is_hub_id(source)
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license=LICENSES.get(source, "other") if on_hub else "other",
        base_model=source if on_hub else None,
        tags=["vlm-patterns", family, "custom_code"],
    )
    if on_hub:
        provenance = (
            f"Converted from [{source}](https://huggingface.co/{source}) with `vlm-patterns convert {family}`; the "
            f"weights are unchanged, and so are their terms: see the source's license."
        )
    elif source:
        provenance = f"Converted from a local `{family}` checkpoint with `vlm-patterns convert {family}`."
    else:
        provenance = "Written by vlm-patterns."
    architecture = (
        f"{config.get('architectures', ['?'])[0]}, language model {text.get('num_hidden_layers')} layers x "
        f"{text.get('hidden_size')} wide, vocabulary {text.get('vocab_size')}"
    )
    content = "\n\n".join(
        [
            f"---\n{data.to_yaml()}\n---",
            f"# {repo_id.split('/')[-1]}",
            f"The {PATTERNS.get(family, family)}. This checkpoint is the vlm-patterns implementation of that "
            "pattern, loaded with `trust_remote_code=True`.",
            provenance,
            USAGE.format(repo_id=repo_id),
            f"Architecture: {architecture}.",
        ]
    )
    return ModelCard(content)


def push_folder(folder: str | Path, repo_id: str, family: str, source: str | None = None, private: bool = False) -> str:
    """Write README.md (the model card) into `folder` and upload the folder; returns the repository URL. An
    unreachable or refusing Hub is one `OSError` that says so."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    model_card(folder, repo_id, family, source).save(folder / "README.md")
    api = HfApi()
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            commit_message=f"Upload {family} converted by vlm-patterns",
            ignore_patterns=[OUTPUT_MARKER],  # local bookkeeping of `overwrite`, not part of the model
        )
    except (HfHubHTTPError, OSError, ConnectionError) as e:
        raise OSError(f"Could not push {folder} to the Hugging Face Hub as {repo_id}: {e}") from None
    except Exception as e:  # httpx's transport errors, offline mode, ...
        if type(e).__module__.startswith(("httpx", "httpcore", "huggingface_hub")):
            raise OSError(f"Could not push {folder} to the Hugging Face Hub as {repo_id}: {e}") from None
        raise
    return str(url)


SPACE_PACKAGES = ("modeling", "processing", "conversion", "training")


def assemble_space(output: str | Path) -> Path:
    """A self-contained Hugging Face Space folder: spaces/ (app.py, README.md front matter, requirements.txt,
    examples) plus the project's packages and the trained checkpoints beside it, ready for
    `hf upload you/vlm-patterns OUTPUT --repo-type space`."""
    import shutil

    project = Path(__file__).resolve().parents[1]
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(project / "spaces", output, ignore=ignore, dirs_exist_ok=True)
    for package in SPACE_PACKAGES:
        shutil.copytree(project / package, output / package, ignore=ignore)
    return output
