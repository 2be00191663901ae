"""The "shapes world": procedurally drawn coloured shapes, template captions, and an evaluator.

A `Scene` is one colour, one shape and either one object at a named position and size, or
2–3 small objects scattered. `render(scene, side, rng)` draws it with numpy (anti-aliased by
supersampling; small jitter in place, size and colour so no two images are identical) and
`caption(scene, rng)` writes a prompt from templates. `analyze(image)` recovers the attributes
from pixels alone (no model): foreground = pixels far from the background colour, objects =
4-connected components, colour = nearest palette entry, shape = how much of its bounding box
box corners an object fills (a square all four, an apex-up triangle the bottom two, a circle
none), position = nearest anchor of the
largest object's centroid, count = components above a minimum area. `evaluate` scores
generated images against the scenes their prompts describe. `edge_map(image)` is the control
image of a ControlNet: the objects' outlines, white on black, as an HED or Canny preprocessor
draws them (`write_dataset(..., control_dir=)` writes one per image).

Some (colour, shape, position) and (colour, shape, count) combinations are held out of the
training prompts (`is_held_out`): every colour, shape, position and count is still seen in
training, only these combinations are not, so the evaluation measures composition.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sana.errors import SanaInputError

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 45, 45),
    "green": (40, 175, 60),
    "blue": (45, 85, 230),
    "yellow": (235, 215, 45),
    "purple": (150, 60, 205),
    "cyan": (40, 205, 215),
}
SHAPES = ("circle", "square", "triangle")
# Anchor centres as (x, y) fractions of the image side.
POSITIONS: dict[str, tuple[float, float]] = {
    "center": (0.5, 0.5),
    "left": (0.26, 0.5),
    "right": (0.74, 0.5),
    "top": (0.5, 0.26),
    "bottom": (0.5, 0.74),
}
POSITION_PHRASES = {"center": "in the center", "left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom"}
# Object "radius" (half-extent of a circle of the same area) as a fraction of the image side.
# Small is 0.14, not less: the embedded model's f32 DC-AE rounds the corners of smaller squares
# at 128 px until they read as circles (held-out reconstructions scored 0.81 on shape at 0.11).
SIZES = {"small": 0.14, "large": 0.19}
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
COUNTS = (1, 2, 3)
BACKGROUND = (24, 24, 28)

SINGLE_TEMPLATES = (
    "a {size} {colour} {shape} {where}",
    "{size} {colour} {shape} {where}",
    "a picture of a {size} {colour} {shape} {where}",
    "a {colour} {shape} {where}, {size}",
)
MULTI_TEMPLATES = (
    "{count} {colour} {shape}s",
    "a picture of {count} {colour} {shape}s",
    "{count} small {colour} {shape}s scattered around",
)

# Analysis thresholds (fractions of the image area / side), chosen for renders at 32–256 px.
FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that counts as an object pixel
MIN_OBJECT_AREA = 0.004  # smaller components are noise, not objects
# Shape from the bounding box's corner cells (a 5×5 grid): a square fills all four, a triangle
# (apex up) only the bottom two, a circle none. Robust to blur, unlike the plain fill ratio.
SQUARE_TOP_CORNERS = 0.55
TRIANGLE_CORNER_GAP = 0.25


@dataclass(frozen=True)
class Scene:
    """What an image shows: `count` objects of one `colour` and `shape`.

    A single object has a `size` and a `position`; several objects are small and scattered
    (`size` and `position` are None).
    """

    colour: str
    shape: str
    count: int = 1
    size: str | None = "large"
    position: str | None = "center"

    def __post_init__(self) -> None:
        if self.colour not in COLOURS or self.shape not in SHAPES or self.count not in COUNTS:
            raise SanaInputError(f"unknown scene attributes: {self}")
        if self.count == 1 and (self.size not in SIZES or self.position not in POSITIONS):
            raise SanaInputError(f"a single object needs a size in {list(SIZES)} and a position in {list(POSITIONS)}: {self}")
        if self.count > 1 and (self.size is not None or self.position is not None):
            raise SanaInputError(f"scattered objects have no size or position: {self}")

    def to_dict(self) -> dict:
        return asdict(self)


def all_scenes() -> list[Scene]:
    """Every scene the world can show, in a fixed order."""
    scenes = [
        Scene(c, s, 1, z, p) for c, s, z, p in itertools.product(COLOURS, SHAPES, SIZES, POSITIONS)
    ]
    scenes += [Scene(c, s, n, None, None) for c, s, n in itertools.product(COLOURS, SHAPES, COUNTS[1:])]
    return scenes


def is_held_out(scene: Scene) -> bool:
    """True for the combinations kept out of training (about 1 in 6 of colour × shape × where).

    The rule walks the diagonals of the colour × shape × (position or count) grid, so every
    single attribute value, and every pair of them, still appears in training.
    """
    c = list(COLOURS).index(scene.colour)
    s = SHAPES.index(scene.shape)
    w = list(POSITIONS).index(scene.position) if scene.count == 1 else len(POSITIONS) + scene.count
    return (c + 2 * s + 3 * w) % 6 == 0


def training_scenes() -> list[Scene]:
    return [s for s in all_scenes() if not is_held_out(s)]


def held_out_scenes() -> list[Scene]:
    return [s for s in all_scenes() if is_held_out(s)]


def caption(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """A prompt for `scene` from the templates (the first template when `rng` is None)."""
    if scene.count == 1:
        templates = SINGLE_TEMPLATES
        fields = dict(size=scene.size, colour=scene.colour, shape=scene.shape, where=POSITION_PHRASES[scene.position])
    else:
        templates = MULTI_TEMPLATES
        fields = dict(count=COUNT_WORDS[scene.count], colour=scene.colour, shape=scene.shape)
    template = templates[0] if rng is None else templates[int(rng.integers(len(templates)))]
    return template.format(**fields)


def caption_without_position(scene: Scene, rng: np.random.Generator | None = None) -> str:
    """A prompt for `scene` that says nothing of where its objects are: "a large red circle",
    "two cyan triangles" (`rng` is unused: it takes `caption`'s arguments). `parse_prompt`
    reads a single object's as being in the center: score images of it against `scene` itself."""
    if scene.count == 1:
        return f"a {scene.size} {scene.colour} {scene.shape}"
    return MULTI_TEMPLATES[0].format(count=COUNT_WORDS[scene.count], colour=scene.colour, shape=scene.shape)


def parse_prompt(prompt: str) -> Scene:
    """The scene a shapes-world prompt describes (keyword matching; raises SanaInputError, a ValueError, if incomplete)."""
    words = prompt.lower().replace(",", " ").split()
    colour = next((w for w in words if w in COLOURS), None)
    shape = next((s for w in words for s in SHAPES if w in (s, s + "s")), None)
    count = next((n for n, word in COUNT_WORDS.items() if word in words), 1)
    if colour is None or shape is None:
        raise SanaInputError(f"not a shapes-world prompt: {prompt!r}")
    if count > 1:
        return Scene(colour, shape, count, None, None)
    size = next((w for w in words if w in SIZES), "large")
    position = next((w for w in words if w in POSITIONS), "center")
    return Scene(colour, shape, 1, size, position)


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _shape_mask(shape: str, cx: float, cy: float, radius: float, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean mask of one object; all three shapes have the area of a circle of `radius`."""
    dx, dy = xs - cx, ys - cy
    if shape == "circle":
        return dx * dx + dy * dy <= radius * radius
    if shape == "square":
        half = radius * np.sqrt(np.pi) / 2
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    # Equilateral triangle pointing up, centroid at (cx, cy); circumradius R has area 1.299 R².
    R = radius * np.sqrt(np.pi / (3 * np.sqrt(3) / 4))
    bottom = cy + R / 2
    height = 1.5 * R
    half_width_at = (dy + R) / height * (np.sqrt(3) * R / 2)  # 0 at the apex, full at the base
    return (ys <= bottom) & (dy >= -R) & (np.abs(dx) <= half_width_at)


def _object_centres(scene: Scene, rng: np.random.Generator) -> list[tuple[float, float, float]]:
    """(cx, cy, radius) as fractions of the side, jittered; scattered objects never overlap."""
    if scene.count == 1:
        ax, ay = POSITIONS[scene.position]
        radius = SIZES[scene.size] * rng.uniform(0.9, 1.1)
        return [(ax + rng.uniform(-0.035, 0.035), ay + rng.uniform(-0.035, 0.035), radius)]
    placed: list[tuple[float, float, float]] = []
    while len(placed) < scene.count:
        radius = SIZES["small"] * rng.uniform(0.85, 1.0)
        margin = radius * 1.6
        cx, cy = rng.uniform(margin, 1 - margin, size=2)
        if all((cx - x) ** 2 + (cy - y) ** 2 > (2.7 * max(radius, r)) ** 2 for x, y, r in placed):
            placed.append((float(cx), float(cy), radius))
    return placed


def render(scene: Scene, side: int = 128, rng: np.random.Generator | None = None, supersample: int = 3) -> np.ndarray:
    """Draw `scene` as a uint8 [side, side, 3] image. `rng=None` draws without jitter."""
    jitter = rng is not None
    rng = rng if rng is not None else np.random.default_rng(0)
    fine = side * supersample
    coords = (np.arange(fine, dtype=np.float64) + 0.5) / fine
    xs, ys = np.meshgrid(coords, coords)
    coverage = np.zeros((fine, fine), dtype=bool)
    objects = _object_centres(scene, rng) if jitter else _object_centres_exact(scene)
    for cx, cy, radius in objects:
        coverage |= _shape_mask(scene.shape, cx, cy, radius, xs, ys)
    alpha = coverage.reshape(side, supersample, side, supersample).mean(axis=(1, 3))[..., None]
    colour = np.array(COLOURS[scene.colour], dtype=np.float64)
    background = np.array(BACKGROUND, dtype=np.float64)
    if jitter:
        colour = np.clip(colour + rng.uniform(-12, 12, size=3), 0, 255)
        background = np.clip(background + rng.uniform(-6, 6, size=3), 0, 255)
    image = background * (1 - alpha) + colour * alpha
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _object_centres_exact(scene: Scene) -> list[tuple[float, float, float]]:
    if scene.count == 1:
        ax, ay = POSITIONS[scene.position]
        return [(ax, ay, SIZES[scene.size])]
    spots = [(0.25, 0.3), (0.72, 0.35), (0.45, 0.75)]
    return [(x, y, SIZES["small"]) for x, y in spots[: scene.count]]


def sample_scenes(n: int, rng: np.random.Generator, scenes: Sequence[Scene] | None = None) -> list[Scene]:
    """`n` scenes drawn uniformly (with replacement) from `scenes` (default: the training scenes)."""
    pool = list(scenes) if scenes is not None else training_scenes()
    return [pool[int(i)] for i in rng.integers(len(pool), size=n)]


def write_dataset(folder: str | Path, count: int, *, side: int = 128, seed: int = 0,
                  control_dir: str | Path | None = None, scenes: Sequence[Scene] | None = None,
                  describe: Callable[[Scene, np.random.Generator], str] | None = None) -> Path:
    """Write `count` training images as `NNNNNN.png` + `NNNNNN.txt` (the caption, by `describe`,
    default `caption`) to `folder`, drawn from `scenes` (default: the training scenes); with
    `control_dir`, each image's `edge_map` as `control_dir/NNNNNN.png` too (what
    `python -m trainer cache --control-dir` reads).

    Also writes `scenes.jsonl` (file, caption, scene) so tests can check what was drawn.
    Deterministic in `seed` (the images do not depend on `control_dir`).
    """
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if control_dir is not None:
        control_dir = Path(control_dir)
        control_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    with open(folder / "scenes.jsonl", "w") as manifest:
        for i, scene in enumerate(sample_scenes(count, rng, scenes)):
            name = f"{i:06d}"
            text = (describe or caption)(scene, rng)
            image = render(scene, side, rng)
            Image.fromarray(image).save(folder / f"{name}.png", optimize=False, compress_level=1)
            if control_dir is not None:
                Image.fromarray(edge_map(image)).save(control_dir / f"{name}.png", optimize=False, compress_level=1)
            (folder / f"{name}.txt").write_text(text + "\n")
            manifest.write(json.dumps({"file": f"{name}.png", "caption": text, "scene": scene.to_dict()}) + "\n")
    return folder


def edge_map(image: np.ndarray) -> np.ndarray:
    """The outlines of `image`'s objects as a uint8 [H, W, 3] image, white (255) on black: the
    pixels on either side of the foreground mask's boundary (`foreground_mask`; 4-neighbours),
    a 2-pixel line as an HED or Canny map draws it. Pure: the same image gives the same map."""
    mask = foreground_mask(image)
    padded = np.pad(mask, 1, mode="edge")  # the image border is no boundary
    neighbours = [padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
    differs = np.logical_or.reduce([n != mask for n in neighbours])
    return np.repeat(np.where(differs, 255, 0).astype(np.uint8)[..., None], 3, axis=-1)


# --------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------


def foreground_mask(image: np.ndarray) -> np.ndarray:
    """Boolean [H, W]: the pixels of a uint8 [H, W, 3] image far from the background colour."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise SanaInputError(f"expected an [H, W, 3] image, got shape {image.shape}")
    pixels = image.astype(np.float64)
    return np.sqrt(((pixels - np.array(BACKGROUND)) ** 2).sum(-1)) > FOREGROUND_DISTANCE


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    area: float  # fraction of the image
    centroid: tuple[float, float]  # (x, y) fractions of the side
    fill: float  # area / bounding-box area


@dataclass(frozen=True)
class Analysis:
    """What `analyze` reads from an image: the objects, and the scene-level attributes."""

    objects: tuple[DetectedObject, ...]
    colour: str | None  # colour of the most foreground pixels
    shape: str | None  # shape of the largest object
    position: str | None  # anchor nearest the largest object's centroid
    count: int


def _label_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected component labels (0 = background, 1..n) by min-label propagation."""
    h, w = mask.shape
    big = h * w + 1
    labels = np.where(mask, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        padded = np.pad(labels, 1, constant_values=big)
        neighbours = np.minimum.reduce(
            [padded[1:-1, 1:-1], padded[:-2, 1:-1], padded[2:, 1:-1], padded[1:-1, :-2], padded[1:-1, 2:]]
        )
        updated = np.where(mask, neighbours, big)
        if np.array_equal(updated, labels):
            break
        labels = updated
    unique = np.unique(labels[mask])
    relabel = np.zeros(big + 1, dtype=np.int64)
    relabel[unique] = np.arange(1, len(unique) + 1)
    return relabel[np.where(mask, labels, big)] * mask, len(unique)


def nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOURS)
    palette = np.array([COLOURS[n] for n in names], dtype=np.float64)
    return names[int(np.argmin(((palette - rgb) ** 2).sum(axis=1)))]


def classify_shape(box: np.ndarray) -> str:
    """Shape of one object from its boolean mask cropped to the bounding box."""
    h, w = box.shape
    ch, cw = max(1, round(h / 5)), max(1, round(w / 5))
    top = (box[:ch, :cw].mean() + box[:ch, -cw:].mean()) / 2
    bottom = (box[-ch:, :cw].mean() + box[-ch:, -cw:].mean()) / 2
    if top >= SQUARE_TOP_CORNERS:
        return "square"
    return "triangle" if bottom - top >= TRIANGLE_CORNER_GAP else "circle"


def nearest_position(x: float, y: float) -> str:
    return min(POSITIONS, key=lambda p: (POSITIONS[p][0] - x) ** 2 + (POSITIONS[p][1] - y) ** 2)


def analyze(image: np.ndarray) -> Analysis:
    """Read objects and scene attributes from a uint8 [H, W, 3] image (deterministic)."""
    mask = foreground_mask(image)
    h, w = mask.shape
    pixels = np.asarray(image).astype(np.float64)
    labels, n = _label_components(mask)
    objects = []
    for index in range(1, n + 1):
        component = labels == index
        area = int(component.sum())
        if area < MIN_OBJECT_AREA * h * w:
            continue
        rows, cols = np.nonzero(component)
        box = component[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
        fill = area / box.size
        objects.append(
            DetectedObject(
                colour=nearest_colour(np.median(pixels[component], axis=0)),
                shape=classify_shape(box),
                area=area / (h * w),
                centroid=((cols.mean() + 0.5) / w, (rows.mean() + 0.5) / h),
                fill=float(fill),
            )
        )
    objects.sort(key=lambda o: -o.area)
    if not objects:
        return Analysis((), None, None, None, 0)
    colour_area: dict[str, float] = {}
    for o in objects:
        colour_area[o.colour] = colour_area.get(o.colour, 0.0) + o.area
    largest = objects[0]
    return Analysis(
        objects=tuple(objects),
        colour=max(colour_area, key=colour_area.get),
        shape=largest.shape,
        position=nearest_position(*largest.centroid),
        count=len(objects),
    )


@dataclass
class Adherence:
    """Fractions of images whose analysis matches the prompt, per attribute, and the tallies."""

    colour: float
    shape: float
    position: float  # over single-object prompts
    count: float  # over all prompts
    images: int
    single_object_images: int

    def to_dict(self) -> dict:
        return asdict(self)


def evaluate(images: Iterable[np.ndarray], scenes: Iterable[Scene]) -> Adherence:
    """Prompt adherence of `images` to the `scenes` their prompts describe.

    Shape is scored on the largest object; for several objects, a shape counts as right when
    the majority of detected objects have it.
    """
    hits = {"colour": 0, "shape": 0, "position": 0, "count": 0}
    total = single = 0
    for image, scene in zip(images, scenes, strict=True):
        found = analyze(image)
        total += 1
        hits["colour"] += found.colour == scene.colour
        hits["count"] += found.count == scene.count
        if scene.count == 1:
            single += 1
            hits["shape"] += found.shape == scene.shape
            hits["position"] += found.position == scene.position
        else:
            shapes = [o.shape for o in found.objects]
            hits["shape"] += bool(shapes) and shapes.count(scene.shape) * 2 > len(shapes)
    return Adherence(
        colour=hits["colour"] / max(total, 1),
        shape=hits["shape"] / max(total, 1),
        position=hits["position"] / max(single, 1),
        count=hits["count"] / max(total, 1),
        images=total,
        single_object_images=single,
    )
