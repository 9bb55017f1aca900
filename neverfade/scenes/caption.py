"""Reference captions: long, detailed, and varied in wording and order, mentioning every object exactly by its noun.

No sentence outside an object's own mention uses a kind's noun, so parsing a reference caption with
`vocab.mentioned_objects` returns exactly the scene's kinds.
"""

from __future__ import annotations

import numpy as np

from .draw import DETAILS
from .kinds import NOUNS

SIZE_WORDS = {"small": ("small", "little"), "medium": ("medium-sized",), "large": ("large", "big")}
SIZE_SENTENCES = {
    "small": ("It is small.", "It is rather small."),
    "medium": ("It is of medium size.",),
    "large": ("It is large.", "It is quite big."),
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight"}
POSITIONS = {
    "top left": ("in the top left corner", "at the top left", "near the upper left corner"),
    "top": ("at the top", "near the top edge", "in the upper middle"),
    "top right": ("in the top right corner", "at the top right", "near the upper right corner"),
    "left": ("on the left side", "at the left edge", "in the middle of the left side"),
    "center": ("in the center", "in the middle of the image", "near the center"),
    "right": ("on the right side", "at the right edge", "in the middle of the right side"),
    "bottom left": ("in the bottom left corner", "at the bottom left", "near the lower left corner"),
    "bottom": ("at the bottom", "near the bottom edge", "in the lower middle"),
    "bottom right": ("in the bottom right corner", "at the bottom right", "near the lower right corner"),
}
OPENINGS = (
    "This image shows {count} on {bg} background.",
    "The picture contains {count} drawn on {bg} background.",
    "In this image, {count} are arranged on {bg} background.",
    "This is a simple illustration with {count} on {bg} background.",
    "Here we see {count} spread across {bg} background.",
)
FIRST_MENTIONS = (
    "{Pos}, there is {np}{detail}.",
    "{NP}{detail} sits {pos}.",
    "{Pos} we can see {np}{detail}.",
    "{NP}{detail} appears {pos}.",
)
LATER_MENTIONS = FIRST_MENTIONS + (
    "There is also {np} {pos}{detail}.",
    "I can also see {np}{detail} {pos}.",
    "Next, {pos}, there is {np}{detail}.",
)
RELATIONS = ("It is {rel} the {other}.", "This {noun} is {rel} the {other}.", "It is located {rel} the {other}.")
# One fixed fact per kind, about the drawing (never naming another kind).
FLAVOUR = {
    "house": "It has a dark door and a small window.",
    "tree": "Its trunk is brown and its crown is round.",
    "car": "It has two dark wheels and a light window.",
    "boat": "Its hull floats below a thin mast.",
    "fish": "Its tail fin is wide and its eye is dark.",
    "sun": "Short rays spread out all around it.",
    "cloud": "It looks soft and puffy.",
    "moon": "It is a thin crescent.",
    "star": "It has five sharp points.",
    "cat": "It has pointed ears and long whiskers.",
    "ball": "It is perfectly round.",
    "cup": "It looks ready for a hot drink.",
    "spoon": "It has a long thin handle.",
    "umbrella": "It has a curved dark handle.",
    "key": "It has a round bow and two teeth.",
    "heart": "Its shape is smooth and symmetric.",
    "flower": "It stands on a green stem with one leaf.",
    "bird": "Its wings are spread wide in flight.",
    "kite": "A thin wavy tail hangs below it.",
    "mushroom": "Its cap has white spots.",
    "apple": "It has a short stem and a green leaf.",
    "bell": "A small dark clapper hangs below it.",
    "clock": "Its hands point up and to the right.",
    "lamp": "Its shade sits on a thin dark pole.",
}
TEXTURE_PHRASES = {
    "plain": "The background is plain {bg}.",
    "stripes": "The {bg} background is covered with faint diagonal stripes.",
    "grid": "The {bg} background is covered with a faint grid.",
    "dots": "The {bg} background has a regular pattern of faint dots.",
    "gradient": "The {bg} background has a soft vertical gradient.",
}
CLUTTER_WORDS = {"dots": "dots", "specks": "specks", "lines": "short lines", "crosses": "little crosses"}
CLOSINGS = (
    "That is everything in the image.",
    "Nothing else stands out in the picture.",
    "Overall, the scene looks {mood}.",
)


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def write_caption(scene, rng: np.random.Generator) -> str:
    """A detailed caption of `scene`: opening, background and clutter, every object with attributes, a closing."""
    objects = _ordered(scene.objects, rng)
    n = len(objects)
    count = _pick(rng, (f"{NUMBER_WORDS[n]} objects", "several objects", "a few objects" if n <= 4 else "many objects"))
    bg = f"{article(scene.background)} {scene.background}"
    sentences = [_pick(rng, OPENINGS).format(count=count, bg=bg)]
    setting = [TEXTURE_PHRASES[scene.texture].format(bg=scene.background), _clutter_sentence(scene)]
    background_first = rng.random() < 0.5
    if background_first:
        sentences += setting
    for i, obj in enumerate(objects):
        sentences += _describe(obj, objects[:i], rng)
    if not background_first:
        sentences += setting
    if rng.random() < 0.6:
        sentences.append(
            _pick(rng, CLOSINGS).format(mood=_pick(rng, ("busy", "crowded") if n >= 6 else ("calm", "tidy", "simple")))
        )
    return " ".join(sentences)


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _ordered(objects, rng):
    mode = _pick(rng, ("random", "left to right", "top to bottom", "largest first"))
    if mode == "random":
        return [objects[i] for i in rng.permutation(len(objects))]
    if mode == "left to right":
        return sorted(objects, key=lambda o: o.center[0])
    if mode == "top to bottom":
        return sorted(objects, key=lambda o: o.center[1])
    return sorted(objects, key=lambda o: -(o.bbox[2] - o.bbox[0]))


def _clutter_sentence(scene) -> str:
    words = CLUTTER_WORDS[scene.clutter]
    if scene.clutter_count == 0:
        return "There is no clutter around the objects."
    if scene.clutter_count < 10:
        return f"A few small {words} are scattered around the image."
    return f"Many small {words} are scattered across the background."


def _describe(obj, earlier, rng) -> list[str]:
    noun = NOUNS[obj.kind][0]
    size = _pick(rng, SIZE_WORDS[obj.size])
    short = rng.random() < 0.25  # colour only in the noun phrase; the size gets its own sentence
    words = f"{obj.colour} {noun}" if short else f"{size} {obj.colour} {noun}"
    np_ = f"{article(words)} {words}"
    detail = f" {DETAILS[obj.kind][1].format(detail=obj.detail)}" if obj.detail else ""
    pos = _pick(rng, POSITIONS[obj.position])
    template = _pick(rng, LATER_MENTIONS if earlier else FIRST_MENTIONS)
    out = [template.format(np=np_, NP=np_[0].upper() + np_[1:], pos=pos, Pos=pos[0].upper() + pos[1:], detail=detail)]
    if short:
        out.append(_pick(rng, SIZE_SENTENCES[obj.size]))
    if earlier and rng.random() < 0.5:
        other = earlier[int(rng.integers(len(earlier)))]
        out.append(_pick(rng, RELATIONS).format(rel=relation(obj, other), other=NOUNS[other.kind][0], noun=noun))
    if rng.random() < 0.3:
        out.append(FLAVOUR[obj.kind])
    return out


def relation(obj, other) -> str:
    """Where `obj` is relative to `other`, by the larger offset between their centres."""
    dx, dy = obj.center[0] - other.center[0], obj.center[1] - other.center[1]
    if abs(dx) > abs(dy):
        return "to the left of" if dx < 0 else "to the right of"
    return "above" if dy < 0 else "below"
