"""Images in chat messages: reading `image_url` parts within the server's limits.

An image part's URL is a `data:image/<type>;base64,<data>` URL; an `http(s)` URL is fetched only
when the server was started with `--allow-remote-images` (fetching lets any client make the
server open connections, to internal addresses too). Limits, checked before the work they
guard: images per request (400), bytes per image (413: the base64 length says the size before
anything is decoded; a fetch stops reading past it), pixels per image (413: read from the
image's header, before its pixels are decoded). Whatever is not a readable image is a 400
that says why.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass

from minicpm.errors import MiniCPMError
from minicpm.serving.api_errors import ApiError
from minicpm.vision.image import load_image

DATA_URL = re.compile(r"data:(?P<type>[^;,]*)(?P<params>(;[^;,]*)*),", re.I)
FETCH_TIMEOUT_S = 10


@dataclass(frozen=True)
class ImageLimits:
    max_images: int = 4  # per request
    max_bytes: int = 20 * 1024 * 1024  # per image, encoded (PNG, JPEG, ...)
    max_pixels: int = 50_000_000  # per image, width x height
    allow_remote: bool = False  # fetch http(s) URLs

    @property
    def max_body_bytes(self) -> int:
        """The largest request body worth reading: every image at the byte limit, in base64,
        and a megabyte of text."""
        return self.max_images * -(-self.max_bytes * 4 // 3) + 2**20


def read_images(urls: dict[int, list[str]], limits: ImageLimits) -> dict[int, list]:
    """PIL RGB images by message index, for the image URLs of a request (blocking: run it in a
    worker thread)."""
    count = sum(len(found) for found in urls.values())
    if count > limits.max_images:
        raise ApiError(400, f"The request has {count} images; this server takes at most {limits.max_images} "
                            "per request (--max-images).", param="messages", code="too_many_images")
    return {i: [read_image(url, limits, f"messages.{i}.content") for url in found] for i, found in urls.items()}


def read_image(url: str, limits: ImageLimits, param: str):
    data = _fetch(url, limits, param) if re.match(r"https?://", url, re.I) else _data_url_bytes(url, limits, param)
    _check_pixels(data, limits, param)
    try:
        return load_image(data)
    except MiniCPMError as exc:
        raise ApiError(400, f"Invalid image: {exc}.", param=param, code="invalid_image") from None


def _data_url_bytes(url: str, limits: ImageLimits, param: str) -> bytes:
    found = DATA_URL.match(url)
    if found is None:
        scheme = url.split(":", 1)[0][:20] if ":" in url else ""
        what = f"a '{scheme}:' URL" if scheme else "not a URL"
        raise ApiError(400, f"Invalid image URL ({what}): send the image inline as a "
                            "'data:image/<type>;base64,...' URL.", param=param, code="invalid_image_url")
    media_type = found["type"].lower()
    if not media_type.startswith("image/"):
        raise ApiError(400, f"The data URL holds '{media_type or 'text/plain'}', not an image "
                            "(expected data:image/<type>;base64,...).", param=param, code="invalid_image")
    if "base64" not in found["params"].lower().split(";"):
        raise ApiError(400, "The image data URL must be base64-encoded (data:image/<type>;base64,...).",
                       param=param, code="invalid_image_url")
    payload = url[found.end():].strip()
    declared = len(payload) * 3 // 4  # what it decodes to, within two bytes: known before decoding
    if declared > limits.max_bytes:
        raise too_large(f"The image is {declared:,} bytes", limits, param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "The image data URL is not valid base64.", param=param, code="invalid_image") from None


def _fetch(url: str, limits: ImageLimits, param: str) -> bytes:
    if not limits.allow_remote:
        raise ApiError(400, "Image URLs are not fetched by this server: send the image inline as a "
                            "'data:image/<type>;base64,...' URL (or start the server with --allow-remote-images).",
                       param=param, code="remote_image_refused")
    shown = url if len(url) <= 80 else url[:77] + "..."
    try:
        with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > limits.max_bytes:
                raise too_large(f"The image at {shown} is {int(length):,} bytes", limits, param)
            data = response.read(limits.max_bytes + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ApiError(400, f"Cannot fetch the image {shown}: {reason}.", param=param,
                       code="image_fetch_failed") from None
    if len(data) > limits.max_bytes:
        raise too_large(f"The image at {shown} is over {limits.max_bytes:,} bytes", limits, param)
    return data


def _check_pixels(data: bytes, limits: ImageLimits, param: str) -> None:
    """Refuse an image whose header declares too many pixels, before decoding them."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(data)).size  # reads the header only
    except Image.DecompressionBombError:
        width = height = None
    except (OSError, ValueError, SyntaxError):  # not an image at all: load_image says so in its words
        return
    if width is None or width * height > limits.max_pixels:
        size = "" if width is None else f" ({width}x{height}, {width * height:,} pixels)"
        raise ApiError(413, f"The image is too large{size}: this server takes at most {limits.max_pixels:,} "
                            "pixels per image (--max-image-pixels).", param=param, code="image_too_large")


def too_large(what: str, limits: ImageLimits, param: str) -> ApiError:
    return ApiError(413, f"{what}: this server takes at most {limits.max_bytes:,} bytes per image "
                         "(--max-image-bytes).", param=param, code="image_too_large")
