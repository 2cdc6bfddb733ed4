"""The `vlm-patterns` command line, the model card and Hub upload, and streaming conversion memory."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vlm_patterns import publishing as hub
from vlm_patterns.cli import main
from vlm_patterns.conversion.tiny import photo_like_image


def test_convert_with_verify_then_export_and_generate(llava_pair, tmp_path, capsys):
    source, _ = llava_pair()
    out = tmp_path / "ours"
    assert main(["convert", "llava", str(source), str(out), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "PASS" in printed and "greedy tokens" in printed
    assert main(["export", "llava", str(out), str(tmp_path / "exported")]) == 0
    assert json.loads((tmp_path / "exported" / "config.json").read_text())["architectures"] == [
        "LlavaForConditionalGeneration"
    ]

    image = tmp_path / "photo.png"
    photo_like_image(64, 48).save(image)
    capsys.readouterr()
    assert main(["generate", str(out), "--image", str(image), "--prompt", "What is it?", "--max-new-tokens", "5"]) == 0
    answer = capsys.readouterr().out
    assert answer.strip()  # streamed to stdout
    compiled = ["--decode", "compiled"]  # the compiled step, streamed: the same greedy answer
    assert main(["generate", str(out), "--image", str(image), "--prompt", "What is it?", "--max-new-tokens", "5",
                 *compiled]) == 0  # fmt: skip
    assert capsys.readouterr().out == answer

    from vlm_patterns.inference import generate, load

    model, processor = load(out)
    assert answer.rstrip("\n") == generate(model, processor, [str(image)], "What is it?", max_new_tokens=5)


def test_qwen2_vl_convert_verify_export_from_the_command_line(qwen2_vl_pair, tmp_path, capsys):
    source, _ = qwen2_vl_pair()
    assert main(["convert", "qwen2_vl", str(source), str(tmp_path / "ours"), "--verify"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["export", "qwen2_vl", str(tmp_path / "ours"), str(tmp_path / "exported")]) == 0
    assert main(["tiny", "qwen2_vl", str(tmp_path / "tiny")]) == 0
    assert main(["convert", "qwen2_vl", str(tmp_path / "tiny"), str(tmp_path / "ours"), "--vision-tower", "x"]) == 2
    assert "--vision-tower is for the original LLaVA layout only" in capsys.readouterr().err


def test_errors_are_reported_not_raised(tmp_path, capsys):
    assert main(["convert", "llava", str(tmp_path / "nowhere"), str(tmp_path / "out")]) == 2
    assert "error:" in capsys.readouterr().err
    (tmp_path / "existing").mkdir()
    assert main(["convert", "llava", str(tmp_path / "existing"), str(tmp_path / "out")]) == 2
    assert "config.json" in capsys.readouterr().err


def test_generate_reports_a_bad_image(llava_pair, tmp_path, capsys):
    _, converted = llava_pair()
    bad_image = tmp_path / "bad.png"
    bad_image.write_bytes(b"")
    assert main(["generate", str(converted), "--image", str(bad_image), "--prompt", "Hi"]) == 2
    assert "empty" in capsys.readouterr().err


def test_model_card_and_push(llava_pair, monkeypatch, tmp_path):
    source, converted = llava_pair()
    card = hub.model_card(converted, "someone/llava-tiny", "llava", source="llava-hf/llava-1.5-7b-hf")
    assert card.data.base_model == "llava-hf/llava-1.5-7b-hf" and card.data.license == "llama2"
    assert card.data.pipeline_tag == "image-text-to-text" and card.data.library_name == "transformers"
    assert 'from_pretrained("someone/llava-tiny", trust_remote_code=True)' in card.content
    assert "pypi.org" not in card.content
    local = hub.model_card(converted, "someone/llava-tiny", "llava", source=str(source))
    assert local.data.base_model is None and "huggingface.co/" + str(source) not in local.content
    assert local.data.license == "other"
    flamingo = hub.model_card(converted, "someone/idefics", "idefics", source="HuggingFaceM4/idefics-9b-instruct")
    assert "cross-attention (Flamingo)" in flamingo.content and "The idefics pattern" not in flamingo.content

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private))
            return f"https://huggingface.co/{repo_id}"

        def upload_folder(self, repo_id, folder_path, commit_message, ignore_patterns):
            files = sorted(p.name for p in folder_path.iterdir() if p.name not in ignore_patterns)
            calls.append(("upload", repo_id, files))

    monkeypatch.setattr("huggingface_hub.HfApi", FakeApi)
    url = hub.push_folder(converted, "someone/llava-tiny", "llava", private=True)
    assert url == "https://huggingface.co/someone/llava-tiny"
    assert calls[0] == ("create", "someone/llava-tiny", True)
    uploaded = calls[1][2]
    assert {"README.md", "config.json", "model.safetensors", "modeling_llava.py", "processor_config.json"} <= set(
        uploaded
    )
    assert not any(name.startswith(".vlm-patterns") for name in uploaded)


def test_snippet_in_the_card_runs_as_written(llava_pair, monkeypatch):
    """The card's usage code, with the Hub id pointed at the local folder and the image URL at a local file."""
    _, converted = llava_pair()
    code = hub.model_card(converted, "someone/llava-tiny", "llava", source="llava-hf/llava-1.5-7b-hf").content
    snippet = code.split("```python\n")[1].split("```")[0]
    example = Path(__file__).resolve().parents[1] / "spaces" / "examples" / "color-0.png"
    snippet = snippet.replace('"someone/llava-tiny"', repr(str(converted)))
    snippet = snippet.replace(snippet.split("load_image(")[1].split(")")[0], repr(str(example)))
    exec(compile(snippet, "model-card", "exec"), {})


