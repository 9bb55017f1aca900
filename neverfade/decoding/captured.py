"""The fast decode path: a static KV cache, and every decode step replayed from one captured CUDA graph.

Run through `generate(cache_implementation="static", custom_generate=decoding.custom_generate("static"))`. The
prefill and the first decode step run eagerly (the first decode step doubles as the warm-up that CUDA graph capture
needs); the second step is captured, and every later step replays it. The step's inputs live in fixed buffers that
the graph itself advances (positions +1, the new key unmasked), so the host only writes the chosen token and never
waits for the GPU, except every `check_every` steps to see whether every sequence has finished. Methods run inside
the graph: their per-step state must be tensors updated in place, never Python values (`Flags.capturable`).

Without CUDA (or with `capture=False`) the same loop runs the step eagerly: that is the reference the captured
replay is checked against.
"""

from __future__ import annotations

import torch

from neverfade import compat
from neverfade.decoding.loop import DecodingLoop
from neverfade.errors import CannotAct
from neverfade.models.families import family_of


class CaptureFailed(CannotAct):
    """The decode step could not be captured in a CUDA graph: an error, not a quiet slow path."""


def per_layer_masks_refusal(family) -> str:
    return (
        f"{family.name} has sliding-window and global layers, and the static decode loop keeps one attention mask for "
        "every layer: decode with decode='eager' (--decode eager)"
    )


class StaticLoop(DecodingLoop):
    def __init__(self, capture: bool | None = None, check_every: int = 16, **loop):
        """`capture`: replay the steps from a CUDA graph (default: on CUDA)."""
        super().__init__(**loop)
        self.capture = capture
        self.check_every = check_every
        self.graph = self.static = None
        self.captured = False  # whether the steps after the second ran from a graph (for the bench and tests)

    # ---- the step's fixed buffers ----
    def _buffers(self, input_ids, kwargs):
        """The first decode step's inputs, as generate prepares them, copied into buffers the graph can own."""
        inputs = self.model.prepare_inputs_for_generation(
            input_ids, next_sequence_length=1, is_first_iteration=False, **kwargs
        )
        cache = compat.cache_of(inputs)
        if cache is None or not getattr(cache, "is_compileable", False):
            raise compat.UnsupportedTransformers(
                f"the captured decode path needs generate's static KV cache, and got {type(cache).__name__}"
            )
        family = family_of(type(self.model).__name__)  # besides transformers' own, the family's image metadata
        if family.per_layer_masks:
            raise CannotAct(per_layer_masks_refusal(family))
        self.advancing = (*compat.STEP_ADVANCING, *family.step_advancing)
        constant = (*compat.STEP_CONSTANT, *family.step_constant)
        static = compat.with_cache({}, cache)
        for name, value in compat.without_cache(inputs).items():
            if name == "attention_mask":
                continue
            if isinstance(value, torch.Tensor):
                if name != "input_ids" and name not in self.advancing and name not in constant:
                    raise compat.UnsupportedTransformers(
                        f"the captured decode path cannot follow the per-step input {name!r}"
                    )
                value = value.clone()
            static[name] = value
        keys = cache.layers[0].max_cache_len
        mask = kwargs.get("attention_mask")
        prompt = mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        key_ok = torch.nn.functional.pad(prompt, (0, keys - prompt.shape[1]), value=True)
        self.query = torch.tensor([input_ids.shape[1] - 1], device=input_ids.device)  # cache index of the fed token
        self.key_index = torch.arange(keys, device=input_ids.device)
        static["attention_mask"] = (key_ok & (self.key_index <= self.query))[:, None, None, :].contiguous()
        static["return_dict"] = True
        return static

    def _step(self):
        out = self.model(**self.static)
        self.logits.copy_(out.logits[:, -1])
        for name in self.advancing:
            if isinstance(self.static.get(name), torch.Tensor):
                self.static[name].add_(1)
        self.query.add_(1)
        self.static["attention_mask"].logical_or_(self.key_index == self.query)

    def _next_logits(self, input_ids, tokens, step: int) -> torch.Tensor:
        """Logits of decode step `step` (1-based), whose input is the newest `tokens`."""
        self.static["input_ids"].copy_(tokens[:, None])
        if self.graph is not None:
            self.graph.replay()
        elif self.capture and step == 1:  # the warm-up capture needs, on a side stream
            try:
                side = torch.cuda.Stream()
            except Exception as err:
                raise self._failed(err) from err
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                self._step()
            torch.cuda.current_stream().wait_stream(side)
        elif self.capture and step == 2:
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    self._step()
                self.graph, self.captured = graph, True
                graph.replay()
            except Exception as err:
                raise self._failed(err) from err
        else:
            self._step()
        return self.logits

    @staticmethod
    def _failed(err: Exception) -> CaptureFailed:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        return CaptureFailed(
            f"the decode step could not be captured in a CUDA graph ({first}; transformers "
            f"{compat.VERSION}, torch {torch.__version__}); decode without capture with "
            "decode='eager' (--decode eager)"
        )

    def start(self, input_ids, model_kwargs):
        if self.capture is None:
            self.capture = input_ids.device.type == "cuda"
        super().start(input_ids, model_kwargs)

    def step_logits(self, input_ids, step):
        if step == 0:
            out, self.kwargs = self.forward(input_ids, self.kwargs, first=True)
            logits = out.logits[:, -1].float()
            self.logits = torch.empty_like(logits)
            return logits
        if step == 1:
            self.static = self._buffers(input_ids, self.kwargs)
        return self._next_logits(input_ids, input_ids[:, -1], step)

    def finish(self):
        self.graph = self.static = None  # frees the graph's memory pool, and the buffers' hold on the cache
