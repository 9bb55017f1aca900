"""Which scene world a command draws its held-out scenes from."""

from argparse import Namespace

import pytest

from neverfade.commands.options import scene_world
from neverfade.data.samples import sample_scene_items, scene_items
from neverfade.scenes import make_scene
from neverfade.scenes.hard import make_hard_scene


def test_the_testbed_gets_the_hard_world_unless_told_otherwise():
    assert scene_world(Namespace(world=None, model="testbed")) == "hard"
    assert scene_world(Namespace(world=None, model=None)) == "default"
    assert scene_world(Namespace(world="default", model="testbed")) == "default"


def test_scene_items_render_the_world_asked_for(tmp_path, monkeypatch):
    monkeypatch.setenv("NEVERFADE_CACHE", str(tmp_path))
    hard, default = scene_items([3], "hard")[0], sample_scene_items(1)[0]
    assert hard.meta["objects"] == sorted(make_hard_scene(3).kinds) != sorted(make_scene(3).kinds)
    assert default.meta["objects"] == sorted(make_scene(0).kinds)
    assert hard.image != scene_items([3])[0].image
    with pytest.raises(ValueError, match="unknown scene world"):
        scene_items([0], "other")
