"""A saved model and processor load with trust_remote_code in a fresh interpreter that cannot import this project."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm_patterns.conversion.tiny import photo_like_image
from vlm_patterns.families import FAMILIES as REGISTRY

# Runs in a child interpreter: the project's packages are made unimportable before anything else happens.
CHILD = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"vlm_patterns", "modeling", "processing", "conversion", "training", "tests"}:
                raise ModuleNotFoundError(f"{name} is blocked: this interpreter must not see the project")

    sys.meta_path.insert(0, Block())
    sys.path = [p for p in sys.path if p not in ("", ".")]

    import torch
    from PIL import Image
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoModelForImageTextToText, AutoProcessor

    folder, image_path, out_path = sys.argv[1:4]
    try:
        import vlm_patterns
        raise SystemExit("the project is importable")
    except ModuleNotFoundError:
        pass
    config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    base = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image_processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=Image.open(image_path), text=prompt)
    with torch.no_grad():
        logits = model(**inputs).logits
    tokens = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    torch.save({"logits": logits, "tokens": tokens, "input_ids": inputs["input_ids"]}, out_path)
    print(json.dumps({
        "config": type(config).__name__, "model": type(model).__name__, "base": type(base).__name__,
        "processor": type(processor).__name__, "image_processor": type(image_processor).__name__,
        "model_module": type(model).__module__,
    }))
    """
)


# Each family's tiny conversion fixture (conftest.py), named after the source layout it converts.
FAMILIES = {
    name: (f"{family.layouts[0].name}_pair", f"{family.class_prefix}Pattern") for name, family in REGISTRY.items()
}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_saved_checkpoint_loads_without_the_project(family, request, tmp_path):
    fixture, prefix = FAMILIES[family]
    _, converted = request.getfixturevalue(fixture)()
    model = AutoModelForImageTextToText.from_pretrained(converted).eval()
    processor = AutoProcessor.from_pretrained(converted)
    saved = tmp_path / "saved"
    model.save_pretrained(saved)
    processor.save_pretrained(saved)
    image_path = tmp_path / "image.png"
    photo_like_image(80, 60).save(image_path)

    child = tmp_path / "child.py"
    child.write_text(CHILD)
    result = subprocess.run(
        [sys.executable, str(child), str(saved), str(image_path), str(tmp_path / "out.pt")],
        capture_output=True, text=True, cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1",
                                                          "HF_HOME": str(tmp_path / "hf-home")},
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    names = json.loads(result.stdout.strip().splitlines()[-1])
    assert names == {
        "config": f"{prefix}Config",
        "model": f"{prefix}ForConditionalGeneration",
        "base": f"{prefix}Model",
        "processor": f"{prefix}Processor",
        "image_processor": f"{prefix}ImageProcessor",
        "model_module": names["model_module"],
    }
    assert names["model_module"].startswith("transformers_modules.")  # really the copied code, not ours

    from PIL import Image

    out = torch.load(tmp_path / "out.pt")
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=Image.open(image_path), text=prompt)
    assert torch.equal(out["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        assert torch.equal(out["logits"], model(**inputs).logits)
    assert torch.equal(out["tokens"], model.generate(**inputs, max_new_tokens=6, do_sample=False))
