"""The Python API: `load` a model with methods, or `attach` methods to a model you hold, then `caption`.

>>> c = neverfade.load("llava-hf/llava-1.5-7b-hf", methods=["sparc"])
>>> c.caption([Image.open("cat.jpg")], max_new_tokens=512)[0].text
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import BatchFeature

from neverfade import decoding
from neverfade.data.images import load_image
from neverfade.engine.contract import Method
from neverfade.engine.engine import Engine
from neverfade.methods import build_methods
from neverfade.models.families import FAMILIES, model_info
from neverfade.models.processors import load_processor
from neverfade.probes import ImageAttentionShare

DEFAULT_PROMPT = "Please describe this image in detail."


@dataclass
class Caption:
    text: str
    new_tokens: int
    seconds: float  # this caption's share of its batch's wall time
    image_attention: list[float] | None = None  # per new token, with record_attention: share of attention on the image


@dataclass
class Generation:
    """One batch captioned while probes watched (`Captioner.run`)."""

    inputs: Any  # the processor's batch, on the model's device
    token_ids: list[list[int]]  # per image: the new tokens up to and including the first end-of-sequence token
    seconds: float  # the batch's wall time
    records: dict[str, Any]  # probe name -> what it kept of the main branch: (B, steps, ...), step 0 the prompt's
    batch: Any = None  # the engine's Batch of the main branch (its image mask), when a probe watched


class PromptTooLong(ValueError):
    """Prompts that, with their image tokens and the new tokens asked for, need more positions than the model has;
    `items`: their indices in the batch."""

    def __init__(self, message: str, items: list[int]):
        super().__init__(message)
        self.items = items


class Captioner:
    """A model, its processor, and the methods attached to it."""

    def __init__(
        self,
        model,
        processor,
        methods: Iterable[Method | str] = (),
        name: str | None = None,
        decode: str = "auto",
        paper: bool = False,
        attention: str = "auto",
    ):
        """`paper`: run as the SPARC authors did for this family (`PaperSetup`): their prompt format, their image
        padding; the model must already be in their dtype (`load(..., paper=True)` loads it so). `attention`: the
        decode steps' attention in the methods' layers (see the `attention` property)."""
        family = model_info(model).family  # refuse unsupported architectures before anything else
        self.paper = family.paper if paper else None
        if paper:
            _check_paper(family, model.dtype)
        self.model = model.eval()
        self.processor = processor
        self.processor.tokenizer.padding_side = "left"
        self.name = name or getattr(model.config, "_name_or_path", "") or type(model).__name__
        self.engine: Engine | None = None
        self.attention_probe: ImageAttentionShare | None = None
        self.probes: list[Method] = []  # extra observers (neverfade.analysis), see `watch`
        self.decode = decode
        self.processor_lock = threading.Lock()  # `prepare` may run on another thread (the caption runner's)
        # compile the static loop's decode step with torch.compile (see `generate`): False (default), True or a mode
        # of neverfade.decoding.captured.COMPILE_MODES ("default", "max-autotune")
        self.compile: bool | str = False
        self.attention = attention
        if self.paper is not None and self.paper.pad_to_square:
            self.processor.image_processor = family.square_padding(self.processor.image_processor)
        self.use(methods)

    def record_attention(self, layer: int | None = None) -> Captioner:
        """From now on, each Caption carries `image_attention`: per new token, the share of attention on the image
        at `layer` (default: SPARC's selection layer for the family)."""
        self.attention_probe = ImageAttentionShare(layer=layer)
        return self.use(self.methods)

    def watch(self, *probes: Method) -> Captioner:
        """From now on, run these observers (neverfade.probes) beside the methods; `watch()` removes them.
        Observers force the eager decode path."""
        self.probes = list(probes)
        return self.use(self.methods)

    @property
    def methods(self) -> list[Method]:
        return self.engine.methods if self.engine else []

    def use(self, methods: Iterable[Method | str] = (), params: dict[str, dict[str, Any]] | None = None):
        """Replace the attached methods (an empty list is the baseline)."""
        if self.engine is not None:
            self.engine.detach()
            self.engine = None
        built = build_methods(methods, params)
        beams = any(m.flags().strategy == "beam" for m in built)  # the probe's per-step list cannot follow beams
        probes = [] if beams else [p for p in (self.attention_probe, *self.probes) if p is not None]
        if built or probes or self.attention == "fused":  # "fused" alone: the baseline on the kernel
            self.engine = Engine(self.model, built, probes, attention=self.attention).attach()
        return self

    def describe(self) -> list[dict[str, Any]]:
        return [m.describe() for m in self.methods]

    def setup(self) -> dict[str, Any]:
        """What besides the methods changes the output: the weights' dtype and paper mode."""
        return {"dtype": str(self.model.dtype).removeprefix("torch."), "paper": self.paper is not None}

    def prompt_text(self, prompt: str) -> str:
        if self.paper is not None and self.paper.conversation:
            return self.paper.conversation.format(image=self.processor.image_token, prompt=prompt)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    def prepare(self, images: list, prompt: str | list[str] = DEFAULT_PROMPT):
        """The processor's batch for `images` (PIL images or paths) and prompts, on the host. Safe to call from
        another thread while this one generates (the processor is used under a lock): `neverfade caption` prepares
        the next batch so while the current one decodes."""
        prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        pil = [im if isinstance(im, Image.Image) else load_image(im) for im in images]
        with self.processor_lock:
            return self.processor(
                text=[self.prompt_text(p) for p in prompts], images=pil, return_tensors="pt", padding=True
            )

    def inputs(self, images: list, prompt: str | list[str] = DEFAULT_PROMPT, prepared=None):
        """The processor's batch for `images` and prompts (or the `prepare`d one), on the model's device."""
        host = prepared if prepared is not None else self.prepare(images, prompt)
        inputs = BatchFeature(dict(host)).to(self.model.device)  # a new batch: `prepared` is left as it was
        if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        return inputs

    def check_room(self, lengths: list[int], max_new_tokens: int) -> None:
        """PromptTooLong unless each prompt (`lengths`: tokens with the image's) plus `max_new_tokens` fits the text
        model's max_position_embeddings (where its config has one); past it, the model writes garbage."""
        limit = getattr(self.model.config.get_text_config(), "max_position_embeddings", None)
        over = [i for i, n in enumerate(lengths) if limit and n + max_new_tokens > limit]
        if over:
            n = lengths[over[0]]
            raise PromptTooLong(
                f"the prompt is {n} tokens with its image and {max_new_tokens} new tokens are asked "
                f"for: {n + max_new_tokens} positions, beyond the model's {limit} "
                "(max_position_embeddings)",
                over,
            )

    @torch.no_grad()  # not inference_mode: SGRS takes gradients inside its loop
    def run(
        self,
        images: list,
        prompt: str | list[str] = DEFAULT_PROMPT,
        max_new_tokens: int = 512,
        watch: Iterable[Method] = (),
        do_sample: bool = False,
        prepared=None,
        **generate_kwargs,
    ) -> Generation:
        """Caption `images` with the attached methods while the probes in `watch` (neverfade.probes) observe: the one
        path under `caption`, `neverfade analyze` and the demo. `prepared`: `prepare(images, prompt)`, made before."""
        if generate_kwargs.get("num_beams", 1) > 1 and self.engine is not None:
            raise ValueError(
                "beam search is not supported with attention methods attached (their per-sequence "
                "state would not follow the beams); use greedy decoding or sampling"
            )
        inputs = self.inputs(images, prompt, prepared)
        self.check_room(inputs["attention_mask"].sum(1).tolist(), max_new_tokens)
        watch, kept = list(watch), self.probes
        if watch:
            self.watch(*kept, *watch)
        try:
            start = time.perf_counter()
            out = self.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=do_sample, **generate_kwargs)
            seconds = time.perf_counter() - start
        finally:
            if watch:
                self.watch(*kept)
        new = out[:, inputs["input_ids"].shape[1] :]
        ids = [row[:n] for row, n in zip(new.tolist(), self._count_new_tokens(new))]
        generation = Generation(inputs, ids, seconds, {})
        for probe in watch:
            taken = probe.take_batch() if hasattr(probe, "take_batch") else None
            if taken is not None:
                generation.batch, generation.records[probe.name] = taken
        return generation

    def caption(
        self,
        images: list,
        prompt: str | list[str] = DEFAULT_PROMPT,
        max_new_tokens: int = 512,
        do_sample: bool = False,
        prepared=None,
        **generate_kwargs,
    ) -> list[Caption]:
        """Describe each image. `images`: PIL images or paths; `prompt`: one for all or one per image; `prepared`:
        `prepare(images, prompt)`, made before (e.g. on another thread)."""
        if not images:
            return []
        run = self.run(images, prompt, max_new_tokens, do_sample=do_sample, prepared=prepared, **generate_kwargs)
        with self.processor_lock:
            texts = self.processor.batch_decode(run.token_ids, skip_special_tokens=True)
        shares = self.attention_probe.take() if self.attention_probe else None
        shares = shares.float().tolist() if shares is not None else [None] * len(texts)
        seconds = run.seconds / len(images)
        return [
            Caption(t.strip(), len(ids), seconds, s[: len(ids)] if s is not None else None)
            for t, ids, s in zip(texts, run.token_ids, shares)
        ]

    @property
    def decode(self) -> str:
        """ "captured": a static KV cache with each decode step replayed from a CUDA graph (without CUDA: the same
        loop, eagerly; SGRS's own loop too, from two graphs per step); "static": that loop run eagerly (the reference
        for the captured replay); "eager": generate's own loop (or a method's own); "auto": captured on CUDA where the
        methods allow (SGRS's loop too), else eager."""
        return self._decode

    @decode.setter
    def decode(self, value: str) -> None:
        if value not in ("auto", "captured", "static", "eager"):
            raise ValueError(f"decode must be auto, captured, static or eager, not {value!r}")
        self._decode = value

    @property
    def attention(self) -> str:
        """A decode step's attention: "auto" (the default) takes the fused Triton kernel on CUDA where it covers the
        call (`neverfade.engine.attention.fused_covers`; in a compiled step too, as one operator), in every layer
        while a method is attached, and elsewhere the explicit row in the methods' layers; "explicit", always the
        explicit row in the methods' layers (the reference, and the CPU path); "fused", the kernel wherever Triton
        can run it (on a CPU only in its interpreter, for tests), in every layer, also with no method attached (the
        baseline on the kernel). The kernel groups the query heads where transformers' SDPA path repeats the keys
        and values (its tokens may differ from SDPA's in the last bits). Layers without a row run SDPA, as does the
        baseline under "auto" and "explicit"."""
        return self._attention

    @attention.setter
    def attention(self, value: str) -> None:
        from neverfade.engine.attention import fused_runs

        fused_runs(value, self.model.device)  # refuses an unknown choice, or "fused" where it cannot run
        self._attention = value
        if self.engine is not None and self.engine.hooks:
            self.engine.attention = value
        elif (self.engine is not None) != (value == "fused"):  # the baseline on the kernel begins or ends
            self.use([])

    def attention_path(self) -> str | None:
        """The attention rows the last generate's decode steps took in the methods' layers (every layer with
        "fused"): "fused", "explicit", "fused+explicit", or None where none did (SDPA throughout)."""
        return self.engine.attention_path() if self.engine is not None else None

    def decode_stages(self) -> dict[str, float]:
        """Where the last generate's time went on the static loop (the captured path): seconds of its prefill, eager
        first step, capture and later steps (`StaticLoop.stage_seconds`); empty after another loop."""
        stages = getattr(getattr(self.model, "_neverfade_last_loop", None), "stage_seconds", None)
        return stages() if stages is not None else {}

    def _strategy(self):
        """(name, method) of the attached method with its own decoding loop, or (None, None)."""
        return (self.engine.strategy if self.engine is not None else None) or (None, None)

    def decode_path(self) -> str:
        """The decode path the next `generate` takes: "captured", "static" (the captured loop run eagerly),
        "strategy" (a method's own loop, eagerly) or "eager". A method's own loop takes the captured path where it
        has one there (SGRS's)."""
        strategy, _ = self._strategy()
        own = "strategy" if strategy else "eager"  # the eager loop
        if self.decode == "eager" or (self.engine is not None and not self.engine.capturable):
            return own
        if decoding.static_loop(strategy) is None:
            return "strategy"
        if self.decode == "static":
            return "static"
        if self.model.device.type == "cuda":
            return "captured"
        return "static" if self.decode == "captured" or self.compile else own  # compile: the static loop's step

    def generate(self, **inputs_and_kwargs):
        """`model.generate` with the attached methods' decoding loop, or the captured decode path."""
        path = self.decode_path()
        self.model._neverfade_last_loop = None  # set by neverfade's loops (decoding.custom_generate), not generate's
        if self.compile:
            self.check_compile(path, inputs_and_kwargs.get("num_beams", 1))
        if self.model.device.type == "cuda" and path in ("strategy", "eager") and self.decode != "eager":
            _log_once(f"neverfade: {self._not_captured_reason(path)}; decode steps run eagerly (not captured)")
        if path in ("strategy", "captured", "static") and inputs_and_kwargs.get("streamer") is not None:
            inputs_and_kwargs["neverfade_streamer"] = inputs_and_kwargs.pop("streamer")
        if path == "strategy":
            inputs_and_kwargs.setdefault("custom_generate", self.engine.custom_generate())
            inputs_and_kwargs.setdefault(
                "neverfade_inputs", {k: v for k, v in inputs_and_kwargs.items() if isinstance(v, torch.Tensor)}
            )
        elif path in ("captured", "static") and inputs_and_kwargs.get("num_beams", 1) == 1:
            strategy, method = self._strategy()
            inputs_and_kwargs.setdefault("cache_implementation", "static")
            inputs_and_kwargs.setdefault(
                "custom_generate",
                decoding.custom_generate(
                    decoding.static_loop(strategy),
                    method,
                    capture=path == "captured",
                    compile=self.compile,
                ),
            )
        out = self.model.generate(**inputs_and_kwargs)
        if self.engine is not None:
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            prompt = inputs_and_kwargs.get("input_ids")
            self.engine.check_decoded(sequences.shape[1] - (prompt.shape[1] if prompt is not None else 0))
        return out

    def check_compile(self, path: str | None = None, num_beams: int = 1) -> None:
        """With `compile`: refuse (CompileRefused, one line naming why) a run whose decode steps would not run the
        compiled step: only the static loop's step is compiled (on CUDA inside the captured graph). A mode not in
        COMPILE_MODES is a ValueError."""
        from neverfade.decoding.captured import CompileRefused, compile_mode

        compile_mode(self.compile)
        path = path or self.decode_path()
        why = None
        if self.engine is not None and self.engine.strategy:
            why = f"{self.engine.strategy[1].name}'s own decoding loop is not compiled"
        elif path == "eager" and self.engine is not None and not self.engine.capturable:
            why = self._not_captured_reason(path)
        elif path == "eager":
            why = "decode='eager' (--decode eager) runs generate's own loop"
        elif num_beams != 1:
            why = "beam search runs generate's own loop"
        if why:
            raise CompileRefused(f"compile=True (--compile) compiles the static loop's decode step, and {why}")

    def _not_captured_reason(self, path: str) -> str:
        """Why a CUDA run decodes eagerly: a method's own loop with no captured form, or per-step state on the host."""
        flags = self.engine.flags
        own = [m.name for m in self.engine.hooks if flags[m].strategy and not decoding.static_loop(flags[m].strategy)]
        if path == "strategy" and own:
            return f"{'+'.join(own)} has its own decoding loop"
        host = [m.name for m in self.engine.hooks if not flags[m].capturable]
        return f"{'+'.join(host)} keeps per-step state on the host"

    def _count_new_tokens(self, new: torch.Tensor) -> list[int]:
        """Generated tokens up to and including the first end-of-sequence token."""
        eos = self.model.generation_config.eos_token_id
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        if not eos:
            return [new.shape[1]] * new.shape[0]
        is_eos = torch.isin(new, torch.tensor(eos, device=new.device))
        first = torch.where(is_eos.any(1), is_eos.float().argmax(1) + 1, new.shape[1])
        return first.tolist()


