"""The scene world: determinism, ground truth, reference captions, co-occurrence priors, the object vocabulary."""

import re
from collections import Counter

import numpy as np
import pytest

from neverfade.scenes import (
    HELD_OUT_SEEDS,
    IMAGE_SIZE,
    KINDS,
    TRAIN_SEED_START,
    find_mentions,
    make_scene,
    mentioned_objects,
)
from neverfade.scenes.kinds import BACKGROUNDS, COLOURS, NOUNS

SEEDS = range(400)


@pytest.fixture(scope="module")
def scenes():
    return [make_scene(s) for s in SEEDS]


def test_same_seed_same_scene_and_different_seeds_differ():
    a, b, c = make_scene(123), make_scene(123), make_scene(124)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.objects == b.objects and a.caption == b.caption
    assert a.image.tobytes() != c.image.tobytes() and a.caption != c.caption


def test_held_out_and_training_seeds_are_disjoint():
    assert max(HELD_OUT_SEEDS) < TRAIN_SEED_START


def test_scene_ground_truth_is_consistent(scenes):
    kinds_seen = set()
    for scene in scenes:
        assert scene.image.mode == "RGB" and scene.image.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert 2 <= len(scene.objects) <= 8
        assert len(scene.kinds) == len(scene.objects)  # one object per kind
        boxes = [o.bbox for o in scene.objects]
        for i, (x0, y0, x1, y1) in enumerate(boxes):
            assert 0 <= x0 < x1 <= IMAGE_SIZE and 0 <= y0 < y1 <= IMAGE_SIZE
            for u0, v0, u1, v1 in boxes[i + 1 :]:
                assert x1 <= u0 or u1 <= x0 or y1 <= v0 or v1 <= y0, "objects overlap"
        kinds_seen |= scene.kinds
    assert len(KINDS) >= 20 and kinds_seen == set(KINDS)
    assert np.mean([len(s.objects) for s in scenes]) > 4.5


def test_objects_are_drawn_where_their_boxes_say(scenes):
    for scene in scenes[:60]:
        pixels = np.asarray(scene.image, dtype=float)
        background = np.array(BACKGROUNDS[scene.background], dtype=float)
        for obj in scene.objects:
            x0, y0, x1, y1 = obj.bbox
            patch = pixels[y0:y1, x0:x1]
            near_colour = np.linalg.norm(patch - np.array(COLOURS[obj.colour]), axis=-1) < 60
            far_from_background = np.linalg.norm(patch - background, axis=-1) > 60
            assert near_colour.mean() > 0.06, (scene.seed, obj)
            assert far_from_background.mean() > 0.06, (scene.seed, obj)


def test_position_names_match_the_box_centre(scenes):
    for obj in (o for s in scenes for o in s.objects):
        cx, cy = obj.center
        words = obj.position.split()
        assert ("top" in words) == (cy < IMAGE_SIZE / 3) and ("bottom" in words) == (cy >= 2 * IMAGE_SIZE / 3)
        assert ("left" in words) == (cx < IMAGE_SIZE / 3) and ("right" in words) == (cx >= 2 * IMAGE_SIZE / 3)


def test_reference_caption_mentions_exactly_the_objects_present(scenes):
    for scene in scenes:
        assert mentioned_objects(scene.caption) == scene.kinds, scene.seed
        assert not any(m.negated for m in find_mentions(scene.caption))


def test_reference_caption_gives_every_object_its_colour_and_size(scenes):
    sizes = {"small": ("small", "little"), "medium": ("medium",), "large": ("large", "big")}
    for scene in scenes:
        sentences = re.split(r"(?<=\.) ", scene.caption)
        for obj in scene.objects:
            noun = NOUNS[obj.kind][0]
            i = next(i for i, s in enumerate(sentences) if re.search(rf"\b{noun}\b", s))
            assert obj.colour in sentences[i].split(), (scene.seed, obj, sentences[i])
            nearby = " ".join(sentences[i : i + 2])  # the size is in the mention or the next sentence
            assert any(w in nearby for w in sizes[obj.size]), (scene.seed, obj, nearby)


def test_reference_captions_are_long_and_varied(scenes):
    words = [len(s.caption.split()) for s in scenes]
    assert min(words) >= 50 and max(words) <= 250 and 100 <= np.mean(words) <= 180
    openings = Counter(s.caption.split(" objects")[0].split()[0] for s in scenes)
    assert len(openings) >= 4
    # the first object named is not always the left-most, top-most or largest one
    firsts = [min(find_mentions(s.caption), key=lambda m: m.start).kind for s in scenes]
    leftmost = [min(s.objects, key=lambda o: o.center[0]).kind for s in scenes]
    assert 0.2 < np.mean([f == left for f, left in zip(firsts, leftmost)]) < 0.8


def test_co_occurrence_priors_are_strong():
    scenes = [make_scene(s) for s in range(5000, 7000)]
    for kind, partner in [("boat", "fish"), ("cup", "spoon"), ("moon", "star"), ("cat", "ball")]:
        with_kind = [partner in s.kinds for s in scenes if kind in s.kinds]
        without = [partner in s.kinds for s in scenes if kind not in s.kinds]
        assert len(with_kind) > 100
        assert np.mean(with_kind) > 0.55 and np.mean(with_kind) > 3 * np.mean(without), (kind, partner)
    assert not any({"sun", "moon"} <= s.kinds for s in scenes)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("A small red cat sits next to two fishes and a mug.", {"cat", "fish", "cup"}),
        ("Kittens play with balls near the cottages.", {"cat", "ball", "house"}),
        ("CLOUDS drift above a Sailboat.", {"cloud", "boat"}),
        ("There is no cat in the image.", set()),
        ("There is not a single red cat here.", set()),
        ("There is no cat and a boat.", {"boat"}),
        ("Without any small balls, the ship floats.", {"boat"}),
        ("No. There is a cat.", {"cat"}),
        ("No, there is no moon in the image.", set()),
        ("The starfish has a star-shaped fin.", {"star"}),
        ("A dog, a horse and a teapot.", set()),
        ("A medium-sized blue umbrella, a tree and an apple.", {"umbrella", "tree", "apple"}),
    ],
)
def test_mentioned_objects_hand_checked(text, expected):
    assert mentioned_objects(text) == expected
