"""SGRS's decoding loop: each step's forward keeps a graph from the target layers' attention rows to the logits,
the candidates' saliencies come from one backward, and rejection sampling picks the token."""

from __future__ import annotations

import functools
import logging

import torch

from neverfade import compat
from neverfade.decoding.captured import StaticLoop
from neverfade.decoding.loop import DecodingLoop
from neverfade.errors import CannotAct


def saliencies(logits, candidates, rows, keys, batched=True):
    """S(c) for each candidate: logits (B, V) with a graph to `rows` (per target layer, (B, KVH, G, T) attention
    weights), candidates (B, K), keys (B, T) bool (the keys averaged over). Returns (B, K). `batched`: one backward
    for the K candidates (vmap over their cotangents; a RuntimeError where vmap cannot run), else K backwards."""
    log_probs = torch.log_softmax(logits, dim=-1)
    losses = -log_probs.gather(1, candidates)  # (B, K): each row's loss only reaches its own attention
    k = candidates.shape[1]
    if batched:
        cotangents = torch.eye(k, device=logits.device, dtype=losses.dtype)[:, None, :].expand(k, *losses.shape)
        backward = functools.partial(torch.autograd.grad, losses, rows, retain_graph=True)
        grads = torch.func.vmap(backward)(cotangents)  # torch.func's: it takes the rows' own rule (`_product`)
    else:
        per = [torch.autograd.grad(losses[:, i].sum(), rows, retain_graph=True) for i in range(k)]
        grads = [torch.stack(g) for g in zip(*per)]
    total = 0.0
    for a, g in zip(rows, grads):  # g: (K, B, KVH, G, T)
        s = (a.detach() * g).abs().mean(dim=(2, 3))  # (K, B, T): averaged over heads
        s = s / s.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
        total = total + (s * keys).sum(-1) / keys.sum(-1).clamp_min(1)
    return (total / len(rows)).transpose(0, 1)  # (B, K)


def sample(probs):
    """(B,) one token per row of `probs` (B, N), as `torch.multinomial(probs, 1)` draws it: the same random numbers
    and the same token (multinomial draws one sample as the argmax of probs over Exp(1) noise), without multinomial's
    checks of `probs`, which read the device on the host."""
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(-1)