def test_an_unreachable_hub_is_one_line(llava_pair, monkeypatch, capsys, tmp_path):
    source, _ = llava_pair()
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9")
    code = main(["convert", "llava", str(source), str(tmp_path / "out"), "--push-to-hub", "someone/x"])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: Could not push"), err
    assert "Traceback" not in err


MEMORY_CHILD = textwrap.dedent(
    """
    import sys
    from vlm_patterns.conversion.llava import convert_llava

    def status(field):  # kB values from /proc/self/status
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to the current RSS, after the imports
    before = status("VmRSS")
    convert_llava(sys.argv[1], sys.argv[2], max_shard_bytes=int(sys.argv[3]))
    print(status("VmHWM") - before)
    """
)


def test_conversion_streams_shard_by_shard(tmp_path):
    """Converting a 6-shard checkpoint must not hold more than a couple of shards in memory."""
    from vlm_patterns.conversion.tiny import build_tiny_llava_hf

    source = build_tiny_llava_hf(
        tmp_path / "wide", text_hidden_size=1024, text_layers=6, num_heads=8, num_key_value_heads=8
    )
    # Reshard the source into ~25 MB shards, as the Hub's multi-file checkpoints are.
    from vlm_patterns.conversion.checkpoint_io import ShardWriter, iter_shard

    state = dict(iter_shard(source / "model.safetensors"))
    (source / "model.safetensors").unlink()
    writer = ShardWriter(source, max_shard_bytes=25 * 1024**2)
    for key, tensor in state.items():
        writer.add(key, tensor)
    shard_bytes = writer.max_shard_bytes
    total_bytes = writer.total_bytes
    writer.finish()
    del state
    assert total_bytes > 5 * shard_bytes

    script = tmp_path / "measure.py"
    script.write_text(MEMORY_CHILD)
    result = subprocess.run(
        [sys.executable, str(script), str(source), str(tmp_path / "out"), str(shard_bytes)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    growth = int(result.stdout.strip().splitlines()[-1])
    assert growth < 2.5 * shard_bytes, f"peak RSS grew {growth / 1e6:.0f} MB for {total_bytes / 1e6:.0f} MB of weights"
    assert (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_shard_sizes_read_as_transformers_reads_them():
    import argparse

    from vlm_patterns.cli import shard_size

    assert shard_size("5GB") == 5 * 10**9 and shard_size("2GiB") == 2 * 2**30 and shard_size("500MB") == 5 * 10**8
    assert shard_size("123456") == 123456
    for bad in ("five", "5XB", "-1GB"):
        with pytest.raises(argparse.ArgumentTypeError):
            shard_size(bad)


def test_only_train_passes_unknown_flags_on(capsys):
    with pytest.raises(SystemExit):
        main(["tiny", "llava", "somewhere", "--bf16"])
    assert "unrecognized arguments: --bf16" in capsys.readouterr().err


def test_help_answers_without_importing_torch():
    """`vlm-patterns --help` (and each subcommand's) imports neither torch nor a converter."""
    code = (
        "import contextlib, io, sys\n"
        "from vlm_patterns.cli import main\n"
        "for argv in (['--help'], ['convert', '--help'], ['train', '--help'], ['pretrain-vision', '--help']):\n"
        "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "        main(argv)\n"
        "print(sorted(m for m in ('torch', 'transformers', 'vlm_patterns.conversion.llava') if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout
