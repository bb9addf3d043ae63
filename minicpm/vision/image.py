"""Images in: opening them as a user expects, MiniCPM-V 2.0's slicing, and pixel values.

Slicing (LLaVA-UHD, as the official `slice_image`): an image of at most scale_resolution^2
pixels is resized, up or down, to about that area with both sides multiples of patch_size and
is used whole. A larger one gets an overview (downscaled the same way) plus a grid of
`cols x rows` tiles: the grid whose aspect ratio is closest to the image's among those with
ceil(area / S^2) - 1, +0 or +1 cells (at most max_slice_nums), the image resized to fit it and
cut row by row. All resizes are Pillow's bicubic on the uint8 RGB image, so the pixels match the
official ones exactly; sizes use Python's round (half to even) and int (truncation) where the
official code does.
"""

from __future__ import annotations

import io
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minicpm.errors import MiniCPMError

# Pillow's own guard against decompression bombs is a warning up to twice this many pixels;
# we refuse above it instead, with a message, and leave smaller images to slicing.
MAX_PIXELS = 178_956_970
MIN_SIDE = 4  # below this an image holds no detail to read; upscaling it to 448 invents all
MAX_ASPECT = 50  # past this a side rounds to one or two patch rows and the other to hundreds


def load_image(image: Any):
    """A PIL RGB image from a PIL image, a path or bytes: EXIF orientation applied, alpha laid
    over white, palette and grayscale converted. Anything unreadable is a MiniCPMError."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if isinstance(image, Image.Image):
        opened = image
    elif isinstance(image, (str, Path, bytes, bytearray)):
        opened = _open(image, Image, UnidentifiedImageError)
    else:
        raise MiniCPMError(f"image must be a PIL image, a file path or bytes, not {type(image).__name__}")
    if getattr(opened, "n_frames", 1) > 1:
        # which frame would be "the image" is a guess; let the user pick one
        raise MiniCPMError(f"animated images are not supported ({opened.n_frames} frames); "
                           "save the frame you mean as a still image")
    check_image_size(opened.size)
    try:
        oriented = ImageOps.exif_transpose(opened)
        return _to_rgb(oriented)
    except (OSError, ValueError, SyntaxError) as e:  # truncated data shows up only when decoding
        raise MiniCPMError(f"cannot read the image: {e}") from None


def _open(source, Image, UnidentifiedImageError):
    in_memory = isinstance(source, (bytes, bytearray))
    name = "the image data" if in_memory else str(source)
    stream = io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else source
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(stream)
            image.load()
        return image
    except FileNotFoundError:
        raise MiniCPMError(f"image file not found: {name}") from None
    except IsADirectoryError:
        raise MiniCPMError(f"{name} is a directory, not an image") from None
    except UnidentifiedImageError as e:
        # Pillow's message names the file, or for bytes a BytesIO object's address
        detail = "no format Pillow knows" if in_memory else str(e)
        raise MiniCPMError(f"{name} is not an image Pillow can read ({detail})") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
        raise MiniCPMError(f"{name} is too large an image ({e})") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise MiniCPMError(f"{name} is not a readable image: {e}") from None


def check_image_size(size: tuple[int, int]) -> None:
    """Refuse sizes MiniCPM-V cannot read sensibly, with a message that says why."""
    width, height = size
    if width < MIN_SIDE or height < MIN_SIDE:
        raise MiniCPMError(f"the image is too small ({width}x{height}); MiniCPM-V needs at least "
                           f"{MIN_SIDE}x{MIN_SIDE} pixels")
    if width * height > MAX_PIXELS:
        raise MiniCPMError(f"the image is too large ({width}x{height}, over {MAX_PIXELS} pixels)")
    ratio = max(width / height, height / width)
    if ratio > MAX_ASPECT:
        raise MiniCPMError(f"the image is {width}x{height}, an aspect ratio of {ratio:.0f}:1; "
                           f"MiniCPM-V reads images up to {MAX_ASPECT}:1 (crop it first)")


def _to_rgb(image):
    """RGB, with any transparency composited over white (RGBA, LA, palette with alpha)."""
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit or float grayscale: scale to 0..255 instead of clipping
        values = np.asarray(image, dtype=np.float64)
        peak = values.max() if values.size and values.max() > 255 else 255.0
        return Image.fromarray((values / peak * 255).clip(0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


# --- slicing, as the official functions (names kept) --------------------------------------------
def ensure_divide(length: float, patch_size: int) -> int:
    return max(round(length / patch_size) * patch_size, patch_size)


def find_best_resize(size: tuple[float, float], scale_resolution: int, patch_size: int,
                     allow_upscale: bool = False) -> tuple[int, int]:
    """(width, height) of about scale_resolution^2 area and the same aspect ratio, multiples of
    patch_size; an image already smaller keeps its size unless allow_upscale."""
    width, height = size
    if width * height > scale_resolution * scale_resolution or allow_upscale:
        ratio = width / height
        height = int(scale_resolution / math.sqrt(ratio))
        width = int(height * ratio)
    return ensure_divide(width, patch_size), ensure_divide(height, patch_size)


def get_refine_size(size: tuple[int, int], grid: list[int], scale_resolution: int, patch_size: int,
                    allow_upscale: bool = False) -> tuple[int, int]:
    """The size the image is resized to before cutting it into grid = [cols, rows] tiles."""
    cols, rows = grid
    cell = (ensure_divide(size[0], cols) / cols, ensure_divide(size[1], rows) / rows)
    cell_w, cell_h = find_best_resize(cell, scale_resolution, patch_size, allow_upscale=allow_upscale)
    return cell_w * cols, cell_h * rows


def split_to_patches(image, grid: list[int]) -> list[list[Any]]:
    """Tiles [row][col] of an image whose sides are grid multiples."""
    width, height = image.size
    tile_w, tile_h = width // grid[0], height // grid[1]
    return [[image.crop((x, y, x + tile_w, y + tile_h)) for x in range(0, width, tile_w)]
            for y in range(0, height, tile_h)]


def best_grid(size: tuple[int, int], max_slice_nums: int, scale_resolution: int) -> list[int] | None:
    """[cols, rows] of the tiles, or None when the image is used whole."""
    width, height = size
    multiple = min(math.ceil(width * height / scale_resolution ** 2), max_slice_nums)
    if multiple <= 1:
        return None
    log_ratio = math.log(width / height)
    counts = [n for n in (multiple - 1, multiple, multiple + 1) if n != 1 and n <= max_slice_nums]
    grids = [[m, n // m] for n in counts for m in range(1, n + 1) if n % m == 0]
    # strictly smaller error wins, so the first of equals is kept
    return min(grids, key=lambda g: abs(log_ratio - math.log(g[0] / g[1])))


def slice_image(image, max_slice_nums: int = 9, scale_resolution: int = 448, patch_size: int = 14):
    """(overview, tiles [row][col], grid [cols, rows] or None), like the official function.

    `image` is a PIL image (RGB for exact pixels: `load_image` gives one)."""
    from PIL import Image

    check_image_size(image.size)
    grid = best_grid(image.size, max_slice_nums, scale_resolution)
    if grid is None:
        size = find_best_resize(image.size, scale_resolution, patch_size, allow_upscale=True)
        return image.resize(size, Image.Resampling.BICUBIC), [], None
    overview = image.resize(find_best_resize(image.size, scale_resolution, patch_size), Image.Resampling.BICUBIC)
    refine = get_refine_size(image.size, grid, scale_resolution, patch_size, allow_upscale=True)
    return overview, split_to_patches(image.resize(refine, Image.Resampling.BICUBIC), grid), grid


def sliced_images(image, config) -> tuple[list[Any], list[int] | None]:
    """The images fed to the model for one input image, in order: the overview, then the tiles
    row by row; and the grid. `config`: a MiniCPMVConfig (slice_mode off: the image whole)."""
    if not config.slice_mode:
        return [image], None
    overview, tiles, grid = slice_image(image, config.max_slice_nums, config.scale_resolution,
                                        config.patch_size)
    return [overview] + [tile for row in tiles for tile in row], grid


def slice_count(size: tuple[int, int], config) -> int:
    """How many images `sliced_images` gives for an image of (width, height), without slicing."""
    grid = best_grid(size, config.max_slice_nums, config.scale_resolution) if config.slice_mode else None
    return 1 if grid is None else 1 + grid[0] * grid[1]


def to_pixel_values(image) -> torch.Tensor:
    """A PIL RGB image -> float32 [3, H, W] normalised with mean = std = 0.5 (timm's inception
    constants): (u8 / 255 - 0.5) / 0.5, as torchvision's ToTensor + Normalize compute it."""
    pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    scaled = pixels.permute(2, 0, 1).float().div(255)
    return (scaled - 0.5) / 0.5