class RejectionLoop(DecodingLoop):
    """Every decision of a step is tensor work of fixed shape, with no host synchronisation (nothing reads the device
    on the host until `finish`): the top `k` candidates always (those the processed distribution gives no
    probability stay out of every choice), the `tries` tried in turn without stopping early (a row that has accepted
    one keeps it), the mean of the accepted saliencies over the filled part of the ring by a device-side count. The
    only branch on the host is on the step number: the first step, with no history, takes the token as generate
    would. Greedy, the tokens are those of the loop that decided on the host (tests/reference_sgrs.py). Sampling,
    each step draws the random numbers of all its tries (and of all k candidates where fewer have a probability),
    where that loop stopped drawing at the first acceptance: the same distribution, other draws for a seed."""

    def run(self, input_ids, model_kwargs):
        """The model's parameters are frozen for the run: the saliencies need gradients to the attention rows only,
        so the forward keeps no graph below the first target layer (and the fused kernel may run there)."""
        thawed = [p for p in self.model.parameters() if p.requires_grad]
        for p in thawed:
            p.requires_grad_(False)
        try:
            return super().run(input_ids, model_kwargs)
        finally:
            for p in thawed:
                p.requires_grad_(True)

    def start(self, input_ids, model_kwargs):
        super().start(input_ids, model_kwargs)
        method = self.method
        self.batched = True  # one backward for the K candidates, until vmap cannot run it
        image_mask = input_ids == self.model._neverfade_engine.info.image_token_id
        b, device = image_mask.shape[0], image_mask.device
        positions = torch.arange(image_mask.shape[1], device=device)
        self.after_image = torch.where(image_mask, positions, -1).amax(1) + 1  # (B,) first key after the image
        self.end = torch.tensor(input_ids.shape[1], device=device)  # the keys up to the newest token: its count
        self.history = torch.zeros(b, method.window, device=device)  # accepted saliencies, a ring
        self.ring = torch.zeros((), dtype=torch.long, device=device)  # the ring's next slot
        self.filled = torch.zeros((), dtype=torch.long, device=device)  # its filled slots, at most `window`
        self.seen = 0  # steps taken (the host's own count)
        self.rejected = torch.zeros((), dtype=torch.long, device=device)  # candidates turned down so far
        self.tallies: list[torch.Tensor] = []  # (rejected, invalid) after each step: the last kept step's is reported
        self.invalid = torch.zeros((), dtype=torch.bool, device=device)  # a NaN in a distribution or a saliency

    def step_logits(self, input_ids, step):
        with torch.enable_grad():
            out, self.kwargs = self.forward(input_ids, self.kwargs, step == 0)
            self.live = out.logits[:, -1].float()  # with the graph to the rows
        self.rows = self.model._neverfade_engine.batch.state(self.method).rows
        return self.live.detach()

    def choose(self, input_ids, logits, scores):
        m = self.method
        probs = torch.softmax(scores, dim=-1)
        cand_probs, candidates = probs.topk(min(m.k, probs.shape[-1]), dim=-1)  # (B, K)
        # the candidates: the first k, k = the fewest tokens of positive probability in a row (at most K, at least 1)
        k = (probs > 0).sum(-1).min().clamp(min=1)
        valid = torch.arange(candidates.shape[1], device=candidates.device) < k  # (K,)
        sal = self._saliencies(candidates)
        self.rows = None
        self.invalid |= probs.isnan().any() | sal.isnan().any()  # checked in `finish`: no step reads it
        _detach_cache(compat.cache_of(self.kwargs))
        if self.seen == 0:  # the step number, known on the host: the prompt's step, never a replayed one
            pick = sample(probs) if self.config.do_sample else scores.argmax(dim=-1)  # generate's own rule
            chosen_sal = torch.where((candidates == pick[:, None]) & valid, sal, 0).sum(1)
        else:
            threshold = m.alpha * self._recent_mean()  # (B, 1)
            pick, chosen_sal = self._reject(candidates, cand_probs, sal, threshold, valid, k)
        self.history.index_copy_(1, self.ring[None], chosen_sal[:, None].to(self.history.dtype))
        self.ring.add_(1).remainder_(m.window)
        self.filled.add_(1).clamp_(max=m.window)
        self.tallies.append(torch.stack([self.rejected, self.invalid.long()]))
        self.seen += 1
        return pick

    def _saliencies(self, candidates, batched=True):
        """(B, K) the candidates' saliencies, from this step's logits and rows (`batched`: if vmap still runs)."""
        positions = torch.arange(self.rows[0].shape[-1], device=candidates.device)[None, :]
        keys = (positions >= self.after_image[:, None]) & (positions < self.end)  # up to the newest token
        with torch.enable_grad():
            if batched and self.batched:
                try:
                    return saliencies(self.live, candidates, self.rows, keys)
                except RuntimeError as err:
                    # the prompt's step backpropagates through other operations (every prompt key's) than the
                    # decode steps' rows, so only a decode step's failure turns batching off
                    self.batched = self.seen == 0
                    logging.getLogger("neverfade").warning(
                        "sgrs: one backward per candidate %s, as vmap failed: %s",
                        "at the prompt's step" if self.batched else "from now on (slower)",
                        str(err).splitlines()[0],
                    )
            return saliencies(self.live, candidates, self.rows, keys, batched=False)

    def appended(self, tokens):
        self.end.add_(1)

    def finish(self):
        # the run's one read of the device; not of the steps run past the end (StaticRejectionLoop)
        self.method.last_rejected, invalid = self.tallies[self.steps - 1].tolist()
        if invalid:
            raise CannotAct("sgrs: a step's next-token distribution or saliencies held NaN, so its choices are void")

    def _recent_mean(self):
        """(B, 1) the mean of the filled part of the ring: each prefix's own mean, in the order of operations of
        `history[:, :n].mean(1)`, the one of `filled` picked on the device."""
        means = torch.stack([self.history[:, :n].mean(1) for n in range(1, self.history.shape[1] + 1)], 1)
        return means.index_select(1, (self.filled - 1).clamp(min=0)[None])

    def _reject(self, candidates, cand_probs, sal, threshold, valid, k):
        """Try min(tries, k) candidates in turn, each a fixed-shape step; a try past k, or in a row that has
        accepted one, changes nothing. Returns the tokens and their saliencies, (B,) each."""
        b = candidates.shape[0]
        alive = valid.expand_as(cand_probs).clone()
        done = torch.zeros(b, dtype=torch.bool, device=candidates.device)
        slot = torch.where(valid, sal, float("-inf")).argmax(1)  # the fallback: the most salient candidate
        for r in range(min(self.method.tries, candidates.shape[1])):
            weights = torch.where(alive, cand_probs, 0)
            if self.config.do_sample:
                total = weights.sum(1, keepdim=True)
                tried = sample(weights / torch.where(total > 0, total, 1))  # total is 0 only in a try past k
            else:
                tried = weights.argmax(1)
            ok = sal.gather(1, tried[:, None]).squeeze(1) >= threshold.squeeze(1)
            live = ~done & (r < k)
            take = ok & live
            slot = torch.where(take, tried, slot)
            self.rejected.add_((~ok & live).sum())
            done |= take
            alive.scatter_(1, tried[:, None], False)
        return candidates.gather(1, slot[:, None]).squeeze(1), sal.gather(1, slot[:, None]).squeeze(1)


