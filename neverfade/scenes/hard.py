"""The hard scene world, for the testbed model: more and smaller objects, overlap, clutter, themed co-occurrence.

`make_hard_scene(seed)` returns a `Scene` like `make_scene`, with the same 24 kinds, nouns and metric
(`vocab.mentioned_objects`, `scene_metrics`), so everything that scores the default world scores this one.
What changes:
- 4 to 10 objects (mean about 7), drawn small (13-42 px on a 192 px image: 2 to 5 patches of the testbed's
  8-pixel grid); later, smaller objects may overlap earlier ones (at most 30 % of either box), so some are partly
  hidden; denser clutter (up to 60 marks, also small squares, rings and triangles in object colours) and noise.
- Co-occurrence by theme (`THEMES`, 6 themes of 4 kinds): a scene draws a main theme whose kinds each join
  with odds 0.75, sometimes a second theme (odds 0.5 each), then random kinds. So P(cup | spoon) is high and a
  model that sees three kinds of a theme is tempted to name the fourth: the prior that misleads real models.
- Captions name no object count and describe objects mostly from the largest down (as people describe the
  main things first), so the small, hard objects come last.

Seeds 0..9_999 are held out, as in the default world (`generator.HELD_OUT_SEEDS`); the testbed trains on seeds
from HARD_TRAIN_SEED_START up.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from .caption import (
    CLOSINGS,
    FIRST_MENTIONS,
    FLAVOUR,
    LATER_MENTIONS,
    POSITIONS,
    RELATIONS,
    SIZE_WORDS,
    TEXTURE_PHRASES,
    _clutter_sentence,
    _pick,
    article,
    relation,
)
from .draw import DETAILS, PICTOGRAMS
from .generator import (
    _SCALE,
    CLUTTER,
    IMAGE_SIZE,
    TEXTURES,
    Scene,
    _add_noise,
    _draw_clutter,
    _draw_texture,
    _dress,
)
from .kinds import BACKGROUNDS, COLOURS, EXCLUDES, KINDS, NOUNS

HARD_TRAIN_SEED_START = 2_000_000
MIN_OBJECTS, MAX_OBJECTS = 4, 10
SIZE_PIXELS = {"small": (13, 18), "medium": (20, 28), "large": (30, 42)}
MAX_OVERLAP = 0.3  # share of either box another box may cover
THEMES: dict[str, tuple[str, ...]] = {
    "seaside": ("boat", "fish", "sun", "bird"),
    "night": ("moon", "star", "lamp", "bell"),
    "breakfast": ("cup", "spoon", "apple", "clock"),
    "garden": ("tree", "flower", "mushroom", "heart"),
    "street": ("house", "car", "key", "umbrella"),
    "park": ("cat", "ball", "kite", "cloud"),
}
THEME_OF = {kind: theme for theme, kinds in THEMES.items() for kind in kinds}
OPENINGS = (
    "This image shows {count} on {bg} background.",
    "The picture contains {count} drawn on {bg} background.",
    "In this image, {count} are arranged on {bg} background.",
    "This is a busy illustration with {count} on {bg} background.",
    "Here we see {count} spread across {bg} background.",
)


def partners(kind: str) -> set[str]:
    """The kinds the world's priors pair with `kind`: the other kinds of its theme."""
    return set(THEMES[THEME_OF[kind]]) - {kind}


def make_hard_scene(seed: int) -> Scene:
    """The hard-world scene named by `seed`: image, ground-truth objects (in drawing order), long caption."""
    rng = np.random.default_rng([seed, 14])
    background = str(rng.choice(list(BACKGROUNDS)))
    texture, clutter = str(rng.choice(TEXTURES)), str(rng.choice((*CLUTTER, "shapes")))
    clutter_count = int(rng.integers(5, 61)) if rng.random() < 0.9 else 0
    theme, kinds = choose_kinds(rng, int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1)))
    objects = [_dress(rng, kind, size, box, background) for kind, size, box in _place(rng, kinds)]

    canvas = Image.new("RGB", (IMAGE_SIZE * _SCALE,) * 2, BACKGROUNDS[background])
    draw = ImageDraw.Draw(canvas)
    _draw_texture(rng, draw, texture, BACKGROUNDS[background])
    if clutter == "shapes":
        _draw_shapes(rng, draw, clutter_count)
    else:
        _draw_clutter(rng, draw, clutter, clutter_count)
    for obj in objects:
        x0, y0, x1, _ = obj.bbox
        PICTOGRAMS[obj.kind](draw, x0 * _SCALE, y0 * _SCALE, (x1 - x0) * _SCALE, COLOURS[obj.colour], obj.detail)
    image = _add_noise(rng, canvas.reduce(_SCALE))
    scene = Scene(
        seed,
        image,
        objects,
        background,
        texture,
        "dots" if clutter == "shapes" else clutter,
        clutter_count,
        meta={"world": "hard", "theme": theme},
    )
    scene.caption = write_hard_caption(scene, rng)
    return scene


def choose_kinds(rng: np.random.Generator, n: int) -> tuple[str, list[str]]:
    """A main theme (each kind joins with odds 0.75, at least two), maybe a second (0.5 each), then random kinds."""
    chosen: list[str] = []

    def allowed(kind: str) -> bool:
        return kind not in chosen and not any(
            kind in EXCLUDES.get(c, ()) or c in EXCLUDES.get(kind, ()) for c in chosen
        )

    theme = str(rng.choice(list(THEMES)))
    members = [THEMES[theme][i] for i in rng.permutation(4)]
    chosen += members[:2] + [k for k in members[2:] if rng.random() < 0.75]
    if rng.random() < 0.5:
        second = str(rng.choice([t for t in THEMES if t != theme]))
        chosen += [k for k in THEMES[second] if rng.random() < 0.5 and allowed(k) and len(chosen) < n]
    while len(chosen) < n:
        chosen.append(str(rng.choice([k for k in KINDS if allowed(k)])))
    return theme, chosen[: max(n, 2)]


