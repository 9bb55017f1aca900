"""The fast decode path: a static KV cache, and every decode step replayed from one captured CUDA graph.

Run through `generate(cache_implementation="static", custom_generate=decoding.custom_generate("static"))`. The
prefill and the first decode step run eagerly (the first decode step doubles as the warm-up that CUDA graph capture
needs); the second step is captured, and every later step replays it. The step's inputs live in fixed buffers that
the graph itself advances (positions +1, the new key unmasked), so the host only writes the chosen token and never
waits for the GPU, except every `check_every` steps to see whether every sequence has finished. Methods run inside
the graph: their per-step state must be tensors updated in place, never Python values (`Flags.capturable`).

Models whose layers are of different kinds (Gemma 3's sliding-window and global layers: the text config's
`layer_types`) get one mask per kind, as a dict, which transformers' models take in place of the one mask. Every
layer of the static cache keeps every key (`compat.keep_every_key`), so the masks all span the same keys; a sliding
layer's mask also hides the keys that fell out of its window, and each step moves that window by one, in place.

Without CUDA (or with `capture=False`) the same loop runs the step eagerly: that is the reference the captured
replay is checked against.

With `compile=True` the decode steps' forward is compiled by torch.compile (inductor, static shapes; transformers'
own recipe for a static cache compiles the forward the same way): the first decode step compiles it (or finds it in
inductor's cache, `inductor_cache_dir`), and on CUDA the captured graph then replays the compiled kernels. The
prefill stays eager. The engine's hook and the loop's buffer updates stay outside the compiled code.
"""

from __future__ import annotations

import os
import time

import torch

from neverfade import compat
from neverfade.decoding.loop import DecodingLoop
from neverfade.errors import CannotAct
from neverfade.models.families import family_of


class CaptureFailed(CannotAct):
    """The decode step could not be captured in a CUDA graph: an error, not a quiet slow path."""


class CompileRefused(CannotAct):
    """The decode step was asked to be compiled (`compile=True`, --compile) where neverfade does not compile it: an
    error naming why, never an uncompiled run that claims to be compiled."""


LAYER_KINDS = ("full_attention", "sliding_attention")  # the layer types the loop builds masks for