class StaticRejectionLoop(StaticLoop, RejectionLoop):
    """SGRS on the captured decode path: RejectionLoop's choices on StaticLoop's static KV cache, each step replayed
    from two CUDA graphs in one memory pool, as torch.cuda.make_graphed_callables splits a forward from its
    backward: the forward with the graph to the target layers' rows (its saved tensors stay in the pool, rewritten at
    each replay), then, given the candidates in a fixed buffer, the saliency backward. The logits processors, the
    top k and the rejection run eagerly between the two (min_new_tokens reads the length on the host). Without CUDA
    (or with `capture=False`) the same loop runs eagerly: the reference the replay is checked against."""

    def __init__(self, **loop):
        super().__init__(**loop)
        self.saliency_graph = None

    def step_logits(self, input_ids, step):
        with torch.enable_grad():
            logits = super().step_logits(input_ids, step)
        if step == 0:
            self.live = logits
        self.rows = self.model._neverfade_engine.batch.state(self.method).rows  # at a replay: the captured step's
        return logits.detach()

    def _keep_logits(self, logits) -> None:
        self.live = logits.float()
        self.logits.copy_(self.live.detach())

    def _saliencies(self, candidates):
        if self.graph is None:  # an eager step; the warm-up's forward ran on a side stream, so autograd would record
            # the gradients on that stream, which vmap's batched tensors cannot take: one backward per candidate there
            return super()._saliencies(candidates, batched=not (self.capture and self.seen == 1))
        if self.saliency_graph is None:  # the step whose forward was just captured
            self.candidates = candidates.clone()
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph, pool=self.graph.pool()):
                    self.saliency = super()._saliencies(self.candidates)
            except Exception as err:
                raise self._failed(err) from err
            self.saliency_graph = graph
        else:
            self.candidates.copy_(candidates)
        self.saliency_graph.replay()
        return self.saliency

    def finish(self):
        self.saliency_graph = self.live = None
        super().finish()


def _detach_cache(cache) -> None:
    """Keep the KV cache constant: this step's keys and values leave the step's graph."""
    for layer in getattr(cache, "layers", []):
        if getattr(layer, "keys", None) is not None and layer.keys.requires_grad:
            layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