def _place(rng, kinds):
    """Boxes largest first; a later box may cover at most MAX_OVERLAP of any earlier one (and of itself)."""
    sizes = [str(rng.choice(list(SIZE_PIXELS), p=[0.45, 0.35, 0.2])) for _ in kinds]
    order = sorted(range(len(kinds)), key=lambda i: -SIZE_PIXELS[sizes[i]][0])
    placed: dict[int, tuple[str, tuple[int, int, int, int]]] = {}
    for i in order:
        for size in list(SIZE_PIXELS)[: list(SIZE_PIXELS).index(sizes[i]) + 1][::-1]:
            box = _find_room(rng, SIZE_PIXELS[size], [b for _, b in placed.values()])
            if box:
                placed[i] = (size, box)
                break
    return [(kinds[i], *placed[i]) for i in order if i in placed]


def _find_room(rng, size_range, taken, tries=80):
    for _ in range(tries):
        s = int(rng.integers(size_range[0], size_range[1] + 1))
        if taken and rng.random() < 0.35:  # beside an earlier object, so that they may overlap
            t = taken[int(rng.integers(len(taken)))]
            x, y = (int(np.clip(c + rng.integers(-s, t[2] - t[0] + 1), 2, IMAGE_SIZE - 2 - s)) for c in t[:2])
        else:
            x, y = (int(v) for v in rng.integers(2, IMAGE_SIZE - 2 - s, size=2))
        box = (x, y, x + s, y + s)
        if all(_covered(box, t) <= MAX_OVERLAP for t in taken):
            return box
    return None


def _covered(a, b) -> float:
    """The larger share of either box that their intersection covers."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    if w <= 0 or h <= 0:
        return 0.0
    return w * h / min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))


def _draw_shapes(rng, draw, count):
    """Clutter that looks a little like objects: small squares, rings and triangles in object colours."""
    n = IMAGE_SIZE * _SCALE
    names = list(COLOURS)
    for _ in range(count):
        x, y = (int(v) for v in rng.integers(6, n - 6, size=2))
        rgb = COLOURS[names[int(rng.integers(len(names)))]]
        r = int(rng.integers(3, 9))
        shape = int(rng.integers(3))
        if shape == 0:
            draw.rectangle((x - r, y - r, x + r, y + r), fill=rgb)
        elif shape == 1:
            draw.ellipse((x - r, y - r, x + r, y + r), outline=rgb, width=2)
        else:
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=rgb)


def write_hard_caption(scene, rng: np.random.Generator) -> str:
    """Opening (no count), objects mostly largest first, background and clutter, an optional closing."""
    objects = _ordered(scene.objects, rng)
    count = _pick(rng, ("several objects", "many objects", "a number of objects", "various objects"))
    bg = f"{article(scene.background)} {scene.background}"
    sentences = [_pick(rng, OPENINGS).format(count=count, bg=bg)]
    setting = [TEXTURE_PHRASES[scene.texture].format(bg=scene.background), _clutter_sentence(scene)]
    setting = setting if rng.random() < 0.5 else setting[1:]
    for i, obj in enumerate(objects):
        sentences += _describe_briefly(obj, objects[:i], rng)
    sentences += setting
    if rng.random() < 0.5:
        sentences.append(_pick(rng, CLOSINGS).format(mood=_pick(rng, ("busy", "crowded", "lively"))))
    return " ".join(sentences)


def _describe_briefly(obj, earlier, rng) -> list[str]:
    """One sentence an object (size, colour, noun, the kind's detail, position); sometimes a relation or a fact."""
    noun = NOUNS[obj.kind][0]
    words = f"{_pick(rng, SIZE_WORDS[obj.size])} {obj.colour} {noun}"
    np_ = f"{article(words)} {words}"
    detail = f" {DETAILS[obj.kind][1].format(detail=obj.detail)}" if obj.detail and rng.random() < 0.6 else ""
    pos = _pick(rng, POSITIONS[obj.position])
    template = _pick(rng, LATER_MENTIONS if earlier else FIRST_MENTIONS)
    out = [template.format(np=np_, NP=np_[0].upper() + np_[1:], pos=pos, Pos=pos[0].upper() + pos[1:], detail=detail)]
    if earlier and rng.random() < 0.25:
        other = earlier[int(rng.integers(len(earlier)))]
        out.append(_pick(rng, RELATIONS).format(rel=relation(obj, other), other=NOUNS[other.kind][0], noun=noun))
    if rng.random() < 0.1:
        out.append(FLAVOUR[obj.kind])
    return out


def _ordered(objects, rng):
    """Largest first (ties in random order) 70 % of the time; else left to right or top to bottom."""
    mode = rng.random()
    jitter = rng.random(len(objects))
    if mode < 0.7:
        return [o for _, o in sorted(zip(jitter, objects), key=lambda p: (-(p[1].bbox[2] - p[1].bbox[0]) // 4, p[0]))]
    axis = 0 if mode < 0.85 else 1
    return sorted(objects, key=lambda o: o.center[axis])


__all__ = ["HARD_TRAIN_SEED_START", "THEMES", "make_hard_scene", "partners"]
