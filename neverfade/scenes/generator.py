"""The scene generator: `make_scene(seed)` draws an image of several objects with clutter and writes its caption.

Everything follows from the integer seed (numpy's PCG64), so a seed names a scene. By convention seeds
0..9_999 are held out for evaluation and training uses seeds from 1_000_000 up (see `HELD_OUT_SEEDS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from .draw import DETAILS, PICTOGRAMS
from .kinds import BACKGROUNDS, COLOURS, EXCLUDES, KIND_COLOURS, KINDS, PARTNERS

IMAGE_SIZE = 192  # pixels; with 16-pixel patches the vision tower sees a 12 x 12 grid
HELD_OUT_SEEDS = range(0, 10_000)  # evaluation scenes; never trained on
TRAIN_SEED_START = 1_000_000  # training scenes use seeds >= this
MIN_OBJECTS, MAX_OBJECTS = 3, 8
SIZE_PIXELS = {"small": (24, 30), "medium": (36, 44), "large": (50, 60)}
TEXTURES = ("plain", "stripes", "grid", "dots", "gradient")
CLUTTER = ("dots", "specks", "lines", "crosses")
_SCALE = 2  # drawn at twice the size, then downsampled (antialiasing)
_MIN_CONTRAST = 120.0


@dataclass(frozen=True)
class SceneObject:
    kind: str
    colour: str
    size: str  # "small" | "medium" | "large"
    position: str  # region of the centre in a 3 x 3 grid: "top left", "top", ..., "center", ..., "bottom right"
    bbox: tuple[int, int, int, int]  # x0, y0, x1, y1 in image pixels
    detail: str | None = None  # the kind's varying part (draw.DETAILS), if it has one

    @property
    def center(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.bbox
        return (x0 + x1) / 2, (y0 + y1) / 2


@dataclass
class Scene:
    seed: int
    image: Image.Image
    objects: list[SceneObject]
    background: str  # colour name (kinds.BACKGROUNDS)
    texture: str  # one of TEXTURES
    clutter: str  # one of CLUTTER
    clutter_count: int
    caption: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def kinds(self) -> set[str]:
        return {o.kind for o in self.objects}


def make_scene(seed: int) -> Scene:
    """The scene named by `seed`: image, ground-truth objects, and a long reference caption."""
    from .caption import write_caption

    rng = np.random.default_rng(seed)
    background = str(rng.choice(list(BACKGROUNDS)))
    texture, clutter = str(rng.choice(TEXTURES)), str(rng.choice(CLUTTER))
    clutter_count = 0 if rng.random() < 0.2 else int(rng.integers(3, 31))
    kinds = choose_kinds(rng, int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1)))
    boxes = _place(rng, kinds)
    objects = [_dress(rng, kind, size, box, background) for kind, size, box in boxes]

    canvas = Image.new("RGB", (IMAGE_SIZE * _SCALE,) * 2, BACKGROUNDS[background])
    draw = ImageDraw.Draw(canvas)
    _draw_texture(rng, draw, texture, BACKGROUNDS[background])
    _draw_clutter(rng, draw, clutter, clutter_count)
    for obj in objects:
        x0, y0, x1, _ = obj.bbox
        PICTOGRAMS[obj.kind](draw, x0 * _SCALE, y0 * _SCALE, (x1 - x0) * _SCALE, COLOURS[obj.colour], obj.detail)
    image = _add_noise(rng, canvas.reduce(_SCALE))
    scene = Scene(seed, image, objects, background, texture, clutter, clutter_count)
    scene.caption = write_caption(scene, rng)
    return scene


def choose_kinds(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct kinds: random ones, each pulling in its co-occurrence partners (PARTNERS) with their odds."""
    chosen: list[str] = []

    def allowed(kind: str) -> bool:
        return kind not in chosen and not any(
            kind in EXCLUDES.get(c, ()) or c in EXCLUDES.get(kind, ()) for c in chosen
        )

    def add(kind: str) -> None:
        chosen.append(kind)
        for partner, odds in PARTNERS.get(kind, {}).items():
            if rng.random() < odds and len(chosen) < n and allowed(partner):
                add(partner)

    while len(chosen) < n:
        add(str(rng.choice([k for k in KINDS if allowed(k)])))
    return chosen


