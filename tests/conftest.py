import os

import pytest
import torch
from PIL import Image

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# without CUDA, Triton can only interpret (tests/test_decode_attention.py); it reads this when it is imported, which
# transformers does: set it first. Nothing where Triton is not installed
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from neverfade.models.random import FAMILIES, build_random  # noqa: E402

# the engine, method and decoding tests: CI runs them on the oldest supported transformers too (`pytest -m core`)
CORE = {
    "test_sparc.py",
    "test_captured.py",
    "test_methods.py",
    "test_opera.py",
    "test_sgrs.py",
    "test_vcd.py",
    "test_families.py",
    "test_real_configs.py",
    "test_compat.py",
    "test_paper.py",
}

SLOW = {"test_crash.py", "test_distributed.py", "test_compile.py"}  # CLI processes killed and resumed; torch.compile
BROWSER = {"test_demo.py"}  # headless Chromium


def pytest_collection_modifyitems(items):
    for item in items:
        for names, mark in ((CORE, pytest.mark.core), (SLOW, pytest.mark.slow), (BROWSER, pytest.mark.browser)):
            if item.path.name in names:
                item.add_marker(mark)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Each family's tiny random model, saved once per session; loaded through from_pretrained by the tests."""
    root = tmp_path_factory.mktemp("models")
    return {family: str(build_random(family, root / family)) for family in FAMILIES}


def make_images():
    """Three images of different sizes and content (different token counts for LLaVA-NeXT and Qwen-VL)."""
    images = []
    for i, (w, h) in enumerate([(40, 30), (64, 100), (90, 56)]):
        img = Image.new("RGB", (w, h))
        img.putdata(
            [
                ((x * 37 + i * 80) % 256, (y * 53) % 256, ((x + y) * 11 + i * 40) % 256)
                for y in range(h)
                for x in range(w)
            ]
        )
        images.append(img)
    return images


def full_forward_inputs(inputs, ids):
    """Arguments for a cache-free forward of the whole sequence `ids` (the prompt of `inputs` plus tokens chosen since),
    as the plain references run it."""
    kwargs = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
    if "mm_token_type_ids" in inputs:
        grown = ids.shape[1] - inputs["mm_token_type_ids"].shape[1]
        kwargs["mm_token_type_ids"] = torch.nn.functional.pad(inputs["mm_token_type_ids"], (0, grown))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, **kwargs)
