"""Bad and unusual image files, through the real loader (`store.images.open_image`) and
through `python cli.py prepare`: each one either loads upright and RGB with the right pixels, or
is refused with a reason that lands in prepare_report.json while the run goes on."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from cli import main
from store.images import ImageError, is_image_path, open_image
from store.manifest import MANIFEST_NAME, REPORT_NAME, read_manifest

ROOT = Path(__file__).resolve().parent.parent
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# --- building the files ------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bytes(array: np.ndarray, bit_depth: int, colour_type: int) -> bytes:
    """A PNG written by hand, for what Pillow will not write (16-bit colour) or must not check."""
    height, width = array.shape[:2]
    dtype = ">u2" if bit_depth == 16 else "u1"
    raw = b"".join(b"\x00" + array[y].astype(dtype).tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw)) + _chunk(b"IEND", b"")


def png_claiming_size(path: Path, width: int, height: int) -> Path:
    """A 60-byte PNG whose header declares width x height RGB pixels and holds none of them."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(b"")) + _chunk(b"IEND", b"")
    )
    return path


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def upright_quadrants(width: int = 48, height: int = 32) -> np.ndarray:
    """An asymmetric picture: red top-left, green top-right, blue bottom-left, white bottom-right."""
    array = np.zeros((height, width, 3), np.uint8)
    array[: height // 2, : width // 2] = RED
    array[: height // 2, width // 2 :] = GREEN
    array[height // 2 :, : width // 2] = BLUE
    array[height // 2 :, width // 2 :] = WHITE
    return array


# How a camera stores the upright picture U for each EXIF Orientation value, written from the
# EXIF 2.3 definitions ("the 0th row is the visual right-hand side, the 0th column the visual
# top" for 6, ...) with numpy, independently of Pillow's own table.
STORED_AS = {
    1: lambda u: u,
    2: lambda u: u[:, ::-1],  # mirrored left-right
    3: lambda u: np.rot90(u, 2),
    4: lambda u: u[::-1, :],  # mirrored top-bottom
    5: lambda u: u.transpose(1, 0, 2),
    6: lambda u: np.rot90(u, 1),  # the phone held upright: display needs 90 degrees clockwise
    7: lambda u: np.rot90(u, 2).transpose(1, 0, 2),
    8: lambda u: np.rot90(u, -1),
}


def quadrant_colours(image: Image.Image) -> list[tuple[int, int, int]]:
    """Colours at the centres of the top-left, top-right, bottom-left, bottom-right quadrants."""
    w, h = image.size
    return [image.getpixel((x, y)) for y in (h // 4, 3 * h // 4) for x in (w // 4, 3 * w // 4)]


def close(a, b, tolerance: int = 40) -> bool:
    return all(abs(x - y) <= tolerance for x, y in zip(a, b, strict=True))


# --- files that must load, with the right size, mode and pixels --------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_rotated_jpeg_comes_out_upright(tmp_path, orientation):
    stored = np.ascontiguousarray(STORED_AS[orientation](upright_quadrants()))
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "photo.jpg"
    Image.fromarray(stored).save(path, quality=95, exif=exif)
    assert Image.open(path).getexif()[0x0112] == orientation

    image = open_image(path)
    assert image.mode == "RGB" and image.size == (48, 32)  # landscape again, whatever was stored
    colours = quadrant_colours(image)
    for got, want in zip(colours, (RED, GREEN, BLUE, WHITE), strict=True):
        assert close(got, want), (orientation, colours)


def test_exif_rotation_also_applies_to_png_and_webp(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = Image.fromarray(np.ascontiguousarray(np.rot90(upright_quadrants(), 1)))
    for name, options in (("p.png", {}), ("p.webp", {"lossless": True})):
        stored.save(tmp_path / name, exif=exif, **options)
        image = open_image(tmp_path / name)
        assert image.size == (48, 32) and quadrant_colours(image) == [RED, GREEN, BLUE, WHITE]


def test_png_named_jpg_loads(tmp_path):
    path = tmp_path / "really_a_png.jpg"
    path.write_bytes(encoded(Image.new("RGB", (5, 3), (10, 20, 30)), "PNG"))
    image = open_image(path)
    assert image.size == (5, 3) and image.getpixel((4, 2)) == (10, 20, 30)  # lossless: exact


def test_cmyk_jpeg_becomes_rgb_with_the_right_colours(tmp_path):
    path = tmp_path / "print.jpg"
    cmyk = Image.new("CMYK", (16, 8), (0, 255, 255, 0))  # no cyan, full magenta and yellow
    cmyk.paste((255, 0, 255, 0), (8, 0, 16, 8))  # right half: cyan and yellow
    cmyk.save(path, quality=95)
    assert Image.open(path).mode == "CMYK"
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (16, 8)
    assert close(image.getpixel((3, 4)), RED) and close(image.getpixel((12, 4)), GREEN)


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    levels = np.array([[0, 200, 32896, 65535]], np.uint16).repeat(2, axis=0)
    path = tmp_path / "grey16.png"
    path.write_bytes(png_bytes(levels, 16, 0))
    assert Image.open(path).mode.startswith("I;16")
    image = open_image(path)
    assert image.mode == "RGB" and image.size == (4, 2)
    # 200/65535 is black, not the 8-bit grey 200; half scale is mid grey, full scale white
    assert [image.getpixel((x, 0)) for x in range(4)] == [(0, 0, 0), (1, 1, 1), (128, 128, 128), (255, 255, 255)]


def test_16_bit_colour_and_alpha_pngs(tmp_path):
    rgb = np.zeros((2, 3, 3), np.uint16)
    rgb[..., 0], rgb[..., 2] = 65535, 32896
    (tmp_path / "rgb48.png").write_bytes(png_bytes(rgb, 16, 2))
    assert open_image(tmp_path / "rgb48.png").getpixel((1, 1)) == (255, 0, 128)

    rgba = np.zeros((2, 3, 4), np.uint16)
    rgba[..., 1] = 65535  # green, fully transparent ...
    rgba[0, 0] = (0, 0, 65535, 65535)  # ... except one opaque blue pixel
    (tmp_path / "rgba64.png").write_bytes(png_bytes(rgba, 16, 6))
    image = open_image(tmp_path / "rgba64.png")
    assert image.mode == "RGB" and image.getpixel((0, 0)) == BLUE
    assert image.getpixel((2, 1)) == WHITE  # transparency on white, not the hidden green


def test_palette_png_with_transparency_is_composited_on_white(tmp_path):
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, *BLUE] + [0] * 762)  # index 0 black (transparent), 1 blue
    palette.putpixel((0, 0), 1)
    palette.save(tmp_path / "p.png", transparency=0)
    image = open_image(tmp_path / "p.png")
    assert image.mode == "RGB" and image.size == (4, 4)
    assert image.getpixel((0, 0)) == BLUE and image.getpixel((3, 3)) == WHITE  # not black


@pytest.mark.parametrize("name, options", [("a.gif", {}), ("a.png", {}), ("a.webp", {"lossless": True})])
def test_animated_image_gives_its_first_frame(tmp_path, name, options):
    frames = [Image.new("RGB", (6, 4), colour) for colour in (RED, BLUE, GREEN)]
    frames[0].save(tmp_path / name, save_all=True, append_images=frames[1:], duration=50, **options)
    assert Image.open(tmp_path / name).n_frames == 3
    image = open_image(tmp_path / name)
    assert image.mode == "RGB" and image.size == (6, 4) and image.getpixel((3, 2)) == RED


def test_one_pixel_image(tmp_path):
    Image.new("RGB", (1, 1), (9, 8, 7)).save(tmp_path / "dot.png")
    image = open_image(tmp_path / "dot.png")
    assert image.size == (1, 1) and image.getpixel((0, 0)) == (9, 8, 7)


# --- files that must be refused with a reason --------------------------------------------------


@pytest.mark.parametrize(
    "fmt, options", [("JPEG", {}), ("JPEG", {"progressive": True}), ("PNG", {}), ("GIF", {}), ("WEBP", {}), ("BMP", {})]
)
def test_a_cut_file_is_refused_or_complete_never_half_an_image(tmp_path, fmt, options):
    """Cut the file at every third byte: each prefix either raises ImageError or (when only
    trailing bytes after the pixel data are lost) gives exactly the full image's pixels."""
    original = Image.effect_noise((24, 16), 60).convert("RGB")
    data = encoded(original, fmt, **options)
    (tmp_path / "full").write_bytes(data)
    full = np.asarray(open_image(tmp_path / "full"))
    refused = 0
    for cut in [*range(0, len(data), 3), len(data) - 1]:
        path = tmp_path / f"cut.{fmt.lower()}"
        path.write_bytes(data[:cut])
        try:
            image = open_image(path)
        except ImageError as e:
            assert str(e)  # a reason fit for the report
            refused += 1
            continue
        assert np.array_equal(np.asarray(image), full), f"{fmt} cut at {cut}/{len(data)}"
    assert refused >= len(data) // 3 - 10  # almost every cut is refused


def test_truncated_jpeg_reason_says_truncated(tmp_path):
    data = encoded(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    (tmp_path / "half.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="(?i)truncated"):
        open_image(tmp_path / "half.jpg")


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty file (0 bytes)"),
        (lambda p: p.write_text("I am a caption, not a photo\n"), "cannot decode: cannot identify image"),
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: None, "missing file"),
    ],
)
def test_unusable_files_raise_image_error_with_the_reason(tmp_path, make, reason):
    path = tmp_path / "photo.jpg"
    make(path)
    with pytest.raises(ImageError) as error:
        open_image(path)
    assert str(error.value).startswith(reason)


def test_directory_named_like_an_image_is_not_an_image_path(tmp_path):
    (tmp_path / "foo.jpg").mkdir()
    Image.new("RGB", (2, 2)).save(tmp_path / "bar.jpg")
    assert not is_image_path(tmp_path / "foo.jpg") and is_image_path(tmp_path / "bar.jpg")


def test_name_too_long_for_the_file_system_is_a_reason_not_a_crash(tmp_path):
    with pytest.raises(ImageError, match="cannot read: File name too long"):
        open_image(tmp_path / ("x" * 5000 + ".jpg"))


@pytest.mark.parametrize(
    "width, height, why",
    [
        (20000, 20000, "decompression bomb"),  # over Pillow's own limit
        (9000, 9000, "too large (9000x9000)"),  # under Pillow's limit, over légende's 64 Mpx
    ],
)
def test_decompression_bomb_header_is_refused(tmp_path, width, height, why):
    with pytest.raises(ImageError, match="bomb") as error:
        open_image(png_claiming_size(tmp_path / "bomb.png", width, height))
    assert why in str(error.value)


def test_decompression_bombs_are_refused_without_allocating_their_pixels(tmp_path):
    """In a fresh process: refusing both headers must not grow its peak memory by the 240 MB
    (9000x9000 RGB) or 1.2 GB (20000x20000) that decoding them would take."""
    paths = [png_claiming_size(tmp_path / f"bomb{n}.png", n, n) for n in (9000, 20000)]
    script = (
        "import resource, sys\n"
        "from store.images import ImageError, open_image\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        open_image(path)\n"
        "        print('LOADED', path)\n"
        "    except ImageError as e:\n"
        "        print('REFUSED', e)\n"
        "print('GROWTH_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, *map(str, paths)], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["REFUSED", "REFUSED", "GROWTH_KB"]
    assert int(lines[-1].split()[1]) < 50_000  # kB: nothing near the pixel buffers


# --- the same files through `python cli.py prepare` --------------------------------------------


def test_prepare_keeps_every_loadable_oddity_and_reports_every_bad_file(tmp_path, tiny_images):
    """One dataset holding each kind of odd file: the command succeeds, the manifest holds the
    loadable ones, and the report names each unusable one with its reason."""
    data = tmp_path / "data"
    tiny_images(data / "images", [f"plain{i}.png" for i in range(8)])
    images = data / "images"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.ascontiguousarray(np.rot90(upright_quadrants(), 1))).save(images / "rotated.jpg", exif=exif)
    (images / "png_named.jpg").write_bytes(encoded(Image.new("RGB", (5, 3), RED), "PNG"))
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(images / "cmyk.jpg")
    (images / "grey16.png").write_bytes(png_bytes(np.full((4, 4), 40000, np.uint16), 16, 0))
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0, *BLUE] + [0] * 762)
    palette.save(images / "palette.png", transparency=0)
    frames = [Image.new("RGB", (6, 4), colour) for colour in (RED, BLUE)]
    frames[0].save(images / "anim.gif", save_all=True, append_images=frames[1:])
    Image.new("RGB", (1, 1), GREEN).save(images / "dot.png")
    good = ["rotated.jpg", "png_named.jpg", "cmyk.jpg", "grey16.png", "palette.png", "anim.gif", "dot.png"]

    jpeg = encoded(Image.effect_noise((64, 64), 50).convert("RGB"), "JPEG")
    (images / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (images / "zero.jpg").write_bytes(b"")
    (images / "text.jpg").write_text("not a photo")
    png_claiming_size(images / "bomb.png", 20000, 20000)
    (images / "folder.jpg").mkdir()
    bad = {
        "truncated.jpg": "truncated",
        "zero.jpg": "empty file (0 bytes)",
        "text.jpg": "cannot identify image file",
        "bomb.png": "decompression bomb",
        "folder.jpg": "is a directory",
    }

    rows = ["image,caption"]
    rows += [f"images/plain{i}.png,a plain square number {i}" for i in range(8)]
    rows += [f"images/{name},a picture called {name.split('.')[0]}" for name in [*good, *bad]]
    (data / "captions.csv").write_text("\n".join(rows) + "\n")

    result = CliRunner().invoke(main, ["prepare", str(data), "--out", str(tmp_path / "work"), "--min-word-count", "1"])
    assert result.exit_code == 0, result.output
    kept = {r.id: r for r in read_manifest(tmp_path / "work")}
    assert set(kept) == {f"images/plain{i}.png" for i in range(8)} | {f"images/{n}" for n in good}
    report = json.loads((tmp_path / "work" / REPORT_NAME).read_text())
    reasons = {e["image"]: (e["rule"], e["reason"]) for e in report["dropped_images"]}
    assert set(reasons) == {f"images/{name}" for name in bad}
    for name, why in bad.items():
        rule, reason = reasons[f"images/{name}"]
        assert rule == "unreadable" and why in reason, (name, reason)
    assert (tmp_path / "work" / MANIFEST_NAME).is_file()
