"""The built-in synthetic scenes dataset: one or two coloured shapes with captions from a small grammar.

    python cli.py synth data/synth --n 600 --seed 0

Each image shows one or two shapes (circle, square, triangle, star), each in one of five
saturated colours and one of two sizes, on a grey background that is plain, striped or
checkered; it gets 3 to 5 captions such as "a small red circle above a large blue square" or
"two shapes: a green triangle and a yellow star". It exists so that the demo and the tests can
train a model in minutes with no download, so every word of a caption must be visible in the
pixels: colours are far apart and never grey like the background, small shapes still span a
quarter of the side, and positions are either clearly left/right/top/bottom or the centre.

Written as `OUTDIR/images/NNNNNN.png` and `OUTDIR/captions.csv` in the original project's
two-column layout (caption, image path). The same seed gives the same files.
"""

from __future__ import annotations

import csv
import io
import math
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from store.errors import UserError
from store.files import atomic_write_bytes

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (240, 210, 20),
    "purple": (150, 40, 180),
}
SHAPES = ("circle", "square", "triangle", "star")
SIZES = {"small": 0.13, "large": 0.22}  # half-extent as a fraction of the image side
BACKGROUNDS = ("plain", "striped", "checkered")
GREYS = ((235, 235, 235), (170, 170, 170), (90, 90, 90))
# One shape: where it sits (centre as fractions of the side) and how a caption says it.
PLACES = {
    "on the left": (0.28, 0.5),
    "on the right": (0.72, 0.5),
    "at the top": (0.5, 0.28),
    "at the bottom": (0.5, 0.72),
    "in the middle": (0.5, 0.5),
}
JITTER = 0.03  # random shift of a shape's centre, small enough to keep every position word true


@dataclass(frozen=True)
class Shape:
    """One drawn shape: kind, colour name, size name and centre (fractions of the side)."""

    kind: str
    colour: str
    size: str
    x: float
    y: float

    def phrase(self, with_size: bool = True) -> str:
        return " ".join(([self.size] if with_size else []) + [self.colour, self.kind])


@dataclass(frozen=True)
class Scene:
    """One or two shapes; with two, `first` is left of (horizontal) or above (vertical) `second`."""

    shapes: tuple[Shape, ...]
    background: str
    grey: tuple[int, int, int]
    place: str = ""  # for one shape
    vertical: bool = False  # for two shapes


def random_scene(rng: random.Random) -> Scene:
    """A scene with one shape (40%) or two of different colours (60%)."""
    background, grey = rng.choice(BACKGROUNDS), rng.choice(GREYS)
    if rng.random() < 0.4:
        place = rng.choice(sorted(PLACES))
        x, y = PLACES[place]
        shape = Shape(
            rng.choice(SHAPES),
            rng.choice(sorted(COLOURS)),
            rng.choice(sorted(SIZES)),
            x + rng.uniform(-JITTER, JITTER),
            y + rng.uniform(-JITTER, JITTER),
        )
        return Scene((shape,), background, grey, place=place)
    vertical = rng.random() < 0.5
    colours = rng.sample(sorted(COLOURS), 2)
    across = 0.5 + rng.uniform(-0.08, 0.08)  # the shared coordinate
    shapes = []
    for colour, along in zip(colours, (0.27, 0.73), strict=True):
        along += rng.uniform(-JITTER, JITTER)
        x, y = (across, along) if vertical else (along, across)
        shapes.append(Shape(rng.choice(SHAPES), colour, rng.choice(sorted(SIZES)), x, y))
    return Scene(tuple(shapes), background, grey, vertical=vertical)


def captions_for(scene: Scene, rng: random.Random) -> list[str]:
    """3 to 5 different captions of `scene` from the grammar."""
    bg = f"on a {scene.background} background"
    if len(scene.shapes) == 1:
        (s,) = scene.shapes
        options = [
            f"a {s.phrase()} {scene.place}",
            f"a {s.phrase(False)} {scene.place}",
            f"a {s.phrase()}",
            f"a {s.phrase(False)} {bg}",
            f"one {s.phrase()} {bg}",
        ]
    else:
        a, b = scene.shapes
        relation, inverse = ("above", "below") if scene.vertical else ("to the left of", "to the right of")
        options = [
            f"a {a.phrase()} {relation} a {b.phrase()}",
            f"a {b.phrase()} {inverse} a {a.phrase()}",
            f"two shapes: a {a.phrase(False)} and a {b.phrase(False)}",
            f"a {a.phrase(False)} {relation} a {b.phrase(False)}",
            f"a {a.phrase(False)} and a {b.phrase(False)} {bg}",
        ]
    return rng.sample(options, rng.randint(3, 5))


def render(scene: Scene, size: int) -> Image.Image:
    """The scene as an RGB image of side `size`; no anti-aliasing, so colours stay exact."""
    image = Image.new("RGB", (size, size), scene.grey)
    draw = ImageDraw.Draw(image)
    other = tuple(min(255, c + 40) if c < 128 else c - 40 for c in scene.grey)
    step = max(4, size // 12)
    if scene.background == "striped":
        for x in range(0, size, 2 * step):
            draw.rectangle((x, 0, x + step - 1, size), fill=other)
    elif scene.background == "checkered":
        for y in range(0, size, step):
            for x in range((y // step) % 2 * step, size, 2 * step):
                draw.rectangle((x, y, x + step - 1, y + step - 1), fill=other)
    for shape in scene.shapes:
        _draw_shape(draw, shape, size)
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: Shape, size: int) -> None:
    cx, cy, r = shape.x * size, shape.y * size, SIZES[shape.size] * size
    fill = COLOURS[shape.colour]
    if shape.kind == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape.kind == "square":
        draw.rectangle((cx - r * 0.9, cy - r * 0.9, cx + r * 0.9, cy + r * 0.9), fill=fill)
    elif shape.kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    else:  # a five-pointed star
        points = []
        for i in range(10):
            radius = r if i % 2 == 0 else r * 0.45
            angle = -math.pi / 2 + i * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        draw.polygon(points, fill=fill)


def make_synth(outdir: Path, n: int = 600, seed: int = 0, size: int = 356) -> Path:
    """Write `n` scenes and their captions to OUTDIR; returns the path of captions.csv."""
    if n < 1:
        raise UserError("--n must be at least 1")
    if size < 64:
        raise UserError("--size must be at least 64 pixels")
    outdir = Path(outdir)
    (outdir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["caption", "image"])
    for index in range(n):
        scene = random_scene(rng)
        name = f"images/{index:06d}.png"
        render(scene, size).save(outdir / name, compress_level=1)
        for caption in captions_for(scene, rng):
            writer.writerow([caption, name])
    path = outdir / "captions.csv"
    atomic_write_bytes(path, text.getvalue().encode("utf-8"))
    return path
