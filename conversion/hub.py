"""Publishing a converted folder: a generated model card, then one upload of model and processor files."""

from pathlib import Path

from .checkpoint_io import OUTPUT_MARKER, read_json

CARD_TEMPLATE = """---
library_name: transformers
pipeline_tag: image-text-to-text
tags:
- vlm-patterns
- {family}
- custom_code
{base_model}---

# {title}

The {family} pattern of [vlm-patterns](https://pypi.org/project/vlm-patterns/): {pattern}.
{provenance}

```python
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("{repo_id}", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
messages = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is in the image?"}}]}}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
inputs = processor(images=image, text=prompt)
print(processor.decode(model.generate(**inputs, max_new_tokens=64)[0], skip_special_tokens=True))
```

Architecture: {architecture}.
"""

PATTERNS = {
    "llava": "CLIP ViT features, projected by an MLP, replace the `<image>` placeholder embeddings of the LLM",
    "qwen2_vl": "a ViT at each image's native resolution (2D RoPE, 2x2 PatchMerger) feeds an LLM with multimodal RoPE",
    "fuyu": "early fusion: raw image patches pass one Linear layer into the decoder's token stream, no vision encoder",
}


def model_card(folder: str | Path, repo_id: str, family: str, source: str | None = None) -> str:
    config = read_json(Path(folder) / "config.json")
    text = config.get("text_config", {})
    architecture = (
        f"{config.get('architectures', ['?'])[0]}, language model {text.get('num_hidden_layers')} layers x "
        f"{text.get('hidden_size')} wide, vocabulary {text.get('vocab_size')}"
    )
    return CARD_TEMPLATE.format(
        family=family,
        title=repo_id.split("/")[-1],
        base_model=f"base_model:\n- {source}\n" if source else "",
        pattern=PATTERNS.get(family, family),
        provenance=f"Converted from [{source}](https://huggingface.co/{source}) with `vlm-patterns convert {family}`; "
        "the weights are unchanged."
        if source
        else "",
        repo_id=repo_id,
        architecture=architecture,
    )


def push_folder(folder: str | Path, repo_id: str, family: str, source: str | None = None, private: bool = False) -> str:
    """Write README.md (the model card) into `folder` and upload the folder; returns the repository URL."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    (folder / "README.md").write_text(model_card(folder, repo_id, family, source), encoding="utf-8")
    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=f"Upload {family} converted by vlm-patterns",
        ignore_patterns=[OUTPUT_MARKER],  # local bookkeeping of `overwrite`, not part of the model
    )
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
