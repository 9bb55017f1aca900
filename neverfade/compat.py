"""Every transformers name that is private or changed between the 5.x releases neverfade supports, in one place.

The supported range is `SUPPORTED` (both ends tested in CI). Outside it neverfade still runs, after one warning,
and refuses to decode as soon as something it relies on is missing, never falling back to the baseline quietly.
"""

from __future__ import annotations

import functools
import inspect
import logging

import transformers
from transformers.generation.utils import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput, GenerationMixin
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: F401  (the stock kernel)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask  # noqa: F401

from neverfade.errors import CannotAct

SUPPORTED = ("5.17", "5.24")  # lowest and highest transformers minor tested; keep pyproject.toml in step
VERSION = transformers.__version__

# 5.24 renamed the cache argument of the models, of prepare_inputs_for_generation and of generate's outputs from
# `past_key_values` to `cache` (the old name is deprecated, for removal in 5.40)
CACHE = (
    "cache"
    if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)
_CACHE_NAMES = ("cache", "past_key_values")

# the per-step inputs prepare_inputs_for_generation makes at a decode step in any family, besides input_ids, the cache
# and the mask (a family adds its own: `Family.step_advancing`, `Family.step_constant`):
STEP_ADVANCING = ("position_ids", "cache_position")  # +1 per step
STEP_CONSTANT = ("token_type_ids", "mm_token_type_ids", "logits_to_keep", "use_cache", "return_dict")  # the same


def smolvlm_image_processor():
    """SmolVLM's PIL image processor class, from its own module: in 5.17 the top-level name and the auto classes
    ask for torchvision, which it does not need."""
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    return SmolVLMImageProcessorPil


class UnsupportedTransformers(CannotAct):
    """Something neverfade relies on does not behave as in the supported transformers releases."""

    def __init__(self, what: str):
        super().__init__(
            f"{what} (transformers {VERSION}; neverfade is tested with {SUPPORTED[0]} to {SUPPORTED[1]}.x)"
        )


def minor(version: str) -> tuple[int, int]:
    major, minor_, *_ = (version.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int("".join(c for c in minor_ if c.isdigit()) or 0)


def supported(version: str | None = None) -> bool:
    return minor(SUPPORTED[0]) <= minor(version or VERSION) <= minor(SUPPORTED[1])


@functools.cache
def warn_if_untested() -> None:
    if not supported():
        logging.getLogger("neverfade").warning(
            "neverfade: transformers %s is outside the tested range %s to %s.x; an incompatibility is an error, "
            "never a silent baseline",
            VERSION,
            *SUPPORTED,
        )


def cache_of(kwargs: dict):
    """The KV cache among a model call's or generate's keyword arguments, under either name."""
    for name in _CACHE_NAMES:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def keep_every_key(cache) -> None:
    """Make the sliding-window layers of a fresh cache keep every key, as the global layers do, so a key's index is
    its position in every layer (the methods' per-key edits and observations are by position). Their masks are
    unchanged: transformers still masks the keys outside the window (Gemma 3's sliding-window layers). A static
    cache's sliding layers get the length of its global layers (none global: they stay as they are)."""
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer, StaticLayer, StaticSlidingWindowLayer

    layers = getattr(cache, "layers", None) or []
    full = [layer.max_cache_len for layer in layers if type(layer) is StaticLayer]
    for i, layer in enumerate(layers):
        if isinstance(layer, DynamicSlidingWindowLayer) and not layer.is_initialized:
            layers[i] = DynamicLayer()
        elif isinstance(layer, StaticSlidingWindowLayer) and not layer.is_initialized and full:
            layers[i] = StaticLayer(max_cache_len=max(full))


def without_cache(kwargs: dict) -> dict:
    return {k: v for k, v in kwargs.items() if k not in _CACHE_NAMES}


def with_cache(kwargs: dict, cache) -> dict:
    """`kwargs` with the cache under this version's name (and not under the other one)."""
    return {**without_cache(kwargs), CACHE: cache}


def update_model_kwargs(model, outputs, kwargs: dict, num_new_tokens: int = 1) -> dict:
    """generate's own update of the step's keyword arguments (cache, attention mask, positions, token types)."""
    return model._update_model_kwargs_for_generation(outputs, kwargs, num_new_tokens=num_new_tokens)


def attention_implementation(config) -> str | None:
    """The attention implementation a (text) config is set to."""
    return config._attn_implementation


def position_ids(model, input_ids, kwargs: dict):
    """The position ids generate would make for `input_ids` (Qwen-VL's 3-D rope positions included)."""
    return model._prepare_position_ids_for_generation(input_ids, dict(kwargs))


def pad_token(config):
    """The generation config's pad token as a tensor (or None), as generate prepared it."""
    return config._pad_token_tensor


def eos_tokens(config):
    return config._eos_token_tensor


def decoder_output(sequences, scores, cache) -> GenerateDecoderOnlyOutput:
    return GenerateDecoderOnlyOutput(sequences=sequences, scores=scores, **{_output_cache_field(): cache})


def beam_output(sequences, scores) -> GenerateBeamDecoderOnlyOutput:
    return GenerateBeamDecoderOnlyOutput(sequences=sequences, sequences_scores=scores)


@functools.cache
def _output_cache_field() -> str:
    fields = GenerateDecoderOnlyOutput.__dataclass_fields__
    name = next((n for n in _CACHE_NAMES if n in fields), None)
    if name is None:
        raise UnsupportedTransformers("generate's output has no cache field")
    return name


def beam_helper(model, name: str, common: dict, **arguments):
    """One of transformers' private beam-search helpers (`_get_top_k_continuations` and its siblings, as
    `generate(num_beams=N)` runs them), given the arguments it takes: their lists differ between releases (5.17 also
    takes vocab_size), their names do not."""
    helper = getattr(model, name, None)
    if helper is None:
        raise UnsupportedTransformers(f"generate has no beam-search helper {name}")
    accepted = inspect.signature(helper).parameters
    return helper(**{k: v for k, v in {**common, **arguments}.items() if k in accepted})
