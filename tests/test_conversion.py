"""The conversion framework (rules, strict checks, shards, atomic output) and LLaVA export round trips."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from vlm_patterns.conversion.checkpoint_io import (
    ShardWriter,
    atomic_output_dir,
    checkpoint_keys,
    iter_shard,
    weight_files,
)
from vlm_patterns.conversion.key_mapping import Gather, KeyMap, Split, check_against
from vlm_patterns.conversion.llava import config_from_llava_hf, convert_llava, export_llava
from vlm_patterns.conversion.tiny import photo_like_image


def all_tensors(folder):
    return {key: tensor for path in weight_files(folder) for key, tensor in iter_shard(path)}


# ----------------------------------------------------------------------------------------------------------
# Rules


def test_first_full_match_wins_and_unmatched_keys_are_errors():
    key_map = KeyMap([(r"a\.b\.(.*)", r"x.\1"), (r"a\.(.*)", r"y.\1"), (r"drop\..*", None)])
    assert key_map.rename("a.b.c") == "x.c"
    assert key_map.rename("a.c") == "y.c"
    assert key_map.rename("drop.me") is None
    with pytest.raises(KeyError, match="No conversion rule covers"):
        key_map.rename("za.b")  # patterns match whole keys, not substrings


def test_split_and_gather_across_shards():
    key_map = KeyMap(
        [(r"qkv", "attn.qkv"), (r"emb\.(\d)", r"embed#\1")],
        splits=[Split(r"attn\.qkv", lambda key, t: dict(zip(["q", "k", "v"], t.chunk(3), strict=True)))],
        gathers=[Gather(r"embed", 2, lambda parts: torch.cat(parts))],
    )
    items = [("emb.1", torch.ones(2)), ("qkv", torch.arange(6.0)), ("emb.0", torch.zeros(3))]
    out = dict(key_map.apply(items))
    assert torch.equal(out["q"], torch.tensor([0.0, 1.0])) and torch.equal(out["v"], torch.tensor([4.0, 5.0]))
    assert torch.equal(out["embed"], torch.tensor([0.0, 0, 0, 1, 1]))  # parts joined in part order
    with pytest.raises(KeyError, match="Incomplete tensors"):
        list(key_map.apply([("emb.0", torch.zeros(3))]))


def test_strict_check_names_the_problem():
    expected = {"a": torch.Size([2]), "b": torch.Size([3])}
    with pytest.raises(KeyError, match="target model does not have"):
        list(check_against([("c", torch.zeros(2))], expected))
    with pytest.raises(ValueError, match=r"shape \(4,\), the model expects \(2,\)"):
        list(check_against([("a", torch.zeros(4))], expected))
    with pytest.raises(KeyError, match="lacks 1 tensors the model needs: b"):
        list(check_against([("a", torch.zeros(2))], expected))


def test_shard_writer_splits_and_indexes(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_bytes=100)
    for i in range(5):
        writer.add(f"t{i}", torch.full((10,), float(i)))  # 40 bytes each: two per shard
    names = writer.finish()
    assert names == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["t4"] == names[2] and index["metadata"]["total_size"] == 200
    assert sorted(checkpoint_keys(tmp_path)) == [f"t{i}" for i in range(5)]
    with pytest.raises(ValueError, match="same key"):
        writer.add("t0", torch.zeros(1))


def test_failed_output_leaves_nothing_behind(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_output_dir(target) as staging:
        (staging / "partial.bin").write_bytes(b"x")
        raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    target.mkdir()
    with pytest.raises(FileExistsError), atomic_output_dir(target):
        pass


# ----------------------------------------------------------------------------------------------------------
# LLaVA conversion


def test_corrupt_source_fails_cleanly(llava_pair, tmp_path):
    source, _ = llava_pair()
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in source.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    state = load_file(broken / "model.safetensors")
    state.pop("language_model.model.norm.weight")
    save_file(state, broken / "model.safetensors")
    with pytest.raises(KeyError, match="lacks 1 tensors the model needs: model.language_model.norm.weight"):
        convert_llava(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["broken"]  # no staging folder left either


def test_unsupported_towers_name_what_is_missing():
    with pytest.raises(NotImplementedError, match="siglip_vision_model.*CLIP"):
        config_from_llava_hf({"model_type": "llava", "vision_config": {"model_type": "siglip_vision_model"}})
    with pytest.raises(NotImplementedError, match="'mistral'"):
        config_from_llava_hf({"model_type": "llava", "text_config": {"model_type": "mistral"}})


def test_multi_shard_output_loads(llava_pair, tmp_path):
    source, converted = llava_pair()
    sharded = convert_llava(source, tmp_path / "sharded", max_shard_bytes=200_000)
    assert len(weight_files(sharded)) > 1
    model = AutoModelForImageTextToText.from_pretrained(sharded).eval()
    reference = AutoModelForImageTextToText.from_pretrained(converted).eval()
    for (name, a), (_, b) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_dtype_option_casts_weights(llava_pair, tmp_path):
    source, _ = llava_pair()
    converted = convert_llava(source, tmp_path / "bf16", dtype=torch.bfloat16)
    assert {t.dtype for t in all_tensors(converted).values()} == {torch.bfloat16}
    model = AutoModelForImageTextToText.from_pretrained(converted)
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("variant", ["layer-2-default", "layers-list-tied", "qwen2-text"])
def test_export_round_trip_is_bit_exact(llava_pair, tmp_path, variant):
    source, converted = llava_pair(variant)
    exported = export_llava(converted, tmp_path / "exported")
    # ours -> transformers' layout reproduces the public checkpoint tensor for tensor ...
    assert_same_tensors(all_tensors(exported), all_tensors(source))
    # ... and converting that again reproduces ours.
    again = convert_llava(exported, tmp_path / "again")
    assert_same_tensors(all_tensors(again), all_tensors(converted))


def assert_same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def test_exported_folder_serves_with_transformers(llava_pair, tmp_path):
    source, converted = llava_pair()
    exported = export_llava(converted, tmp_path / "exported")
    reference = LlavaForConditionalGeneration.from_pretrained(exported).eval()
    reference_processor = AutoProcessor.from_pretrained(exported)
    assert type(reference_processor).__name__ == "LlavaProcessor"
    ours = AutoModelForImageTextToText.from_pretrained(converted).eval()
    processor = AutoProcessor.from_pretrained(converted)
    text = "USER: <image>\nWhat is in the image? ASSISTANT:"
    image = photo_like_image(64, 48)
    inputs = processor(images=image, text=text)
    assert torch.equal(
        reference_processor(images=image, text=text, return_tensors="pt")["input_ids"], inputs["input_ids"]
    )
    with torch.no_grad():
        assert torch.equal(reference(**inputs).logits, ours(**inputs).logits)


def test_linear_projector_cannot_export(llava_original, tmp_path):
    _, converted = llava_original(
        projector_type="linear", select_feature="cls_patch", image_aspect_ratio="square", select_layer=-1
    )
    with pytest.raises(NotImplementedError, match="single-linear projector"):
        export_llava(converted, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


# ----------------------------------------------------------------------------------------------------------
# Qwen2-VL conversion


@pytest.mark.parametrize("variant", ["hub-tied", "nested-untied"])
def test_qwen2_vl_export_round_trip_is_bit_exact(qwen2_vl_pair, tmp_path, variant):
    from vlm_patterns.conversion.qwen2_vl import convert_qwen2_vl, export_qwen2_vl

    source, converted = qwen2_vl_pair(variant)
    exported = export_qwen2_vl(converted, tmp_path / "exported")
    assert_same_tensors(all_tensors(exported), all_tensors(source))
    again = convert_qwen2_vl(exported, tmp_path / "again")
    assert_same_tensors(all_tensors(again), all_tensors(converted))


@pytest.mark.parametrize("family", ["qwen2_vl", "fuyu"])
def test_learned_positions_are_not_exported(qwen2_vl_pair, fuyu_pair, tmp_path, family):
    """The learned positions the embedded Qwen2-VL and Fuyu have (Qwen3-VL's, Mono-InternVL's) have no place in
    Qwen2-VL's or Fuyu's Hub layout: refused up front, nothing written."""
    from vlm_patterns.conversion.fuyu import export_fuyu
    from vlm_patterns.conversion.qwen2_vl import export_qwen2_vl

    _, converted = qwen2_vl_pair("hub-tied") if family == "qwen2_vl" else fuyu_pair()
    model = AutoModelForImageTextToText.from_pretrained(converted)
    (model.model.visual if family == "qwen2_vl" else model.model).add_learned_positions(16)
    model.save_pretrained(tmp_path / "ours")
    AutoProcessor.from_pretrained(converted).save_pretrained(tmp_path / "ours")
    export = export_qwen2_vl if family == "qwen2_vl" else export_fuyu
    with pytest.raises(ValueError, match="no place for them"):
        export(tmp_path / "ours", tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


def test_qwen2_vl_exported_folder_serves_with_transformers(qwen2_vl_pair, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from vlm_patterns.conversion.qwen2_vl import export_qwen2_vl

    _, converted = qwen2_vl_pair("nested-untied")
    exported = export_qwen2_vl(converted, tmp_path / "exported")
    reference = Qwen2VLForConditionalGeneration.from_pretrained(exported).eval()
    ours = AutoModelForImageTextToText.from_pretrained(converted).eval()
    processor = AutoProcessor.from_pretrained(converted)
    image = photo_like_image(140, 100)
    reference_pixels = Qwen2VLImageProcessorPil.from_pretrained(exported)(image, return_tensors="pt")
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}], add_generation_prompt=True
    )
    inputs = processor(images=image, text=prompt, return_mm_token_type_ids=True)
    assert torch.equal(reference_pixels["image_grid_thw"], inputs["image_grid_thw"])
    with torch.no_grad():
        ours_logits = ours(**inputs).logits
        assert torch.allclose(reference(**inputs).logits, ours_logits, atol=1e-5)


def test_qwen2_vl_sliding_window_is_refused(qwen2_vl_pair, tmp_path):
    from vlm_patterns.conversion.qwen2_vl import convert_qwen2_vl

    source, _ = qwen2_vl_pair()
    config = json.loads((source / "config.json").read_text())
    broken = tmp_path / "sliding"
    broken.mkdir()
    for path in source.iterdir():
        (broken / path.name).write_bytes(path.read_bytes())
    (broken / "config.json").write_text(json.dumps({**config, "use_sliding_window": True}))
    with pytest.raises(NotImplementedError, match="use_sliding_window"):
        convert_qwen2_vl(broken, tmp_path / "out")


# ----------------------------------------------------------------------------------------------------------
# Fuyu conversion


@pytest.mark.parametrize("variant", ["small-canvas", "wider"])
def test_fuyu_export_round_trip_is_bit_exact(fuyu_pair, tmp_path, variant):
    from vlm_patterns.conversion.fuyu import convert_fuyu, export_fuyu

    source, converted = fuyu_pair(variant)
    exported = export_fuyu(converted, tmp_path / "exported")
    assert_same_tensors(all_tensors(exported), all_tensors(source))  # the fused QKV is re-interleaved exactly
    again = convert_fuyu(exported, tmp_path / "again")
    assert_same_tensors(all_tensors(again), all_tensors(converted))


def test_fuyu_qkv_split_follows_the_per_head_interleaving(fuyu_pair):
    from transformers import FuyuForCausalLM

    source, converted = fuyu_pair()
    reference = FuyuForCausalLM.from_pretrained(source)
    ours = AutoModelForImageTextToText.from_pretrained(converted)
    attention = reference.model.language_model.layers[1].self_attn
    heads, head_dim = attention.config.num_attention_heads, attention.head_dim
    hidden = torch.randn(1, 3, attention.config.hidden_size)
    q, k, v = attention._split_heads(attention.query_key_value(hidden))  # transformers' own split: (1, 3, H, d)
    mine = ours.model.language_model.layers[1].self_attn
    for theirs, projection in ((q, mine.q_proj), (k, mine.k_proj), (v, mine.v_proj)):
        assert torch.allclose(theirs, projection(hidden).view(1, 3, heads, head_dim), atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# IDEFICS conversion


@pytest.mark.parametrize("variant", ["scalar-qk-norm", "vector-instruct", "no-resampler"])
def test_idefics_export_round_trip_is_bit_exact(idefics_pair, tmp_path, variant):
    from vlm_patterns.conversion.idefics import convert_idefics, export_idefics

    source, converted = idefics_pair(variant)
    exported = export_idefics(converted, tmp_path / "exported")
    assert_same_tensors(all_tensors(exported), all_tensors(source))  # the vocabulary is split back exactly
    again = convert_idefics(exported, tmp_path / "again")
    assert_same_tensors(all_tensors(again), all_tensors(converted))


def test_idefics_exported_folder_serves_with_transformers(idefics_pair, tmp_path):
    from transformers import IdeficsForVisionText2Text, IdeficsProcessor

    from vlm_patterns.conversion.idefics import export_idefics
    from vlm_patterns.conversion.verify import idefics_reference_inputs

    source, converted = idefics_pair("vector-instruct")
    exported = export_idefics(converted, tmp_path / "exported")
    rows, prompts = [[photo_like_image(50, 40, 1)]], ["User:<image>What is it?<end_of_utterance>\nAssistant:"]
    inputs = idefics_reference_inputs(exported, rows, prompts)
    assert torch.equal(inputs["input_ids"], idefics_reference_inputs(source, rows, prompts)["input_ids"])
    assert isinstance(IdeficsProcessor.from_pretrained(exported), IdeficsProcessor)
    with torch.no_grad():
        a = IdeficsForVisionText2Text.from_pretrained(exported).eval()(**inputs).logits
        b = IdeficsForVisionText2Text.from_pretrained(source).eval()(**inputs).logits
    assert torch.equal(a, b)


def test_idefics_decoupled_vocabulary_is_concatenated(idefics_pair):
    from safetensors.torch import load_file

    source, converted = idefics_pair()
    hub = load_file(source / "model.safetensors")
    ours = AutoModelForImageTextToText.from_pretrained(converted)
    embed = torch.cat([hub["model.embed_tokens.weight"], hub["model.embed_tokens.additional_embedding.weight"]])
    head = torch.cat([hub["lm_head.weight"], hub["lm_head.additional_fc.weight"]])
    assert torch.equal(ours.get_input_embeddings().weight, embed)
    assert torch.equal(ours.get_output_embeddings().weight, head)
    assert ours.config.image_token_id == embed.shape[0] - 1  # <image> is IDEFICS's last added token


def test_openflamingo_variant_cannot_export_to_idefics(tmp_path):
    from vlm_patterns.conversion.idefics import export_idefics
    from vlm_patterns.conversion.openflamingo import convert_openflamingo
    from vlm_patterns.conversion.tiny import build_tiny_open_flamingo

    checkpoint, clip, llama = build_tiny_open_flamingo(tmp_path / "of")
    converted = convert_openflamingo(checkpoint, tmp_path / "ours", vision=clip, language=llama)
    with pytest.raises(NotImplementedError, match="IDEFICS"):
        export_idefics(converted, tmp_path / "exported")
    assert not (tmp_path / "exported").exists()


# ----------------------------------------------------------------------------------------------------------
# Both ways a source folder keeps its processor settings: the Hub's historical preprocessor_config.json and
# transformers 5.x's processor_config.json with the image (and video) processor nested inside.


def swap_processor_layout(source: Path, folder: Path) -> Path:
    """A copy of `source` with its processor settings in the other layout."""
    import shutil

    shutil.copytree(source, folder)
    legacy = {"image_processor": folder / "preprocessor_config.json",
              "video_processor": folder / "video_preprocessor_config.json"}  # fmt: skip
    combined = folder / "processor_config.json"
    nested = json.loads(combined.read_text()) if combined.exists() else {}
    if any(key in nested for key in legacy):  # 5.x -> historical
        for key, path in legacy.items():
            if key in nested:
                path.write_text(json.dumps(nested.pop(key)))
        combined.write_text(json.dumps(nested))
    else:  # historical -> 5.x, as transformers 5.24's processor save_pretrained writes it
        for key, path in legacy.items():
            if path.exists():
                nested[key] = json.loads(path.read_text())
                path.unlink()
        combined.write_text(json.dumps(nested))
    return folder


@pytest.mark.parametrize("fixture", ["llava_pair", "qwen2_vl_pair", "fuyu_pair", "idefics_pair"])
def test_both_processor_layouts_convert_alike(fixture, request, tmp_path):
    from transformers import AutoProcessor

    from vlm_patterns.families import SOURCE_LAYOUTS

    source, converted = request.getfixturevalue(fixture)()
    family = {"llava_pair": "llava", "qwen2_vl_pair": "qwen2_vl", "fuyu_pair": "fuyu", "idefics_pair": "idefics"}[
        fixture
    ]
    other = swap_processor_layout(source, tmp_path / "other-layout")
    assert (other / "preprocessor_config.json").exists() != (source / "preprocessor_config.json").exists()
    again = SOURCE_LAYOUTS[family][1].convert(other, tmp_path / "converted")
    image = photo_like_image(90, 70)
    first, second = AutoProcessor.from_pretrained(converted), AutoProcessor.from_pretrained(again)
    assert first.image_processor.to_dict() == second.image_processor.to_dict()
    text = first.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}],
        add_generation_prompt=True,
    )
    images = image if family == "fuyu" else [[image]]
    a, b = first(images=images, text=text), second(images=images, text=text)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
