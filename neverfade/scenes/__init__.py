"""A synthetic scene world with exact ground truth, and the small captioning model trained on it.

    scene = make_scene(7)                    # .image (192x192 RGB), .objects, .kinds, .caption
    mentioned_objects("A red cat and no fish.")  -> {"cat"}
    scene_metrics(captions, scenes)          # precision, recall, f1, chair_i, chair_s, words, per_caption
    embedded_model_path()                    # the packaged model, for from_pretrained

Seeds 0..9_999 are held out for evaluation (`HELD_OUT_SEEDS`); training uses seeds >= 1_000_000.
See docs/embedded.md.
"""

from .generator import HELD_OUT_SEEDS, IMAGE_SIZE, TRAIN_SEED_START, Scene, SceneObject, make_scene
from .kinds import KINDS, PARTNERS
from .metrics import bootstrap_ci, scene_metrics
from .model import embedded_model_path
from .vocab import find_mentions, mentioned_objects

__all__ = [
    "HELD_OUT_SEEDS",
    "IMAGE_SIZE",
    "KINDS",
    "PARTNERS",
    "TRAIN_SEED_START",
    "Scene",
    "SceneObject",
    "bootstrap_ci",
    "embedded_model_path",
    "find_mentions",
    "make_scene",
    "mentioned_objects",
    "scene_metrics",
]
