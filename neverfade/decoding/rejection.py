"""SGRS's decoding loop: each step's forward keeps a graph from the target layers' attention rows to the logits,
the candidates' saliencies come from one backward, and rejection sampling picks the token."""

from __future__ import annotations

import torch

from neverfade import compat
from neverfade.decoding.loop import DecodingLoop


def saliencies(logits, candidates, rows, keys, batched=True):
    """S(c) for each candidate: logits (B, V) with a graph to `rows` (per target layer, (B, KVH, G, T) attention
    weights), candidates (B, K), keys (B, T) bool (the keys averaged over). Returns (B, K)."""
    log_probs = torch.log_softmax(logits, dim=-1)
    losses = -log_probs.gather(1, candidates)  # (B, K): each row's loss only reaches its own attention
    k = candidates.shape[1]
    if batched:
        try:
            cotangents = torch.eye(k, device=logits.device, dtype=losses.dtype)[:, None, :].expand(k, *losses.shape)
            grads = torch.autograd.grad(
                losses, rows, grad_outputs=cotangents, is_grads_batched=True, retain_graph=True
            )  # kept for the fallback
        except RuntimeError:
            return saliencies(logits, candidates, rows, keys, batched=False)
    else:
        per = [torch.autograd.grad(losses[:, i].sum(), rows, retain_graph=i < k - 1) for i in range(k)]
        grads = [torch.stack(g) for g in zip(*per)]
    total = 0.0
    for a, g in zip(rows, grads):  # g: (K, B, KVH, G, T)
        s = (a.detach() * g).abs().mean(dim=(2, 3))  # (K, B, T): averaged over heads
        s = s / s.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
        total = total + (s * keys).sum(-1) / keys.sum(-1).clamp_min(1)
    return (total / len(rows)).transpose(0, 1)  # (B, K)


class RejectionLoop(DecodingLoop):
    def start(self, input_ids, model_kwargs):
        super().start(input_ids, model_kwargs)
        method = self.method
        image_mask = input_ids == self.model._neverfade_engine.info.image_token_id
        b = image_mask.shape[0]
        positions = torch.arange(image_mask.shape[1], device=image_mask.device)
        self.after_image = torch.where(image_mask, positions, -1).amax(1) + 1  # (B,) first key after the image
        self.history = torch.zeros(b, method.window, device=image_mask.device)  # accepted saliencies, a ring
        self.seen = 0
        self.rejected = 0  # candidates turned down, over the run

    def step_logits(self, input_ids, step):
        with torch.enable_grad():
            out, self.kwargs = self.forward(input_ids, self.kwargs, step == 0)
            self.logits = out.logits[:, -1].float()
        self.rows = self.model._neverfade_engine.batch.state(self.method).rows
        return self.logits.detach()

    def choose(self, input_ids, logits, scores):
        m = self.method
        probs = torch.softmax(scores, dim=-1)
        k = min(m.k, int((probs > 0).sum(-1).min()))
        cand_probs, candidates = probs.topk(max(k, 1), dim=-1)
        positions = torch.arange(self.rows[0].shape[-1], device=input_ids.device)[None, :]
        keys = (positions >= self.after_image[:, None]) & (positions < input_ids.shape[1])  # up to the newest token
        with torch.enable_grad():
            sal = saliencies(self.logits, candidates, self.rows, keys)
        self.rows = None
        _detach_cache(compat.cache_of(self.kwargs))
        if self.seen == 0:
            pick = super().choose(input_ids, logits, scores)
            chosen_sal = torch.where(candidates == pick[:, None], sal, 0).sum(1)
        else:
            filled = min(self.seen, m.window)
            threshold = m.alpha * self.history[:, :filled].mean(1, keepdim=True)  # (B, 1)
            pick, chosen_sal = self._reject(candidates, cand_probs, sal, threshold)
        self.history[:, self.seen % m.window] = chosen_sal
        self.seen += 1
        return pick

    def finish(self):
        self.method.last_rejected = self.rejected

    def _reject(self, candidates, cand_probs, sal, threshold):
        b = candidates.shape[0]
        alive = torch.ones_like(cand_probs, dtype=torch.bool)
        done = torch.zeros(b, dtype=torch.bool, device=candidates.device)
        slot = sal.argmax(1)  # the fallback: the most salient candidate
        for _ in range(min(self.method.tries, candidates.shape[1])):
            weights = torch.where(alive, cand_probs, 0)
            if self.config.do_sample:
                tried = torch.multinomial(weights / weights.sum(1, keepdim=True), 1).squeeze(1)
            else:
                tried = weights.argmax(1)
            ok = sal.gather(1, tried[:, None]).squeeze(1) >= threshold.squeeze(1)
            take = ok & ~done
            slot = torch.where(take, tried, slot)
            self.rejected += int((~ok & ~done).sum())
            done |= ok
            alive.scatter_(1, tried[:, None], False)
            if bool(done.all()):
                break
        return candidates.gather(1, slot[:, None]).squeeze(1), sal.gather(1, slot[:, None]).squeeze(1)


def _detach_cache(cache) -> None:
    """Keep the KV cache constant: this step's keys and values leave the step's graph."""
    for layer in getattr(cache, "layers", []):
        if getattr(layer, "keys", None) is not None and layer.keys.requires_grad:
            layer.keys, layer.values = layer.keys.detach(), layer.values.detach()
