"""The four checkpoints shipped in training/checkpoints: complete, small, and as accurate as the README says."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from training.evaluate import evaluate
from training.families import FAMILIES

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
    from conversion.cli import main

    out = tmp_path / "space"
    assert main(["space", str(out)]) == 0
    assert (out / "app.py").exists() and (out / "modeling").is_dir() and (out / "training" / "checkpoints").is_dir()
    result = subprocess.run([sys.executable, str(out / "app.py"), "--smoke-test"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    assert result.stdout.count("visual tokens") == 4
