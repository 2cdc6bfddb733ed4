"""`convert --overwrite` never loses a source, a parent folder or a complete output: outputs that are or hold a
source are refused, only this project's own outputs are replaced, the replacement is by renames (never a delete in
place), and killed runs leave nothing that a later run does not clean."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from vlm_patterns.cli import main as cli
from vlm_patterns.conversion.checkpoint_io import OUTPUT_MARKER, CorruptCheckpointError, atomic_output_dir
from vlm_patterns.conversion.llava import convert_llava

ROOT = Path(__file__).resolve().parents[1]


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def copy_of(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder


def test_output_that_is_or_holds_the_source_is_refused(llava_pair, tmp_path, capsys):
    parent = tmp_path / "parent"
    source = copy_of(llava_pair()[0], parent / "llava-hf")
    (parent / "notes.txt").write_text("mine")
    before = tree(parent)
    for output in (source, parent, source / "inside"):
        assert cli(["convert", "llava", str(source), str(output), "--overwrite"]) == 2
        assert "replace the source" in capsys.readouterr().err
    assert tree(parent) == before  # the source, its parent and the unrelated file are all untouched


def test_overwrite_replaces_only_our_own_outputs(llava_pair, tmp_path, capsys):
    source = llava_pair()[0]
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not ours")
    assert cli(["convert", "llava", str(source), str(foreign), "--overwrite"]) == 2
    assert "not an output of vlm-patterns" in capsys.readouterr().err
    assert tree(foreign) == {"holiday.jpg": b"not ours"}

    output = tmp_path / "ours"
    convert_llava(source, output)
    assert (output / OUTPUT_MARKER).is_file()
    first = tree(output)
    convert_llava(source, output, overwrite=True)  # a previous conversion is replaced
    assert tree(output) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ours", "photos"]  # no staging left


def test_a_file_as_output_is_refused_before_any_work(llava_pair, tmp_path, monkeypatch):
    target = tmp_path / "model"
    target.write_text("a file")
    import vlm_patterns.conversion.pipeline as pipeline

    monkeypatch.setattr(pipeline, "write_weights", lambda *a, **k: pytest.fail("converted before checking"))
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="existing file"):
            convert_llava(llava_pair()[0], target, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_stale_staging_of_the_same_target_is_cleaned(tmp_path):
    target = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.{dead.stdout.strip()}.abc123.partial"  # a killed run's staging (its process is gone)
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 100)
    other = tmp_path / f".other.{dead.stdout.strip()}.abc123.partial"  # another target's: left alone
    other.mkdir()
    with atomic_output_dir(target) as staging:
        (staging / "config.json").write_text("{}")
    assert not stale.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([other.name, "out"])


def test_corrupt_safetensors_name_the_file(llava_pair, tmp_path, capsys):
    source = copy_of(llava_pair()[0], tmp_path / "truncated")
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CorruptCheckpointError, match="model.safetensors is not a readable weight file"):
        convert_llava(source, tmp_path / "out")
    assert cli(["convert", "llava", str(source), str(tmp_path / "out")]) == 2
    assert str(weights) in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["truncated"]


KILL_AT_REPLACEMENT = """
import os, sys
import vlm_patterns.conversion.checkpoint_io as io
def killed(*args, **kwargs):
    os.kill(os.getpid(), 9)
io.shutil.rmtree = killed  # the first delete after the new output is in place: kill -9 there
from vlm_patterns.conversion.llava import convert_llava
convert_llava(sys.argv[1], sys.argv[2], overwrite=True)
"""


def converted_state(folder: Path) -> dict:
    """What a load would read: the file set and every tensor (fails if the output is incomplete)."""
    return {name: load_file(folder / name) for name in os.listdir(folder) if name.endswith(".safetensors")}


def test_kill_during_replacement_leaves_a_complete_output(llava_pair, tmp_path):
    source = llava_pair()[0]
    reference = convert_llava(source, tmp_path.parent / f"{tmp_path.name}-reference")  # the fixture's may be written to
    other = llava_pair("layer-1-full")[0]
    output = tmp_path / "out"
    convert_llava(other, output)  # the old output: another model, so old and new can be told apart
    old = tree(output)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", KILL_AT_REPLACEMENT, str(source), str(output)], env=env)
    assert run.returncode == -signal.SIGKILL
    new = tree(output)
    assert new != old and new == tree(reference)
    assert any(p.name.endswith(".partial") for p in tmp_path.iterdir())  # the old output, left as stale staging
    convert_llava(source, output, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_kill_at_random_moments_never_loses_the_output(llava_pair, tmp_path):
    """kill -9 of `convert --overwrite` at several moments: the target is always one complete output, old or new."""
    source = llava_pair()[0]
    reference = convert_llava(source, tmp_path.parent / f"{tmp_path.name}-reference")  # the fixture's may be written to
    output = tmp_path / "out"
    convert_llava(llava_pair("layer-1-full")[0], output)
    complete = [tree(output), tree(reference)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "conversion.cli", "convert", "llava", str(source), str(output), "--overwrite"]
    for delay in (0.5, 2.0, 3.5, 5.0, 7.0):
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        now = tree(output)
        assert now in complete, f"incomplete output after a kill at {delay} s"
        converted_state(output)
