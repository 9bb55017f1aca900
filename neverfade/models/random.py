"""Random-weight models of each supported family, saved like a hub checkpoint.

Two uses: small models for the tests (`size="tiny"`, built in seconds on a CPU and saved/loaded through the real
`from_pretrained` path), and real-size configurations for `neverfade bench`: `size="small"`, the family's smallest
published checkpoint with vision, and `size="7b"`, its 7B-class one (each family's `random_parts` names both; where
the smallest is the 7B-class one, the two are the same). The weights are random, so the text is meaningless; the
shapes, the processors and the timings are real.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, PreTrainedTokenizerFast

from neverfade.models.families import families
from neverfade.models.processors import image_only


def _by_name() -> dict:
    return {f.random_name: f for f in families()}


FAMILIES = tuple(_by_name())  # the names `random:<name>` takes, one per family
SIZES = ("tiny", "small", "7b")  # `random_model`'s sizes: tests, the smallest real checkpoint, the 7B-class one


def random_family(name: str):
    """The family `random:<name>` builds."""
    return _by_name()[name]


def tokenizer(specials: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A small byte-level BPE tokenizer with `specials`, left padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    corpus = [
        "Please describe this image in detail.",
        "USER: ASSISTANT: user assistant system",
        "A photo of a cat, a dog and a red car on a street under a blue sky with clouds.",
    ]
    tok.train_from_iterator(corpus * 10, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, padding_side="left")


def random_model(family: str, size: str = "tiny", seed: int = 0, dtype=torch.float32, device="cpu"):
    """A random-weight (model, processor) of `family` (its `random_name`) at `size` (one of `SIZES`), built in memory
    on `device` (a 7B model in seconds on a GPU; the same seed gives the same weights on the same kind of device)."""
    known = _by_name()
    if family not in known:
        raise ValueError(f"unknown family {family!r}; choose from {', '.join(known)}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose {', '.join(SIZES[:-1])} or {SIZES[-1]}")
    config, processor = known[family].random_parts(size)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    known[family].random_weights(model)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model, processor


def build_random(family: str, path: str | Path, size: str = "tiny", seed: int = 0, dtype=torch.float32) -> Path:
    """Build a random-weight model of `family` with its processor and save both under `path`."""
    model, processor = random_model(family, size, seed, dtype)
    path = Path(path)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    _record_processor_class(path, processor)
    return path


def _record_processor_class(path: Path, processor) -> None:
    """Save an image-only stand-in under the real class name, as a hub checkpoint has it."""
    real = type(processor).__mro__[1].__name__ if type(processor).__module__ == image_only.__module__ else None
    if real is None:
        return
    import json

    for name in ("processor_config.json", "tokenizer_config.json"):
        file = path / name
        if file.exists():
            data = json.loads(file.read_text())
            if "processor_class" in data:
                data["processor_class"] = real
                file.write_text(json.dumps(data, indent=2))


def cached_random(family: str) -> Path:
    """A tiny random model of `family`, built once into the user's cache directory."""
    import os

    from neverfade.paths import cache_dir

    root = cache_dir() / "random"
    path = root / f"{family}-tiny"
    if not (path / "config.json").exists():
        tmp = root / f".{family}-tiny.{os.getpid()}"
        build_random(family, tmp)
        tmp.replace(path) if not path.exists() else None
    return path
