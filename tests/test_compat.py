"""The one module that knows transformers' version-dependent names: its range agrees with what pip is told, and
each name it hands out is the one the installed release uses."""

from __future__ import annotations

import inspect
import logging
import tomllib
from pathlib import Path

import pytest
import transformers
from transformers.generation.utils import GenerateDecoderOnlyOutput, GenerationMixin

from neverfade import compat


def test_the_declared_range_is_the_tested_one():
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    spec = next(d for d in project["dependencies"] if d.startswith("transformers"))
    low, high = compat.SUPPORTED
    major, last = compat.minor(high)
    assert spec.split("#")[0].strip() == f"transformers>={low},<{major}.{last + 1}"


def test_the_installed_release_is_supported():
    assert compat.supported(), f"CI must run a supported transformers, not {transformers.__version__}"


@pytest.mark.parametrize(
    "version, expected",
    [("5.17.0", True), ("5.24.0", True), ("5.24.1.dev0", True), ("5.16.2", False), ("5.25.0", False), ("6.0.0", False)],
)
def test_supported_compares_minors(version, expected):
    assert compat.supported(version) is expected


def test_an_untested_release_is_named_in_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(compat, "VERSION", "5.99.0")
    compat.warn_if_untested.cache_clear()
    with caplog.at_level(logging.WARNING, logger="neverfade"):
        compat.warn_if_untested()
        compat.warn_if_untested()
    compat.warn_if_untested.cache_clear()
    assert [r.getMessage().count("5.99.0") for r in caplog.records] == [1]


def test_the_cache_name_is_the_installed_one():
    parameters = inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    assert compat.CACHE in parameters
    assert compat.CACHE in GenerateDecoderOnlyOutput.__dataclass_fields__
    other = {"cache", "past_key_values"} - {compat.CACHE}
    cache = object()
    assert compat.cache_of({other.pop(): cache}) is cache  # a caller may still use the older name
    assert compat.with_cache({"past_key_values": 1, "cache": 2, "x": 3}, cache) == {"x": 3, compat.CACHE: cache}
    assert compat.decoder_output(None, None, cache)[compat.CACHE] is cache


def test_every_private_helper_exists():
    for name in (
        "_update_model_kwargs_for_generation",
        "_get_top_k_continuations",
        "_get_running_beams_for_next_iteration",
        "_update_finished_beams",
        "_check_early_stop_heuristic",
        "_beam_search_has_unfinished_sequences",
        "prepare_inputs_for_generation",
    ):
        assert callable(getattr(GenerationMixin, name, None)), name
    from transformers import GenerationConfig

    assert {"_pad_token_tensor", "_eos_token_tensor"} <= set(
        dir(GenerationConfig()) + list(GenerationConfig.__annotations__)
    )
    with pytest.raises(compat.UnsupportedTransformers, match="no beam-search helper"):
        compat.beam_helper(object(), "_renamed_helper", {})
