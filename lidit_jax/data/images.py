"""Image decoding, validation, bucket list parsing, resize and center crop; uint8 images, grids
and PNG files out.

Bad inputs raise BadRecord with the reason; the pipeline skips and counts them.
"""
import io
import warnings

import numpy as np
from PIL import Image

from lidit_jax import paths

MIN_SIDE = 8  # Smaller images (1x1 thumbnails, tracking pixels) are not training data.
MAX_PIXELS = 64 * 1024 * 1024  # Larger ones are corrupt headers or decompression bombs.


class BadRecord(ValueError):
    """A record that cannot be used (undecodable image, bad caption, missing field)."""


def parse_buckets(spec, image_size):
    """'HxW,HxW' -> [(H, W), ...]; empty -> [(image_size, image_size)]."""
    if not spec:
        return [(image_size, image_size)]
    buckets = []
    for item in spec.split(","):
        try:
            height, width = (int(v) for v in item.strip().lower().split("x"))
        except ValueError:
            raise ValueError(f"data.buckets entry {item!r} is not HxW (e.g. '512x512,448x576')")
        if height <= 0 or width <= 0:
            raise ValueError(f"data.buckets entry {item!r} must have positive sides")
        buckets.append((height, width))
    return buckets


def decode(image_bytes):
    """Encoded image bytes -> uint8 [H, W, 3] RGB; raises BadRecord for anything unusable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(image_bytes))
            width, height = image.size
            check_size(height, width)
            image = image.convert("RGB")  # Forces the full decode: truncated files fail here.
    except BadRecord:
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as error:
        raise BadRecord(f"undecodable image: {error}") from None
    return np.asarray(image)


def check_caption(caption):
    """str or UTF-8 bytes -> str; raises BadRecord for non-UTF-8, non-text or blank captions."""
    if isinstance(caption, bytes):
        try:
            caption = caption.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRecord("caption is not UTF-8") from None
    if not isinstance(caption, str) or not caption.strip():
        raise BadRecord(f"empty or non-text caption {caption!r}")
    return caption


def check_array(image):
    """A decoded image array must be uint8 [H, W, 3] of a sensible size."""
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
        raise BadRecord(f"image array {image.dtype} {image.shape} is not uint8 [H, W, 3]")
    check_size(*image.shape[:2])


def check_size(height, width):
    if min(height, width) < MIN_SIDE:
        raise BadRecord(f"image {height}x{width} is smaller than {MIN_SIDE} px")
    if height * width > MAX_PIXELS:
        raise BadRecord(f"image {height}x{width} has more than {MAX_PIXELS} pixels")


def resize_center_crop(image, height, width):
    """uint8 [h, w, 3] -> uint8 [height, width, 3]: scale to cover, then crop the center."""
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    scale = max(height / h, width / w)
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.BICUBIC,
                                                       reducing_gap=3.0))
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return resized[top:top + height, left:left + width]


def to_model_range(image):
    """uint8 [..., 3] -> float32 in [-1, 1]."""
    return image.astype(np.float32) / 127.5 - 1.0


def to_uint8(pixels):
    """Decoded pixels [..., C] in [-1, 1] (any float array) -> uint8, rounded and clipped: the
    inverse of `to_model_range`, for every image the project writes or scores."""
    return np.clip((np.asarray(pixels, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def image_grid(images, columns=None):
    """[n, H, W, C] uint8 (`to_uint8`) -> one uint8 [rows*H, columns*W, 3] grid."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise TypeError(f"image_grid takes uint8 images (data.images.to_uint8), got {images.dtype}")
    n, height, width, channels = images.shape
    if channels == 1:
        images = np.repeat(images, 3, axis=-1)
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.zeros((rows * height, columns * width, 3), np.uint8)
    pixels = images[..., :3]
    for i in range(n):
        r, c = divmod(i, columns)
        grid[r * height:(r + 1) * height, c * width:(c + 1) * width] = pixels[i]
    return grid


def save_png(path, image_uint8, upscale=1):
    """Writes a PNG to a local or remote path."""
    image = Image.fromarray(image_uint8)
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path = paths.path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