class StaticLoop(DecodingLoop):
    def __init__(self, capture: bool | None = None, check_every: int = 16, compile: bool | str = False, **loop):
        """`capture`: replay the steps from a CUDA graph (default: on CUDA). `compile`: run the decode steps'
        forward compiled by torch.compile (`compiled_forward`; True or a mode of `COMPILE_MODES`), before any
        capture."""
        super().__init__(**loop)
        self.capture = capture
        self.compile = compile_mode(compile)
        self.forward_step = compiled_forward(self.model, self.compile) if self.compile else self.model
        self.compile_s = None  # with `compile`: seconds of the first decode step (compiling it, or finding it cached)
        self.check_every = check_every
        self.graph = self.static = None
        self.captured = False  # whether the steps after the second ran from a graph (for the bench and tests)
        self.full = self.sliding = None  # the masks' buffers: (B, 1, 1, keys), True where a key may be attended
        self.marks: list = []  # when steps 0-3 began and the run ended: CUDA events (no waiting), else host seconds

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
        lengths = {getattr(layer, "max_cache_len", None) for layer in cache.layers}
        if len(lengths) != 1 or None in lengths:
            raise CannotAct(
                f"the static decode loop needs every layer of the KV cache to keep every key, and its layers hold "
                f"{', '.join(map(str, sorted(lengths, key=str)))} keys: decode with decode='eager' (--decode eager)"
            )
        keys = lengths.pop()
        mask = kwargs.get("attention_mask")
        prompt = mask.bool() if mask is not None else torch.ones_like(input_ids, dtype=torch.bool)
        key_ok = torch.nn.functional.pad(prompt, (0, keys - prompt.shape[1]), value=True)
        self.query = torch.tensor([input_ids.shape[1] - 1], device=input_ids.device)  # cache index of the fed token
        self.key_index = torch.arange(keys, device=input_ids.device)
        self.full = (key_ok & (self.key_index <= self.query))[:, None, None, :].contiguous()
        static["attention_mask"] = self._masks()
        static["return_dict"] = True
        return static

    def _masks(self):
        """The step's mask: the one buffer, or where the layers are of different kinds, a dict from each kind to
        its buffer (the sliding one: the keys within the window of the newest query)."""
        text = self.model.config.get_text_config()
        kinds = set(getattr(text, "layer_types", None) or ("full_attention",))
        unknown = sorted(kinds - set(LAYER_KINDS))
        window = getattr(text, "sliding_window", None)
        if unknown or ("sliding_attention" in kinds and not window):
            what = f"layers of kind {', '.join(unknown)}" if unknown else "sliding-window layers without a window"
            raise CannotAct(
                f"the static decode loop has no mask for {what}: decode with decode='eager' (--decode eager)"
            )
        if kinds == {"full_attention"}:
            return self.full
        self.window, self.sliding = window, torch.empty_like(self.full)
        self._slide()
        return {"full_attention": self.full, "sliding_attention": self.sliding}

    def _slide(self):
        """The sliding mask from the full one: the keys within `window` of the newest query (as transformers'
        `sliding_window_overlay`: key > query - window)."""
        torch.logical_and(self.full, self.key_index > self.query - self.window, out=self.sliding)

    def _step(self):
        out = self.forward_step(**self.static)
        self._keep_logits(out.logits[:, -1])
        for name in self.advancing:
            if isinstance(self.static.get(name), torch.Tensor):
                self.static[name].add_(1)
        self.query.add_(1)
        self.full.logical_or_(self.key_index == self.query)
        if self.sliding is not None:
            self._slide()

    def _keep_logits(self, logits) -> None:
        """The step's newest logits into the buffer the loop reads."""
        self.logits.copy_(logits)

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
            except CompileRefused:
                raise
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
        compat.keep_every_key(compat.cache_of(model_kwargs))  # before the prefill fills it, with or without methods
        super().start(input_ids, model_kwargs)

    def _mark(self, device) -> None:
        if device.type == "cuda":
            self.marks.append(torch.cuda.Event(enable_timing=True))
            self.marks[-1].record()
        else:
            self.marks.append(time.perf_counter())

    def stage_seconds(self) -> dict[str, float]:
        """Where the last run's time went: the prefill, the eager first decode step (compiling it with `compile`),
        the second (captured, with the capture's host time), and the later steps (replays); each from when its
        step began to when the next began (the token's choice included), on the GPU's clock on CUDA. Read after
        the run: the events are waited for here, never during it."""
        names = ("prefill", "first step", "capture" if self.captured else "second step", "later steps")
        if self.marks and isinstance(self.marks[0], torch.cuda.Event):
            self.marks[-1].synchronize()
            spans = [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        else:
            spans = [b - a for a, b in zip(self.marks, self.marks[1:])]
        return dict(zip(names, spans))

    def step_logits(self, input_ids, step):
        if step < 4:
            self._mark(input_ids.device)
        if step == 0:
            out, self.kwargs = self.forward(input_ids, self.kwargs, first=True)
            logits = out.logits[:, -1].float()
            self.logits = torch.empty_like(logits)
            return logits
        if step == 1:
            self.static = self._buffers(input_ids, self.kwargs)
            if self.compile:  # this step compiles the forward (or finds it compiled): timed, with the device idle
                _synchronize(input_ids.device)
                started = time.perf_counter()
                logits = self._next_logits(input_ids, input_ids[:, -1], step)
                _synchronize(input_ids.device)
                self.compile_s = time.perf_counter() - started
                return logits
        return self._next_logits(input_ids, input_ids[:, -1], step)

    def finish(self):
        self._mark(self.logits.device)
        self.graph = self.static = self.full = self.sliding = None  # frees the graph's pool and the buffers
        super().finish()


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


RECOMPILE_LIMIT = 64  # compiled variants of the decode step per model: batch sizes x method settings x masks


def inductor_cache_dir() -> str:
    """Where inductor keeps compiled kernels across runs: $TORCHINDUCTOR_CACHE_DIR where the user set it, else
    neverfade's cache folder's `inductor` (set in the environment here, before the first compile reads it)."""
    from neverfade.paths import cache_dir

    return os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))


