"""Decoding loops run through `generate(custom_generate=...)`, registered by name.

A method that chooses tokens its own way names its loop in `Flags.strategy`; the engine passes
`custom_generate(strategy, method)` to generate. "static" is the captured decode path (any capturable methods); a
strategy in STATIC_STRATEGIES has a loop of its own on that path too.
"""

from __future__ import annotations

import importlib

STRATEGIES = {  # name -> "module:class" of a DecodingLoop
    "contrast": "neverfade.decoding.contrast:ContrastLoop",  # two branches, logits combined (VCD, PAI's guidance)
    "rejection": "neverfade.decoding.rejection:RejectionLoop",  # candidates rejected by saliency (SGRS)
    "beam": "neverfade.decoding.opera:BeamLoop",  # OPERA's beam search with roll-back
    "static": "neverfade.decoding.captured:StaticLoop",  # a static cache, steps replayed from a CUDA graph
}
STATIC_STRATEGIES = {  # a strategy's loop on the captured decode path
    "rejection": "neverfade.decoding.rejection:StaticRejectionLoop",
}


def loop_class(strategy: str) -> type:
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown decoding strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
    return _load(STRATEGIES[strategy])


def static_loop(strategy: str | None) -> type | None:
    """The loop of the captured decode path for a method's `strategy` (None: the methods' hooks alone), or None
    where that strategy has no such loop."""
    if strategy is None:
        return loop_class("static")
    return _load(STATIC_STRATEGIES[strategy]) if strategy in STATIC_STRATEGIES else None


def _load(where: str) -> type:
    module, name = where.split(":")
    return getattr(importlib.import_module(module), name)


def custom_generate(strategy: str | type, method=None, **options):
    """The callable for `generate(custom_generate=...)` that runs the loop `strategy` (a registered name, or a
    DecodingLoop subclass) for `method`, with the loop's own `options`.

    Generate calls it with the keyword arguments it was given; two of them are neverfade's: `neverfade_inputs`, the
    processor's outputs (a contrast branch needs the pixels, which generate may have encoded and dropped), and
    `neverfade_streamer` (transformers 5.23 does not pass generate's `streamer` to a callable loop)."""
    loop_type = strategy if isinstance(strategy, type) else loop_class(strategy)

    def decode(
        model,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        synced_gpus=False,
        streamer=None,
        *,
        neverfade_inputs=None,
        neverfade_streamer=None,
        **model_kwargs,
    ):
        if synced_gpus:
            raise ValueError(f"{getattr(method, 'name', None) or loop_type.__name__} does not support synced_gpus")
        loop = loop_type(
            model=model,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
            generation_config=generation_config,
            streamer=streamer or neverfade_streamer,
            method=method,
            raw_inputs=neverfade_inputs,
            **options,
        )
        model._neverfade_last_loop = loop  # for the bench and the tests
        return loop.run(input_ids, model_kwargs)

    return decode
