"""Opening images safely: every format Pillow reads, upright, RGB, with a decompression-bomb guard.

Photos from phones carry their rotation in EXIF (the original project rotated images by hand);
`ImageOps.exif_transpose` applies it. A file that cannot be decoded raises `ImageError` with the
reason, so callers can skip and report it instead of crashing.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageFile, ImageOps

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_PIXELS = 64_000_000  # 8000x8000; beyond this a file is treated as a decompression bomb

ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(Exception):
    """An image that cannot be used; the message is the reason, fit for a report."""


def is_image_path(path: Path) -> bool:
    path = Path(path)
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def open_image(path: Path) -> Image.Image:
    """The fully decoded RGB image at `path`, rotated upright; raises ImageError."""
    path = Path(path)
    try:
        if path.is_dir():
            raise ImageError("is a directory")
        if not path.exists():
            raise ImageError("missing file")
        if path.stat().st_size == 0:
            raise ImageError("empty file (0 bytes)")
    except OSError as e:  # a name too long for the file system, a permission problem, ...
        raise ImageError(f"cannot read: {e.strerror or e}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                if img.width * img.height > MAX_PIXELS:
                    raise ImageError(f"too large ({img.width}x{img.height}): possible decompression bomb")
                if img.width < 1 or img.height < 1:
                    raise ImageError("zero-sized image")
                img.seek(0)  # first frame of an animated GIF / WebP
                img.load()
                img = ImageOps.exif_transpose(img)
                return to_rgb(img)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"possible decompression bomb ({e})") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"cannot decode: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB, compositing transparency onto white (a black background would invent dark scenes)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits instead of clipping everything to white. A 16-bit
        # mode is always out of 65535, however dark the picture; a 32-bit "I" image (older
        # Pillows open 16-bit PNGs so) is taken as 16-bit only when it uses values above 255.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        sixteen = img.mode != "I" or arr.max() > 255
        scale = 255.0 / 65535.0 if sixteen else 1.0
        return Image.fromarray((arr * scale).round().clip(0, 255).astype("uint8")).convert("RGB")
    return img.convert("RGB")
