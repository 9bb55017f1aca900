"""Attaching methods to a model: the engine that the registered attention function consults.

`Engine.attach` switches the language model to the `neverfade` attention implementation, points its attention
modules at the engine, and adds a forward pre-hook that starts a batch at each prefill (it reads which prompt
positions are image tokens from `input_ids`) and counts decode steps. Nothing in the model is replaced.
"""

from __future__ import annotations

import functools
import weakref

import torch

from neverfade import compat
from neverfade.engine import attention
from neverfade.engine.batch import Batch
from neverfade.engine.contract import Method, check_flags
from neverfade.errors import CannotAct
from neverfade.models.families import ModelInfo, model_info, text_attention_modules

UNTAKEN = ("softcap", "s_aux")  # attention arguments the rows do not compute: logit soft-capping, attention sinks


class Engine:
    """`methods` change the output; `probes` (analysis.probes) only watch, and are left out of `methods`."""

    def __init__(self, model, methods: list[Method], probes: list[Method] = (), attention: str = "auto"):
        """`attention`: the decode-step rows: "auto" (the fused kernel on CUDA, in every layer; the explicit row in
        the methods' layers elsewhere), "fused" (the kernel in every layer wherever it can run and covers the call:
        on a CPU in Triton's interpreter, for tests) or "explicit" (the explicit row in the methods' layers, the
        reference; SDPA in the others)."""
        self.model = model
        self.info: ModelInfo = model_info(model)
        self.methods = list(methods)
        self.probes = list(probes)
        for m in self.methods + self.probes:  # methods first: a probe may read a method's resolved parameters
            m.bind(self.info)
        self.flags = check_flags(self.methods + self.probes)  # again after binding: refused before any step runs
        # a probe sees the methods' state after their observe; a decoding strategy (SGRS) sees the attention after
        # every other method's reweighting
        self.hooks = (
            [m for m in self.methods if not self.flags[m].strategy]
            + self.probes
            + [m for m in self.methods if self.flags[m].strategy]
        )
        self.stepping = [m for m in self.hooks if "begin_step" in m.hooks]
        n = self.info.num_layers
        self.decode_layers = [[m for m in self.hooks if layer in m.decode_layers(n)] for layer in range(n)]
        self.prefill_layers = [[m for m in self.hooks if layer in m.prefill_layers(n)] for layer in range(n)]
        self.acting = [bool(d) or bool(p) for d, p in zip(self.decode_layers, self.prefill_layers)]  # plain bools
        self.decode_rows = [self._row_methods(layer, ms) for layer, ms in enumerate(self.decode_layers)]
        self.prefill_rows = [self._row_methods(layer, ms) for layer, ms in enumerate(self.prefill_layers)]
        self._step_cache: dict = {}  # per forward: the methods' combined key edits and the mask bias
        self.compiled_rows: dict[int, bool] = {}  # layer -> fused: the rows a compiled decode step computes
        self.batch: Batch | None = None  # the batch whose forward is running
        self._batches: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KV cache -> its Batch
        self._hook = None
        self._previous_impl = None
        self.attention = attention

    @property
    def attention(self) -> str:
        return self._attention

    @attention.setter
    def attention(self, choice: str) -> None:
        self.fused = attention.fused_runs(choice, self.model.device)  # refuses a choice that cannot run here
        self._attention = choice
        # the decode steps' rows: wherever the kernel runs, in every layer (it groups the query heads where
        # transformers' SDPA path repeats the keys and values: the baseline on the kernel took x0.40-0.98 of SDPA's
        # time on the H200, LLaVA-1.5-7B and Qwen2-VL-7B at batch 1, 8 and 32, and tied at LLaVA's batch 8); else
        # in the methods' layers, SDPA in the others
        every = self.fused
        self.row_layers = [bool(ms) or every for ms in self.decode_layers]
        # whether any attention call comes to the engine (else they go to SDPA untouched): a plain bool, read inside
        # a compiled step (dynamo in torch 2.11 cannot trace bool() of a list: compiled methods failed on the H200)
        self.active = bool(self.hooks) or any(self.row_layers)

    def attention_path(self) -> str | None:
        """The rows the last batch's decode steps took in the methods' layers ("fused", "explicit", or
        "fused+explicit" where the kernel did not cover some layers), or None before any. Counted when a step runs
        in Python: a replayed CUDA graph repeats the captured step's choice."""
        batch = self.batch
        if batch is None or batch.rows == 0:
            return None
        if batch.fused == batch.rows:
            return "fused"
        return "explicit" if batch.fused == 0 else "fused+explicit"

    @property
    def strategy(self) -> tuple[str, Method] | None:
        """(the decoding strategy, the method that owns it), or None for generate's own loop."""
        return next(((f.strategy, m) for m, f in self.flags.items() if f.strategy), None)

    def custom_generate(self):
        """The decoding loop to pass as `generate(custom_generate=...)`, or None for generate's own."""
        from neverfade import decoding

        return decoding.custom_generate(*self.strategy) if self.strategy else None

    # ---- attaching ----
    def attach(self) -> Engine:
        compat.warn_if_untested()
        attention.register()
        text_config = self.model.config.get_text_config()
        self._previous_impl = compat.attention_implementation(text_config)
        for module in text_attention_modules(self.model):
            if getattr(module, "_neverfade_engine", None) not in (None, self):
                raise RuntimeError("this model already has neverfade methods attached; detach them first")
            module._neverfade_engine = self
        self.model.set_attn_implementation({"text_config": attention.NAME})
        self.model._neverfade_engine = self
        self._hook = self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        return self

    def detach(self) -> None:
        self.model.__dict__.pop("_neverfade_engine", None)
        for module in text_attention_modules(self.model):
            module.__dict__.pop("_neverfade_engine", None)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._previous_impl is not None:
            self.model.set_attn_implementation({"text_config": self._previous_impl})
        self.batch = None

    def _before_forward(self, module, args, kwargs):
        """Start a Batch at a prefill, or advance the cache's Batch by one decode step. Only tensor work happens
        per decode step (no host synchronisation), so a captured step replays it."""
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError(
                "neverfade needs input_ids at every forward: at the prompt to find the image tokens, "
                "at a decode step to count it"
            )
        cache = compat.cache_of(kwargs)
        if cache is None and input_ids.shape[1] == 1:  # a decode step neverfade cannot tie to its prompt
            raise compat.UnsupportedTransformers(
                "a one-token forward came without the KV cache, so neverfade cannot tell which prompt it continues "
                f"(keyword arguments: {', '.join(sorted(kwargs))}); generate with use_cache=True"
            )
        self._step_cache = {}
        self.compiled_rows.clear()  # empty when a compiled step starts, as when it was traced (a guard)
        known = self._batches.get(cache, self.batch) if cache is not None else None
        if known is None or input_ids.shape[1] > 1:  # a prompt; no image has a 1-token prompt
            compat.keep_every_key(cache)
            self.batch = Batch(image_mask=input_ids == self.info.image_token_id)
            if cache is not None:
                self._batches[cache] = self.batch
            for m in self.hooks:
                if m.State is not None:
                    self.batch.states[m.name] = m.new_state(self.batch)
            return None
        self.batch = known
        if input_ids.shape[0] != self.batch.size:
            raise RuntimeError("the batch changed size between steps; beam search is not supported")
        self.batch.step += 1
        self.batch.decoding = True
        self.batch.query_index.add_(1)
        for m in self.stepping:
            m.begin_step(self.batch)
        return None

    def check_decoded(self, new_tokens: int) -> None:
        """After a generation of `new_tokens` tokens: refuse a run in which the methods could not act (no decode step
        reached the engine, or no decode step's attention came through neverfade's attention function)."""
        if new_tokens < 2 or not self.active:
            return
        batch = self.batch
        if batch is None or batch.step == 0:
            raise compat.UnsupportedTransformers(
                f"{new_tokens} tokens were generated, but neverfade saw no decode step: the methods did not act"
            )
        if batch.rows == 0 and any(self.row_layers):
            raise compat.UnsupportedTransformers(
                "the decode steps' attention did not come through neverfade's attention function: the methods did "
                "not act"
            )

    @property
    def capturable(self) -> bool:
        """Whether every attached method and probe can run inside a captured decode step."""
        return all(self.flags[m].capturable for m in self.hooks)

    # ---- the attention call ----
    def _row_methods(self, layer: int, methods: list[Method]):
        """(key editors acting here, observers, reweighters) among a layer's methods."""
        editors = tuple(m for m in methods if m.acts_in(layer) and m.hooks & {"key_boost", "key_scale"})
        observers = [m for m in methods if "observe" in m.hooks and m.observes(layer)]
        reweighters = [m for m in methods if "reweight" in m.hooks]
        return editors, observers, reweighters

    def _edits(self, editors: tuple, keys: int):
        """(boost, scale) of these key editors for this step, built once and shared by their layers."""
        cached = self._step_cache.get(editors)
        if cached is not None and cached[0] == keys:
            return cached[1]
        boosts = [b for b in (m.key_boost(self.batch, keys) for m in editors) if b is not None]
        scales = [s for s in (m.key_scale(self.batch, keys) for m in editors) if s is not None]
        edits = (
            functools.reduce(torch.add, boosts) if len(boosts) > 0 else None,  # len: traced, as in `active`
            functools.reduce(torch.mul, scales) if len(scales) > 0 else None,
        )
        self._step_cache[editors] = (keys, edits)
        return edits

    def _bias(self, attention_mask, keys: int, kv_heads: int, dtype):
        if torch.compiler.is_compiling():  # the mask's id would be a guard, failing with each new mask buffer
            return attention.key_bias(attention_mask, keys, kv_heads, dtype)
        key = ("bias", id(attention_mask), keys, kv_heads, dtype)
        if key not in self._step_cache:
            self._step_cache[key] = attention.key_bias(attention_mask, keys, kv_heads, dtype)
        return self._step_cache[key]

    def _filled(self, keys: int) -> torch.Tensor:
        """(1,) long on the device: the keys of the cache filled at this decode step (the newest query's cache index
        + 1, at most `keys`), for the fused kernel; device work only, shared by the step's layers."""
        filled = self._step_cache.get(("filled", keys))
        if filled is None:
            filled = (self.batch.query_index + 1).clamp(max=keys).view(1)
            self._step_cache[("filled", keys)] = filled
        return filled

    def _decode_row(self, query, key, value, attention_mask, scaling, layer):
        editors, observers, reweighters = self.decode_rows[layer]
        if self.fused and attention.fused_covers(query, key, value, attention_mask, reweighters):
            self._counted(layer, fused=True)
            edits = self._edits(editors, key.shape[2])
            filled = self._filled(key.shape[2])
            return attention.fused_row(
                query, key, value, attention_mask, scaling, edits, filled, layer, observers, self.batch
            )
        self._counted(layer, fused=False)
        newest = None  # SGRS's gradient: the cache index this step wrote (a full sliding window: its last)
        if torch.is_grad_enabled():
            newest = self._filled(key.shape[2]) - 1
        return self._row(query, key, value, attention_mask, scaling, layer, self.decode_rows, newest)

    def _counted(self, layer: int, fused: bool) -> None:
        """Count a decode step's row in the batch. Inside torch.compile only what the trace saw is noted (a Python
        counter read there would be a guard, and recompile the step at every step): `count_compiled` adds it."""
        if torch.compiler.is_compiling():
            self.compiled_rows[layer] = fused
        else:
            self.batch.rows += 1
            self.batch.fused += fused

    def count_compiled(self) -> None:
        """After a compiled decode step's forward: its rows, as the trace noted them (`_counted`)."""
        if self.batch is not None:
            self.batch.rows += len(self.compiled_rows)
            self.batch.fused += sum(self.compiled_rows.values())

    def _row(self, query, key, value, attention_mask, scaling, layer, rows, newest=None):
        editors, observers, reweighters = rows[layer]
        bias = self._bias(attention_mask, key.shape[2], key.shape[1], query.dtype)
        return attention.attention_row(
            query,
            key,
            value,
            bias,
            scaling,
            self._edits(editors, key.shape[2]),
            layer,
            observers,
            reweighters,
            self.batch,
            newest,
        )

    def attend(self, module, query, key, value, attention_mask, scaling, dropout, **kwargs):
        layer = module.layer_idx
        batch = self.batch
        if scaling is None:
            scaling = query.shape[-1] ** -0.5
        untaken = [k for k in UNTAKEN if kwargs.get(k) is not None]
        if self.acting[layer] and len(untaken) > 0:
            raise CannotAct(
                f"layer {layer}'s attention uses {', '.join(untaken)}, which neverfade's attention rows do not "
                "compute: the methods cannot act on this model"
            )
        row = self.row_layers[layer] and len(untaken) == 0  # no method here: SDPA computes what rows cannot
        if query.shape[2] == 1 and batch is not None and batch.decoding and row:
            return self._decode_row(query, key, value, attention_mask, scaling, layer), None
        out, _ = compat.sdpa_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
        if query.shape[2] > 1 and batch is not None and len(self.prefill_layers[layer]) > 0:
            keys = slice(None) if attention_mask is not None else slice(0, query.shape[2])  # causal: no later keys
            row = self._row(
                query[:, :, -1:], key[:, :, keys], value[:, :, keys], attention_mask, scaling, layer, self.prefill_rows
            )
            # the earlier positions never see the last one's row, so no gradient of SGRS's reaches them: detached,
            # SDPA stays out of the saliency backward
            out = torch.cat([out[:, :-1].detach(), row], dim=1)
        return out, None
