"""Reading images the way people see them: one function (`read_image`) for every command that opens a file.

* The EXIF orientation is applied (`PIL.ImageOps.exif_transpose`), as image viewers and VLM front ends do:
  a phone photo stored sideways with an orientation tag reaches the model upright, and its size (what the
  padding geometry uses) is the upright one.
* Every PIL mode becomes 8-bit RGB by `to_rgb`: 16-bit and 32-bit grey ("I;16", "I;16B", "I;16L", "I") are
  scaled to 0-255 (65535 -> 255), not clipped (PIL's own `convert("RGB")` clips them, so a 16-bit PNG turns
  almost white); float images ("F") in [0, 1] are scaled by 255; palette, CMYK, alpha and the other modes go
  through PIL's conversion (alpha is dropped).
* An image over PIL's decompression-bomb limit is an `ImageError` naming the file and the limit.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps


class ImageError(ValueError):
    """An image file that cannot be used (the message names it and says why)."""


def _grey_to_bytes(image: Image.Image) -> np.ndarray:
    """(H, W) uint8 from a 16-bit, 32-bit or float grey image, scaled, not clipped: "I;16*" by 255/65535 always;
    "I" and "F" by their range: values within 0..1 (float) times 255, within 0..255 kept, within 0..65535
    taken as 16-bit, larger ones scaled by the maximum (negative values shifted to 0 first)."""
    values = np.asarray(image).astype(np.float64)
    if image.mode.startswith("I;16"):
        scale = 255.0 / 65535.0
    else:
        finite = values[np.isfinite(values)]
        low = float(finite.min()) if finite.size else 0.0
        if low < 0:
            values = values - low
        top = float(finite.max()) - min(low, 0.0) if finite.size else 0.0
        if image.mode == "F" and top <= 1.0:
            scale = 255.0
        elif top <= 255:
            scale = 1.0
        elif top <= 65535:
            scale = 255.0 / 65535.0
        else:
            scale = 255.0 / top
    out = np.nan_to_num(values * scale, nan=0.0, posinf=255.0, neginf=0.0)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB (see the module docstring for how each mode is converted)."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        return Image.fromarray(_grey_to_bytes(image), mode="L").convert("RGB")
    if image.mode in ("P", "PA") and "transparency" in image.info:
        image = image.convert("RGBA")  # PIL warns when converting palette transparency straight to RGB
    try:
        return image.convert("RGB")
    except (ValueError, OSError) as error:
        raise ImageError(f"images in PIL mode {image.mode!r} cannot be converted to RGB ({error})") from None


def read_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path`, upright (EXIF orientation applied) and 8-bit RGB. An `ImageError` naming the file
    for an image over PIL's decompression-bomb limit; PIL's own errors (UnidentifiedImageError, OSError, ...)
    pass through for files that are not images."""
    path = Path(path)
    limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # PIL's lower limit: the image is used
            with Image.open(path) as opened:
                upright = ImageOps.exif_transpose(opened)
                upright.load()
                return to_rgb(upright)
    except Image.DecompressionBombError as error:
        found = re.search(r"(\d+) pixels", str(error))
        size = f"{int(found.group(1)):,} pixels" if found else "the image"
        raise ImageError(
            f"{path}: {size} is over PIL's decompression-bomb limit of {2 * limit:,} pixels "
            "(2 x PIL.Image.MAX_IMAGE_PIXELS): shrink the image, or raise PIL.Image.MAX_IMAGE_PIXELS if you trust it"
        ) from None
    except ImageError as error:
        raise ImageError(f"{path}: {error}") from None


__all__ = ["ImageError", "read_image", "to_rgb"]
