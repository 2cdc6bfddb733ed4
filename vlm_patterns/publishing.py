"""Publishing: a converted folder's model card (huggingface_hub's `ModelCard`) and its upload, the Space folder,
and the README's generated sections."""

import os
import re
from pathlib import Path

from .conversion.checkpoint_io import OUTPUT_MARKER, read_json
from .families import SOURCE_LAYOUTS, licence_of

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


def pattern_sentence(layout: str) -> str:
    """What a converted checkpoint of this source layout is, in one sentence."""
    family, source_layout = SOURCE_LAYOUTS[layout]
    weights = f" ({source_layout.weights} weights)" if source_layout.weights else ""
    return f"The {family.pattern} ({family.title}) pattern: {family.idea}{weights}."


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
        license=licence_of(source) if on_hub else "other",
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
            f"{pattern_sentence(family)} This checkpoint is the vlm-patterns implementation of that "
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


def assemble_space(output: str | Path) -> Path:
    """A self-contained Hugging Face Space folder: the Space's README.md (front matter) and requirements.txt, an
    app.py that starts the Space, and this package (`vlm_patterns/`, with the shipped checkpoints and the Space's
    examples) beside it, ready for `hf upload you/vlm-patterns OUTPUT --repo-type space`."""
    import shutil

    import vlm_patterns

    output = Path(output)
    if output.exists() and any(output.iterdir()):
        raise FileExistsError(f"{output} exists and is not empty")
    output.mkdir(parents=True, exist_ok=True)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    package = output / "vlm_patterns"
    for folder in vlm_patterns.__path__:  # installed: one folder; in a clone: vlm_patterns/ and the repository root
        root = Path(folder)
        if root.name == "vlm_patterns":
            shutil.copytree(root, package, ignore=ignore, dirs_exist_ok=True)
        else:
            for name in ("modeling", "processing", "conversion", "training", "spaces"):
                shutil.copytree(root / name, package / name, ignore=ignore, dirs_exist_ok=True)
    for name in ("README.md", "requirements.txt"):
        shutil.copy2(package / "spaces" / name, output / name)
    (output / "app.py").write_text(
        '"""The vlm-patterns Space (the app itself: vlm_patterns/spaces/app.py)."""\n\n'
        "from vlm_patterns.spaces.app import main\n\nraise SystemExit(main())\n"
    )
    return output


def write_readme_section(readme: str | Path, name: str, content: str) -> None:
    """Replace the text between `<!-- NAME:start -->` and `<!-- NAME:end -->` in a README: the generated sections
    (benchmarks, `vlm-patterns compare --readme`) come from commands that measure, never from hand edits."""
    readme = Path(readme)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = readme.read_text(encoding="utf-8")
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} section to fill")
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    readme.write_text(f"{before}{start}\n{content}\n{end}{after}", encoding="utf-8")
