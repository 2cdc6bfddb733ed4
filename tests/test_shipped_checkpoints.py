"""The four checkpoints shipped in training/checkpoints: complete, small, and as accurate as the README says."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vlm_patterns.families import FAMILIES
from vlm_patterns.training.evaluate import evaluate

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "training" / "checkpoints"


def readme_results() -> dict[str, tuple[float, int, int]]:
    """family -> (overall accuracy %, questions, seed) from the README's comparison table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("<!-- compare:start -->")[1].split("<!-- compare:end -->")[0]
    questions, seed = (int(v) for v in re.search(r"(\d+) questions per family \(seed (\d+)\)", section).groups())
    results = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in FAMILIES:
            results[cells[0]] = (float(cells[-3].rstrip("%")), questions, seed)
    return results


@pytest.mark.parametrize("family", FAMILIES)
def test_checkpoint_is_complete_and_small(family):
    folder = CHECKPOINTS / family
    assert (folder / "model.safetensors").stat().st_size < 10 * 1024**2
    for name in ("config.json", "tokenizer.json", "processor_config.json", "training_log.json"):
        assert (folder / name).exists(), name
    log = json.loads((folder / "training_log.json").read_text())
    assert log["options"]["family"] == family and log["held_out_curve"]


@pytest.mark.parametrize("family", FAMILIES)
def test_evaluate_reproduces_the_readme(family):
    accuracy, questions, seed = readme_results()[family]
    result = evaluate(CHECKPOINTS / family, num_examples=questions, seed=seed, latency_samples=1)
    assert abs(100 * result.accuracy - accuracy) <= 0.5, (100 * result.accuracy, accuracy)


@pytest.mark.parametrize("family", FAMILIES)
def test_clearly_above_chance_on_a_fresh_draw(family):
    result = evaluate(CHECKPOINTS / family, num_examples=240, seed=4242, latency_samples=1)
    assert result.accuracy > result.chance + 0.1, result.markdown()


def test_assembled_space_runs_on_its_own(tmp_path):
    from vlm_patterns.cli import main

    out = tmp_path / "space"
    assert main(["space", str(out)]) == 0
    package = out / "vlm_patterns"
    assert (out / "app.py").exists() and (package / "modeling").is_dir()
    assert (package / "training" / "checkpoints").is_dir() and (package / "spaces" / "examples").is_dir()
    where = subprocess.run([sys.executable, "-c", "import vlm_patterns.modeling as m; print(m.__file__)"],
                           capture_output=True, text=True, cwd=out, timeout=120)  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(package), where.stdout + where.stderr  # its own copy
    result = subprocess.run([sys.executable, str(out / "app.py"), "--smoke-test"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert result.stdout.count("visual tokens") == 4


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_code_is_the_repositorys(family):
    """The code `trust_remote_code` loads from a shipped checkpoint is today's: refresh with `python -m vlm_patterns.training.ship`."""
    folder = CHECKPOINTS / family
    shipped = sorted(folder.glob("*.py"))
    assert any(p.name == f"modeling_{family}.py" for p in shipped) and any(
        p.name == f"processing_{family}.py" for p in shipped
    )
    for path in shipped:
        source = next(p for p in (ROOT / "modeling" / path.name, ROOT / "processing" / path.name) if p.exists())
        assert path.read_bytes() == source.read_bytes(), f"{path} is stale: run python -m vlm_patterns.training.ship"
    from transformers import AutoProcessor

    import vlm_patterns  # noqa: F401  (registers the Auto classes)
    from vlm_patterns.training.recipes import build_processor

    processor = AutoProcessor.from_pretrained(folder)
    assert processor.chat_template == build_processor(family, processor.tokenizer).chat_template
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"] == f"modeling_{family}.{config['architectures'][0]}"


@pytest.mark.parametrize("family", FAMILIES)
def test_shipped_checkpoint_answers_through_trust_remote_code(family, tmp_path):
    """A fresh interpreter that cannot import this project loads and runs the shipped folder as it is."""
    import torch
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from tests.test_remote_code import CHILD

    image_path = ROOT / "spaces" / "examples" / "color-0.png"
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    result = subprocess.run(
        [sys.executable, str(child), str(CHECKPOINTS / family), str(image_path), str(tmp_path / "out.pt")],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
        env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.strip().splitlines()[-1])["model_module"].startswith("transformers_modules.")
    model = AutoModelForImageTextToText.from_pretrained(CHECKPOINTS / family).eval()
    processor = AutoProcessor.from_pretrained(CHECKPOINTS / family)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the image?"}]}],
        add_generation_prompt=True,
    )
    inputs = processor(images=Image.open(image_path), text=prompt)
    out = torch.load(tmp_path / "out.pt")
    assert torch.equal(out["input_ids"], inputs["input_ids"])
    assert torch.equal(out["tokens"], model.generate(**inputs, max_new_tokens=6, do_sample=False))


@pytest.mark.parametrize("family", ["llava", "fuyu"])
def test_refreshing_a_checkpoint_keeps_its_weights_and_its_training_records(family, tmp_path):
    """`python -m vlm_patterns.training.ship` re-saves with today's code; what training, evaluation and the vision
    encoder's stage wrote beside the weights stays (save_pretrained does not write them)."""
    import shutil

    import torch
    from safetensors.torch import load, load_file

    from vlm_patterns.training.pretrain_vision import encoder_of
    from vlm_patterns.training.ship import KEPT_FILES, refresh

    folder = tmp_path / family
    shutil.copytree(CHECKPOINTS / family, folder)
    records = {name: (folder / name).read_bytes() for name in KEPT_FILES if (folder / name).exists()}
    # The shipped recipe trains each vision encoder alone first; Fuyu has none.
    assert ("vision_pretraining.json" in records) == bool(encoder_of(family)) and "training_log.json" in records
    before = load((folder / "model.safetensors").read_bytes())
    refresh(folder, family)
    assert {name: (folder / name).read_bytes() for name in records} == records
    after = load_file(folder / "model.safetensors")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