@functools.cache
def _log_once(message: str) -> None:
    logging.getLogger("neverfade").warning(message)


def attach(model, processor, *methods: Method | str, **params: Any) -> Captioner:
    """Attach methods to a model you already hold: `attach(model, processor, "sparc", tau=2.0)`.

    Keyword parameters apply to the one method named; an unknown name is refused (ParameterError). With several
    methods, pass Method objects instead: `attach(model, processor, SPARC(tau=2.0), LocoRE(beta=0.2))`."""
    if params and (len(methods) != 1 or not isinstance(methods[0], str)):
        raise ValueError(
            "keyword parameters need exactly one method given by name; pass Method objects to configure several"
        )
    return Captioner(model, processor, build_methods(methods, {methods[0]: params} if params else None))


def load(
    model: str | Path | None = None,
    methods: Iterable[Method | str] = (),
    method_params: dict[str, dict[str, Any]] | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    paper: bool = False,
) -> Captioner:
    """Load a model (a local path or hub id; None: the embedded default) with methods attached. `paper`: as the
    SPARC authors ran its family (their dtype, prompt format and image padding; see `PaperSetup`)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from neverfade.models.families import check_supported

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    built = build_methods(methods, method_params)  # bad method names and values fail before the model loads
    if str(model).startswith("random:") and str(model).count(":") == 2:  # random:<family>:<size>, built in memory
        from neverfade.models.random import random_model

        _, family, size = str(model).split(":")
        net, processor = random_model(family, size, dtype=_dtype(dtype, device), device=device)
        if paper:
            net = net.to(_dtype(_check_paper(model_info(net).family, dtype), device))
        return Captioner(net.eval(), processor, built, name=str(model), paper=paper)
    path, name = resolve_model(model)
    family = check_supported(AutoConfig.from_pretrained(path))
    dtype = _dtype(_check_paper(family, dtype) if paper else dtype, device)
    net = AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).to(device)
    processor = load_processor(path, _processor_class(path))
    return Captioner(net, processor, built, name=name, paper=paper)


def resolve_model(model: str | Path | None) -> tuple[str, str]:
    """(path or hub id to load, the name recorded with results). `random:<family>` builds a tiny random model
    (`random:<family>:small` and `random:<family>:7b`, real sizes, are built in memory by `load`)."""
    if model is None:
        from neverfade.models.default import default_model

        return default_model()
    model = str(model)
    if model == "testbed":
        from neverfade.models.testbed import testbed_model_path

        return str(testbed_model_path()), "neverfade-testbed"
    if model.startswith("random:"):
        from neverfade.models.random import cached_random

        return str(cached_random(model.split(":", 1)[1])), model
    if model.startswith((".", "/", "~")) and not Path(model).expanduser().is_dir():
        raise FileNotFoundError(f"no such model folder: {model}")
    return str(Path(model).expanduser()) if model.startswith("~") else model, model


def _processor_class(path: str) -> str | None:
    for name in ("processor_config.json", "tokenizer_config.json"):
        file = Path(path) / name
        if file.exists():
            cls = json.loads(file.read_text()).get("processor_class")
            if cls:
                return cls
    return None


def _check_paper(family, dtype):
    """The dtype paper mode runs `family` in (the authors' where they state it); refuses a family they did not run
    and a dtype other than theirs."""
    if family.paper is None:
        ran = ", ".join(f.name for f in FAMILIES.values() if f.paper is not None)
        raise ValueError(f"paper mode: the SPARC authors did not run {family.name} (they ran {ran})")
    wanted = family.paper.dtype
    if wanted is None or dtype in (None, "auto"):
        return wanted or dtype
    if _dtype(dtype, "cpu") != _dtype(wanted, "cpu"):
        raise ValueError(
            f"paper mode runs {family.name} in {wanted}, as the authors did; got {dtype} ({family.paper.source})"
        )
    return wanted


def _dtype(dtype, device: str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16") from None
