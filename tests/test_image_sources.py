"""Images from anywhere transformers takes them (paths, http(s) URLs, data URIs, base64, chat messages, the
pipeline), read upright (EXIF) and by their real range (16-bit, float), with limits checked before decoding and
one clear sentence for each bad source."""

import base64
import functools
import http.server
import io
import threading
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch

from vlm_patterns.families import FAMILIES as REGISTRY  # noqa: E402
from vlm_patterns.processing import ImageInputError, load_image
from vlm_patterns.processing.image_ops import flatten_images

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINTS = ROOT / "training" / "checkpoints"
FAMILIES = list(REGISTRY)  # the registry's families


def png_bytes(image: PIL.Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=save.pop("format", "PNG"), **save)
    return buffer.getvalue()


def photo(width: int = 64, height: int = 40, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A local http server over a folder with a PNG, a JPEG rotated by EXIF, and a text file."""
    folder = tmp_path_factory.mktemp("served")
    (folder / "photo.png").write_bytes(png_bytes(photo()))
    upright = photo(24, 56, seed=1)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    stored = upright.transpose(PIL.Image.Transpose.ROTATE_90)  # as a phone stores it: sideways
    (folder / "phone.jpg").write_bytes(png_bytes(stored, format="JPEG", exif=exif, quality=95))
    (folder / "notes.txt").write_text("not an image")
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_every_string_source_gives_the_pixels_of_the_pil_image(served):
    folder, url = served
    data = (folder / "photo.png").read_bytes()
    expected = np.asarray(PIL.Image.open(folder / "photo.png").convert("RGB"))
    encoded = base64.b64encode(data).decode()
    for source in [
        str(folder / "photo.png"),
        folder / "photo.png",
        f"file://{folder / 'photo.png'}",
        f"{url}/photo.png",
        f"data:image/png;base64,{encoded}",
        encoded,
        data,
    ]:
        np.testing.assert_array_equal(load_image(source), expected, err_msg=str(source)[:60])


def test_exif_orientation_is_applied_like_transformers(served):
    from transformers.image_utils import load_image as transformers_load_image

    folder, url = served
    reference = np.asarray(transformers_load_image(str(folder / "phone.jpg")))
    assert reference.shape[:2] == (56, 24)  # upright: tall
    for source in (str(folder / "phone.jpg"), f"{url}/phone.jpg", PIL.Image.open(folder / "phone.jpg")):
        np.testing.assert_array_equal(load_image(source), reference)


def test_bad_sources_get_one_sentence_naming_them(served):
    _, url = served
    cases = {
        f"{url}/missing.png": "HTTP 404",
        f"{url}/notes.txt": "is not a readable image",
        "http://127.0.0.1:9/closed.png": "Could not fetch the image at 'http://127.0.0.1:9/closed.png'",
        "data:image/png;base64,@@@@": "is not valid base64",
        "data:text/plain;base64,aGVsbG8=": "does not hold an image",
        "data:image/png;base64," + base64.b64encode(b"garbage" * 20).decode(): "is not a readable image",
    }
    for source, message in cases.items():
        with pytest.raises(ImageInputError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_image(source)
    with pytest.raises(FileNotFoundError, match="No image file at 'nowhere.png'"):
        load_image("nowhere.png")


def test_high_bit_depth_and_float_images_keep_their_range():
    ramp = (np.arange(32 * 64).reshape(32, 64) * 31).astype(np.uint16)  # 0 .. 63457
    sixteen_bit = PIL.Image.open(io.BytesIO(png_bytes(PIL.Image.fromarray(ramp))))
    assert sixteen_bit.mode.startswith("I")
    rgb = load_image(sixteen_bit)
    np.testing.assert_array_equal(rgb[..., 0], np.round(ramp / 257).astype(np.uint8))
    assert (rgb == 255).mean() < 0.01  # not saturated

    values = np.linspace(0, 1, 20 * 30, dtype=np.float32).reshape(20, 30)
    tiff = PIL.Image.open(io.BytesIO(png_bytes(PIL.Image.fromarray(values), format="TIFF")))
    assert tiff.mode == "F"
    np.testing.assert_array_equal(load_image(tiff)[..., 1], np.round(values * 255).astype(np.uint8))

    np.testing.assert_array_equal(load_image(ramp)[..., 2], np.round(ramp / 257).astype(np.uint8))
    with pytest.raises(ImageInputError, match="NaN or infinite"):
        load_image(np.full((8, 8, 3), np.nan, np.float32))
    with pytest.raises(ImageInputError, match="floats from -1 to 2"):
        load_image(np.linspace(-1, 2, 48, dtype=np.float32).reshape(4, 4, 3))
    with pytest.raises(ImageInputError, match="integers from -5"):
        load_image(np.full((4, 4), -5, np.int32))


def test_limits_are_checked_before_decoding(monkeypatch):
    big = png_bytes(PIL.Image.new("L", (12000, 12000)), optimize=True)
    decoded = []
    original_load = PIL.ImageFile.ImageFile.load
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", lambda self: decoded.append(1) or original_load(self))
    with pytest.raises(ImageInputError, match="12000x12000 = 144000000 pixels, above the limit"):
        load_image(big)
    assert not decoded
    with pytest.raises(ImageInputError, match="10000x10000 = 100000000 pixels"):
        load_image(np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), (10000, 10000, 3), (0, 0, 0)))


def test_a_none_among_the_images_is_refused_everywhere():
    a, b, c = photo(seed=1), photo(seed=2), photo(seed=3)
    with pytest.raises(ImageInputError, match=r"images\[0\]\[1\] is None"):
        flatten_images([[a, None], [b, c]])
    from transformers import AutoProcessor

    import vlm_patterns  # noqa: F401  (registers the Auto classes)

    flamingo = AutoProcessor.from_pretrained(CHECKPOINTS / "flamingo")
    with pytest.raises(ImageInputError, match="is None"):
        flamingo(images=[[a, None], [b, c]], text=["<image><image> one", "<image><image> two"])


@pytest.mark.parametrize("family", FAMILIES)
def test_chat_messages_take_urls_data_uris_and_image_urls(served, shipped, family):
    folder, url = served
    _, processor = shipped[family]
    question = {"type": "text", "text": "What color is the square?"}
    data_uri = "data:image/png;base64," + base64.b64encode((folder / "photo.png").read_bytes()).decode()
    sources = [
        {"type": "image", "image": PIL.Image.open(folder / "photo.png")},
        {"type": "image", "url": f"{url}/photo.png"},
        {"type": "image", "path": str(folder / "photo.png")},
        {"type": "image", "url": data_uri},
        {"type": "image_url", "image_url": {"url": f"{url}/photo.png"}},  # OpenAI's shape
        {"type": "image", "base64": base64.b64encode((folder / "photo.png").read_bytes()).decode()},
    ]
    outputs = []
    for part in sources:
        messages = [{"role": "user", "content": [part, question]}]
        outputs.append(
            processor.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=True)
        )
    for output in outputs[1:]:
        assert torch.equal(output["input_ids"], outputs[0]["input_ids"])
        assert torch.equal(output["pixel_values"], outputs[0]["pixel_values"])
    direct = processor(images=[[f"{url}/photo.png"]] if family != "fuyu" else f"{url}/photo.png",
                       text=processor.apply_chat_template([{"role": "user", "content": [sources[0], question]}],
                                                          add_generation_prompt=True))  # fmt: skip
    assert torch.equal(direct["pixel_values"], outputs[0]["pixel_values"])


@pytest.mark.parametrize("family", FAMILIES)
def test_the_pipeline_answers_from_a_url(served, shipped, family):
    from transformers import pipeline

    _, url = served
    model, processor = shipped[family]
    pipe = pipeline("image-text-to-text", model=model, processor=processor)
    messages = [{"role": "user", "content": [{"type": "image", "url": f"{url}/photo.png"},
                                             {"type": "text", "text": "What color is the square?"}]}]  # fmt: skip
    by_url = pipe(text=messages, max_new_tokens=3)
    local = [{"role": "user", "content": [{"type": "image", "image": PIL.Image.open(served[0] / "photo.png")},
                                          {"type": "text", "text": "What color is the square?"}]}]  # fmt: skip
    assert by_url[0]["generated_text"][-1] == pipe(text=local, max_new_tokens=3)[0]["generated_text"][-1]
    assert by_url[0]["generated_text"][-1]["content"].strip()


def test_every_pil_mode_is_read_or_refused_by_name():
    base = photo(8, 8)
    for mode in ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "RGBX", "RGBa",
                 "La"]:  # fmt: skip
        image = base.convert("RGBA").convert(mode) if mode in ("RGBa", "La", "PA") else base.convert(mode)
        rgb = load_image(image)
        assert rgb.dtype == np.uint8 and rgb.shape == (8, 8, 3), mode
    for mode, dtype in [("I;16", "<u2"), ("I;16B", ">u2"), ("I;16L", "<u2")]:
        image = PIL.Image.frombytes(mode, (4, 4), np.full(16, 1000, dtype).tobytes())
        assert (load_image(image) == 4).all(), mode  # 1000 / 257, not clipped to 255
