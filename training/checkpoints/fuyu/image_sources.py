"""Where an image's bytes come from: a file path, an http(s) URL, a `data:` URI or a bare base64 string.

These are the string sources transformers' own processors and chat templates accept (`transformers.image_utils.
load_image`), plus `file://` URIs. Only the bytes are fetched here; decoding, with its size checks made from the
header before any pixel is decoded, is `image_ops.load_image`'s job. Each failure is one sentence that names the
source: an unreachable URL, an HTTP error, a body that is not an image, a data URI that is not base64, a missing
or empty file.
"""

import base64
import binascii
import os
import re
from urllib.parse import unquote, urlparse

# Downloads larger than this are refused while they stream, before they fill memory.
MAX_DOWNLOAD_BYTES = 256 * 1024**2
DOWNLOAD_TIMEOUT_SECONDS = 30.0
_BASE64 = re.compile(rb"^[A-Za-z0-9+/\s]+={0,2}\s*$")


class ImageInputError(ValueError):
    """An image that cannot be used: unreachable, unreadable, empty, of an unsupported layout, or outside the limits."""


def describe(source: str, limit: int = 80) -> str:
    """A source as it can be quoted in a message: data URIs and base64 strings are cut short."""
    return repr(source if len(source) <= limit else source[: limit - 3] + "...")


def fetch_url(url: str, timeout: float = DOWNLOAD_TIMEOUT_SECONDS) -> bytes:
    """The body of an http(s) URL, following redirects; a clear error for anything but a 2xx image-sized body."""
    import httpx  # installed with huggingface_hub; imported here so that local files never need it

    try:
        with httpx.stream("GET", url, timeout=timeout, follow_redirects=True) as response:
            if response.status_code >= 400:
                raise ImageInputError(f"Could not fetch the image at {describe(url)}: HTTP {response.status_code}")
            chunks, size = [], 0
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > MAX_DOWNLOAD_BYTES:
                    raise ImageInputError(
                        f"The image at {describe(url)} is larger than {MAX_DOWNLOAD_BYTES // 1024**2} MiB; refused"
                    )
                chunks.append(chunk)
    except httpx.HTTPError as e:
        raise ImageInputError(f"Could not fetch the image at {describe(url)}: {e}") from e
    data = b"".join(chunks)
    if not data:
        raise ImageInputError(f"The image at {describe(url)} is empty (0 bytes)")
    return data


def decode_data_uri(uri: str) -> bytes:
    """`data:image/png;base64,...` -> bytes. Only base64-encoded image data URIs are images."""
    header, comma, payload = uri.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ImageInputError(f"The data URI {describe(uri)} is not base64-encoded data (data:image/...;base64,...)")
    if not header.startswith("data:image/"):
        raise ImageInputError(f"The data URI {describe(uri)} does not hold an image ({header[5:] or 'no type'})")
    return decode_base64(payload, what=f"the data URI {describe(uri)}")


def decode_base64(text: str, what: str) -> bytes:
    try:
        data = base64.b64decode(re.sub(r"\s", "", unquote(text)).encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as e:
        raise ImageInputError(f"{what[0].upper()}{what[1:]} is not valid base64: {e}") from e
    if not data:
        raise ImageInputError(f"{what[0].upper()}{what[1:]} holds no data")
    return data


def read_file(path: str | os.PathLike) -> bytes:
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No image file at {path!r}")
    if os.path.getsize(path) == 0:
        raise ImageInputError(f"The image file {path!r} is empty (0 bytes)")
    with open(path, "rb") as f:
        return f.read()


def read_source(source: str | os.PathLike) -> tuple[bytes, str]:
    """The bytes a string or path source names, and how to name it in a message.

    Order, as transformers' `load_image`: an http(s) URL; an existing file; a `data:` URI or a base64 string.
    A string that is none of these is reported as a missing file, with the forms that are accepted.
    """
    if isinstance(source, os.PathLike):
        return read_file(source), repr(os.fspath(source))
    if source.startswith(("http://", "https://")):
        return fetch_url(source), describe(source)
    if source.startswith("file://"):
        path = unquote(urlparse(source).path)
        return read_file(path), repr(path)
    if source.startswith("data:"):
        return decode_data_uri(source), describe(source)
    if os.path.isfile(source):
        return read_file(source), repr(source)
    if len(source) >= 64 and _BASE64.match(source.encode("ascii", "replace")):
        return decode_base64(source, what="the base64 image string"), "the base64 image string"
    raise FileNotFoundError(
        f"No image file at {describe(source)} (an image given as a string must be a file path, an http(s) URL, "
        "a data:image/...;base64 URI or a base64 string)"
    )