def _place(rng, kinds):
    """Non-overlapping square boxes, largest first; an object that finds no room shrinks, then is dropped."""
    odds = [0.3, 0.4, 0.3] if len(kinds) <= 4 else [0.5, 0.35, 0.15]
    sizes = [str(rng.choice(list(SIZE_PIXELS), p=odds)) for _ in kinds]
    order = sorted(range(len(kinds)), key=lambda i: -SIZE_PIXELS[sizes[i]][0])
    placed: dict[int, tuple[str, tuple[int, int, int, int]]] = {}
    for i in order:
        for size in list(SIZE_PIXELS)[: list(SIZE_PIXELS).index(sizes[i]) + 1][::-1]:
            box = _find_room(rng, SIZE_PIXELS[size], [b for _, b in placed.values()])
            if box:
                placed[i] = (size, box)
                break
    return [(kinds[i], *placed[i]) for i in range(len(kinds)) if i in placed]


def _find_room(rng, size_range, taken, tries=60, margin=4):
    for _ in range(tries):
        s = int(rng.integers(size_range[0], size_range[1] + 1))
        x, y = (int(v) for v in rng.integers(3, IMAGE_SIZE - 3 - s, size=2))
        box = (x, y, x + s, y + s)
        if all(
            box[2] + margin <= t[0] or t[2] + margin <= box[0] or box[3] + margin <= t[1] or t[3] + margin <= box[1]
            for t in taken
        ):
            return box
    return None


def _region(box) -> str:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    row = ("top", "middle", "bottom")[min(2, int(3 * cy / IMAGE_SIZE))]
    col = ("left", "center", "right")[min(2, int(3 * cx / IMAGE_SIZE))]
    if row == "middle":
        return col
    return row if col == "center" else f"{row} {col}"


def _contrasting(names, background):
    bg = np.array(BACKGROUNDS[background], float)
    return [c for c in names if np.linalg.norm(np.array(COLOURS[c], float) - bg) >= _MIN_CONTRAST]


def _dress(rng, kind, size, box, background) -> SceneObject:
    palette = _contrasting(KIND_COLOURS[kind], background) or _contrasting(COLOURS, background)
    weights = 1.0 / np.arange(1, len(palette) + 1)  # earlier colours are the usual ones
    colour = str(rng.choice(palette, p=weights / weights.sum()))
    detail = None
    if kind in DETAILS:
        detail = str(rng.choice([c for c in DETAILS[kind][0] if c != colour]))
    return SceneObject(kind, colour, size, _region(box), box, detail)


def _shade(rgb, delta):
    return tuple(int(np.clip(v + delta, 0, 255)) for v in rgb)


def _draw_texture(rng, draw, texture, rgb):
    n = IMAGE_SIZE * _SCALE
    tone = _shade(rgb, -22 if sum(rgb) > 380 else 22)
    if texture == "stripes":
        step = int(rng.integers(14, 30))
        for k in range(-n, n, step):
            draw.line((k, 0, k + n, n), fill=tone, width=3)
    elif texture == "grid":
        step = int(rng.integers(20, 40))
        for k in range(0, n, step):
            draw.line((k, 0, k, n), fill=tone, width=2)
            draw.line((0, k, n, k), fill=tone, width=2)
    elif texture == "dots":
        step = int(rng.integers(16, 28))
        for gx in range(step // 2, n, step):
            for gy in range(step // 2, n, step):
                draw.ellipse((gx - 3, gy - 3, gx + 3, gy + 3), fill=tone)
    elif texture == "gradient":
        for k in range(0, n, 8):
            draw.rectangle((0, k, n, k + 8), fill=_shade(rgb, (k / n - 0.5) * 50))


def _draw_clutter(rng, draw, clutter, count):
    n = IMAGE_SIZE * _SCALE
    names = list(COLOURS)
    for _ in range(count):
        x, y = (int(v) for v in rng.integers(4, n - 4, size=2))
        rgb = COLOURS[names[int(rng.integers(len(names)))]]
        r = int(rng.integers(2, 6))
        if clutter == "dots":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=rgb)
        elif clutter == "specks":
            draw.rectangle((x - r // 2, y - r // 2, x + r // 2, y + r // 2), fill=rgb)
        elif clutter == "lines":
            dx, dy = (int(v) for v in rng.integers(-10, 11, size=2))
            draw.line((x, y, x + dx, y + dy), fill=rgb, width=2)
        else:  # crosses
            draw.line((x - r, y, x + r, y), fill=rgb, width=2)
            draw.line((x, y - r, x, y + r), fill=rgb, width=2)


def _add_noise(rng, image):
    sigma = float(rng.uniform(2.0, 10.0))
    noise = rng.standard_normal((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    pixels = np.asarray(image, dtype=np.float32) + sigma * noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
