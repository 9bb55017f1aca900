"""Sample inputs that need no download: held-out synthetic scenes, whose objects are known exactly."""

from __future__ import annotations

import os
from pathlib import Path

from neverfade.data.items import Item
from neverfade.paths import cache_dir

WORLDS = ("default", "hard")  # scenes/generator.py's world, scenes/hard.py's (the testbed's)


def world_for(model: str | None) -> str:
    """The scene world a model was trained on: the hard one for the testbed, else the default."""
    return "hard" if model == "testbed" else "default"


def world_partners(world: str = "default"):
    """`partners(kind)`: the kinds a world's co-occurrence priors pair with `kind` (default: `kinds.PARTNERS`,
    the partners its presence pulls in; hard: the other kinds of its theme)."""
    from neverfade.scenes import PARTNERS
    from neverfade.scenes.hard import partners

    if world not in WORLDS:
        raise ValueError(f"unknown scene world {world!r}; choose from {', '.join(WORLDS)}")
    return partners if world == "hard" else lambda kind: set(PARTNERS.get(kind, {}))


def make_world_scene(seed: int, world: str = "default"):
    from neverfade.scenes import make_scene
    from neverfade.scenes.hard import make_hard_scene

    if world not in WORLDS:
        raise ValueError(f"unknown scene world {world!r}; choose from {', '.join(WORLDS)}")
    return (make_hard_scene if world == "hard" else make_scene)(seed)


def scene_items(seeds, world: str = "default") -> list[Item]:
    """Items for the scenes of `seeds` in `world`, rendered once into the cache folder, with their objects in
    `meta`."""
    folder = cache_dir() / "scenes" / _generator_hash()
    folder.mkdir(parents=True, exist_ok=True)
    items = []
    for seed in seeds:
        scene = make_world_scene(seed, world)
        path = folder / f"{'hard-' if world == 'hard' else ''}scene-{seed:05d}.png"
        if not path.exists():
            tmp = path.with_suffix(f".{os.getpid()}.png")
            scene.image.save(tmp)
            tmp.replace(path)
        items.append(Item(id=f"scene-{seed:05d}", image=str(path), meta={"objects": sorted(scene.kinds)}))
    return items


def sample_scene_items(count: int, world: str = "default") -> list[Item]:
    """The first `count` held-out scenes of `world`."""
    from neverfade.scenes import HELD_OUT_SEEDS

    if not 1 <= count <= len(HELD_OUT_SEEDS):
        raise ValueError(f"--samples must be between 1 and {len(HELD_OUT_SEEDS)}, got {count}")
    return scene_items(HELD_OUT_SEEDS[:count], world)


def _generator_hash() -> str:
    """A digest of the scene generator's code: a changed generator renders into a new folder, never a stale one."""
    import hashlib

    import neverfade.scenes as scenes

    digest = hashlib.sha1()
    for source in sorted(Path(scenes.__file__).parent.glob("*.py")):
        digest.update(source.read_bytes())
    return digest.hexdigest()[:10]


def mark_objects(text: str, objects: list[str]) -> str:
    """The caption with each object word marked [word ✓] if the scene has it, [word ✗] if not."""
    from neverfade.scenes import find_mentions

    present, out, last = set(objects), [], 0
    for m in find_mentions(text):
        if m.negated:
            continue
        out.append(text[last : m.start])
        out.append(f"[{text[m.start : m.end]} {'✓' if m.kind in present else '✗'}]")
        last = m.end
    return "".join(out) + text[last:]