COMPILE_MODES = {  # inductor's options per mode, beside emulate_precision_casts
    "default": {},
    # GEMMs chosen by timing inductor's templates against cuBLAS (at batch 1 a GEMV with its neighbours fused in)
    # and tuned launch settings for the other kernels: minutes to compile, a faster step
    "max-autotune": {"max_autotune": True, "coordinate_descent_tuning": True},
}


def compile_mode(compile: bool | str | None) -> str | None:
    """`compile` as a mode of COMPILE_MODES: None when not compiled, True for "default"."""
    if compile is None or compile is False:
        return None
    if compile is True:
        return "default"
    if compile not in COMPILE_MODES:
        raise ValueError(f"compile mode {compile!r}: choose True, {', '.join(map(repr, COMPILE_MODES))}")
    return compile


def compiled_forward(model, mode: str = "default"):
    """The model's forward for decode steps, compiled by torch.compile once per model and mode (COMPILE_MODES) and
    kept on it: one graph, static shapes (a graph break is an error, `CompileRefused`; a new batch size or method
    setting compiles a variant; one beyond `RECOMPILE_LIMIT` is an error too, never a quiet eager forward). inductor
    emulates the eager path's rounding of intermediate casts; in bfloat16 its other summation orders can still turn
    a near-tie (max-autotune's GEMV reductions more often). Called through the model, so its forward hooks (the
    engine's step counter) run eagerly around the compiled forward."""
    compiled = getattr(model, "_neverfade_compiled_forwards", None)
    if compiled is None:
        compiled = model._neverfade_compiled_forwards = {}
    if mode not in compiled:
        inductor_cache_dir()
        import torch._dynamo.config as dynamo

        dynamo.recompile_limit = max(dynamo.recompile_limit, RECOMPILE_LIMIT)
        dynamo.fail_on_recompile_limit_hit = True
        options = {"emulate_precision_casts": True, **COMPILE_MODES[mode]}
        step = torch.compile(_decode_forward, fullgraph=True, dynamic=False, options=options)
        compiled[mode] = _Hooked(model, step)
    return compiled[mode]


_ALL_SDPA = (True, True, True, True)


def _sdpa_backends() -> tuple[bool, bool, bool, bool]:
    """The SDPA kernels enabled now (flash, memory-efficient, math, cuDNN): `sdpa_kernel` sets them."""
    cuda = torch.backends.cuda
    return cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(), cuda.math_sdp_enabled(), cuda.cudnn_sdp_enabled()


def _decode_forward(forward, sdpa_backends, inputs):
    """What is compiled: the model's own forward. torch.compile does not otherwise guard on the SDPA kernels enabled
    (the kernel is chosen when the step is traced), so the comparison below makes them a guard: a step run under
    `sdpa_kernel` (bench --check pins it) compiles its own variant instead of replaying a kernel chosen without."""
    if sdpa_backends != _ALL_SDPA:
        pass
    return forward(**inputs)


class _Hooked:
    """Calls `model` with the compiled `step` in place of its forward: the hooks stay outside the compiled code."""

    def __init__(self, model, step):
        self.model, self.step, self.own = model, step, model.forward

    def __call__(self, **inputs):
        import torch._dynamo.exc as dynamo

        sdpa = _sdpa_backends()
        self.model.forward = lambda **kwargs: self.step(self.own, sdpa, kwargs)
        try:
            out = self.model(**inputs)
        except (dynamo.TorchDynamoException, dynamo.FailOnRecompileLimitHit) as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise CompileRefused(
                f"the decode step could not be compiled ({type(err).__name__}: {first}; transformers "
                f"{compat.VERSION}, torch {torch.__version__}); decode without compile=True (--compile)"
            ) from err
        finally:
            del self.model.forward
        engine = getattr(self.model, "_neverfade_engine", None)
        if engine is not None:
            engine.count_compiled()
        return out
