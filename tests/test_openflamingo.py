"""OpenFlamingo's checkpoint.pt + CLIP tower + Llama base -> our Flamingo pattern, checked against OpenFlamingo's
forward assembled independently from the same three sources (conversion/openflamingo_reference.py)."""

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlm_patterns.cli import main
from vlm_patterns.conversion.openflamingo import convert_openflamingo, load_checkpoint
from vlm_patterns.conversion.openflamingo_reference import OpenFlamingoReference
from vlm_patterns.conversion.tiny import build_tiny_open_flamingo, photo_like_image
from vlm_patterns.conversion.verify import verify_openflamingo

VARIANTS = {
    "trainable-only-n2": dict(),
    "full-state-dict-n1": dict(cross_attn_every_n_layers=1, full_state_dict=True, seed=1, num_latents=5),
    "n4-six-layers": dict(cross_attn_every_n_layers=4, text_layers=6, heads=3, seed=2),
}


@pytest.fixture(scope="module")
def open_flamingo(tmp_path_factory):
    cache = {}

    def get(variant: str = "trainable-only-n2"):
        if variant not in cache:
            folder = tmp_path_factory.mktemp(f"openflamingo-{variant}")
            checkpoint, clip, llama = build_tiny_open_flamingo(folder, **VARIANTS[variant])
            converted = convert_openflamingo(checkpoint, folder / "ours", vision=clip, language=llama)
            cache[variant] = (checkpoint, clip, llama, converted)
        return cache[variant]

    return get


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_verification_against_openflamingo_passes(open_flamingo, variant):
    checkpoint, clip, llama, converted = open_flamingo(variant)
    images = [photo_like_image(60, 45, seed=i) for i in range(3)]
    report = verify_openflamingo(checkpoint, converted, vision=clip, language=llama, images=images)
    assert report.passed, report.summary()


@pytest.mark.parametrize(("variant", "layers"), [("trainable-only-n2", [1, 3]), ("full-state-dict-n1", [0, 1, 2, 3]),
                                                 ("n4-six-layers", [3])])  # fmt: skip
def test_blocks_sit_where_openflamingo_put_them(open_flamingo, variant, layers):
    *_, converted = open_flamingo(variant)
    model = AutoModelForImageTextToText.from_pretrained(converted)
    assert model.config.cross_attn_layer_ids == layers
    assert model.config.vision_feature_select_strategy == "default" and model.config.media_reset_token_id is None


def test_fused_kv_is_split_in_order(open_flamingo):
    checkpoint, _, _, converted = open_flamingo()
    state = load_checkpoint(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(converted)
    fused = state["lang_encoder.model.layers.3.gated_cross_attn_layer.attn.to_kv.weight"]
    block = model.model.gated_cross_attn_layers[1].cross_attn
    assert torch.equal(torch.cat([block.k_proj.weight, block.v_proj.weight]), fused)
    resampler = model.model.perceiver_resampler.blocks[0][0]
    assert torch.equal(torch.cat([resampler.k_proj.weight, resampler.v_proj.weight]),
                       state["perceiver.layers.0.0.to_kv.weight"])  # fmt: skip


def test_few_shot_batch_matches_the_reference_row_by_row(open_flamingo):
    checkpoint, clip, llama, converted = open_flamingo()
    model = AutoModelForImageTextToText.from_pretrained(converted).eval()
    processor = AutoProcessor.from_pretrained(converted)
    reference = OpenFlamingoReference(checkpoint, clip, llama, model)
    examples = [(photo_like_image(50, 40, seed=i), f"An image of shape {i}.") for i in range(2)]
    query = photo_like_image(40, 50, seed=7)
    inputs = processor.few_shot(examples, query, "An image of")
    assert "<|endofchunk|>" in processor.tokenizer.decode(inputs["input_ids"][0])
    with torch.no_grad():
        diff = (reference(inputs["input_ids"], inputs["pixel_values"]).logits - model(**inputs).logits).abs()
    assert diff.max().item() <= 1e-4
    batch = processor(images=[[query], [e[0] for e in examples]], text=["<image>Hi", "<image>A<|endofchunk|><image>B"])
    with torch.no_grad():
        batched = model(**batch).logits
        for row in range(2):
            real = batch["attention_mask"][row].bool()
            ids = batch["input_ids"][row][real][None]
            count = int(batch["image_mask"][row].sum())
            alone = reference(ids, batch["pixel_values"][row : row + 1, :count]).logits[0]
            assert (alone - batched[row][real]).abs().max().item() <= 1e-4


def test_other_base_models_are_refused_with_the_reason(open_flamingo, tmp_path):
    import json

    checkpoint, clip, llama, _ = open_flamingo()
    mpt = tmp_path / "mpt"
    mpt.mkdir()
    (mpt / "config.json").write_text(json.dumps({"model_type": "mpt", "d_model": 64, "n_layers": 2, "n_heads": 4}))
    with pytest.raises((NotImplementedError, ValueError), match="mpt"):
        convert_openflamingo(checkpoint, tmp_path / "out", vision=clip, language=mpt)
    assert not (tmp_path / "out").exists()


def test_wrong_files_are_refused(open_flamingo, tmp_path):
    checkpoint, clip, llama, _ = open_flamingo()
    torch.save({"something.else": torch.zeros(2)}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="OpenFlamingo checkpoint"):
        convert_openflamingo(tmp_path / "checkpoint.pt", tmp_path / "out", vision=clip, language=llama)
    state = load_checkpoint(checkpoint)
    state["lang_encoder.model.embed_tokens.weight"] = state["lang_encoder.model.embed_tokens.weight"][:-1]
    torch.save(state, tmp_path / "short.pt")
    with pytest.raises(ValueError, match="--tokenizer"):
        convert_openflamingo(tmp_path / "short.pt", tmp_path / "out", vision=clip, language=llama)
    state = load_checkpoint(checkpoint) | {"perceiver.media_time_embs": torch.zeros(4, 1, 32)}
    torch.save(state, tmp_path / "timed.pt")
    with pytest.raises(NotImplementedError, match="media-time"):
        convert_openflamingo(tmp_path / "timed.pt", tmp_path / "out", vision=clip, language=llama)


def test_command_line(open_flamingo, tmp_path, capsys):
    checkpoint, clip, llama, _ = open_flamingo()
    out = tmp_path / "ours"
    assert main(["convert", "openflamingo", str(checkpoint), str(out), "--vision", str(clip), "--language",
                 str(llama), "--verify"]) == 0  # fmt: skip
    assert "PASS" in capsys.readouterr().out
    assert main(["convert", "openflamingo", str(checkpoint), str(tmp_path / "x")]) == 2
    assert "--vision" in capsys.readouterr().err
    assert main(["convert", "llava", str(checkpoint), str(tmp_path / "y"), "--language", str(llama)]) == 2
    assert "openflamingo only" in capsys.readouterr().err
