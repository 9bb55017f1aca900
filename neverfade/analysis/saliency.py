"""LVLMs-Saliency (Fig. 1-2 of "Hallucination begins where saliency drops"): how much each earlier position matters
to the prediction of a chosen output token.

For the token c at output position P: L = cross-entropy of c from the logits at the row that predicted it;
S(l, h) = |A(l, h) * dL/dA(l, h)| for the newest query's attention row A in layer l, head h; averaged over heads and
l2-normalised over the keys, per layer (the paper's eqs. 3-5, on the one row that predicts c).

The saliency is taken on the run as it was: the caption's tokens are fed back one by one through
`generate(custom_generate=...)` with the run's methods attached, and the chosen steps run with gradients. A
method's reweighting of the attention row is a product, so the saliency read before it equals the one read after.
With a two-branch method (VCD, PAI's guidance) the saliency is the main branch's: its own logits, not the combined.
"""

from __future__ import annotations

import torch

from neverfade import compat, decoding
from neverfade.decoding.loop import DecodingLoop
from neverfade.engine.contract import Method


class AttentionGradients(Method):
    """Keeps, at the steps where `armed`, every layer's attention row with its graph (batch size 1)."""

    name = "attention_gradients"
    summary = "Keep each layer's attention row with its graph, for saliency."

    def bind(self, info):
        super().bind(info)
        self.num_layers, self.armed, self.rows = info.num_layers, False, []

    def decode_layers(self, num_layers):
        return set(range(num_layers))

    def prefill_layers(self, num_layers):
        return set(range(num_layers))

    def reweight(self, layer, weights, batch):
        if self.armed and torch.is_grad_enabled():
            if not weights.requires_grad:
                weights = weights.detach().requires_grad_(True)
            self.rows.append(weights)
        return weights

    def saliency(self, logits: torch.Tensor, token: int) -> dict[str, torch.Tensor]:
        """(layers, T) saliency (l2-normalised per layer) and attention (head means) of the kept rows."""
        loss = torch.nn.functional.cross_entropy(logits, torch.tensor([token], device=logits.device))
        grads = torch.autograd.grad(loss, self.rows)
        rows = torch.stack([a.detach()[0].float().mean(dim=(0, 1)) for a in self.rows])
        sal = torch.stack([(a.detach()[0] * g[0]).abs().float().mean(dim=(0, 1)) for a, g in zip(self.rows, grads)])
        sal = sal / sal.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(sal.dtype).tiny)
        self.rows = []
        return {"saliency": sal, "attention": rows}


class ForcedLoop(DecodingLoop):
    """Feeds given tokens back (teacher forcing); at the chosen output positions the step runs with gradients."""

    def __init__(self, tokens, positions, probe, found: dict, **loop):
        super().__init__(**loop)
        self.tokens, self.positions, self.probe = tokens, set(positions), probe
        self.index = 0  # the output position the next forward predicts, 0-based
        self.found: dict[int, dict[str, torch.Tensor]] = found

    def step_logits(self, input_ids, step):
        wanted = self.index in self.positions
        self.probe.armed, self.probe.rows = wanted, []
        with torch.set_grad_enabled(wanted):
            out, self.kwargs = self.forward(input_ids, self.kwargs, step == 0)
            logits = out.logits[:, -1].float()
            if wanted:
                self.found[self.index] = self.probe.saliency(logits, self.tokens[self.index])
                _detach_cache(compat.cache_of(self.kwargs))
        self.probe.armed = False
        self.index += 1
        return logits.detach()

    def choose(self, input_ids, logits, scores):
        return torch.tensor([self.tokens[self.index - 1]], device=input_ids.device)


def _detach_cache(cache) -> None:
    """The keys and values of a step run with gradients leave its graph, so that later steps do not keep it."""
    for layer in getattr(cache, "layers", []):
        if getattr(layer, "keys", None) is not None and layer.keys.requires_grad:
            layer.keys, layer.values = layer.keys.detach(), layer.values.detach()


def saliency_maps(captioner, inputs, tokens: list[int], positions: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    """For each 0-based output position in `positions`: the (layers, T) saliency and attention rows of the step that
    predicted `tokens[position]`, T = prompt length + position. `inputs`: the processor's outputs for one image."""
    if not positions:
        return {}
    probe, result = AttentionGradients(), {}
    watched = captioner.probes
    captioner.watch(*watched, probe)
    try:
        decode = decoding.custom_generate(ForcedLoop, tokens=tokens, positions=positions, probe=probe, found=result)
        captioner.generate(**inputs, max_new_tokens=max(positions) + 1, do_sample=False, custom_generate=decode)
    finally:
        captioner.watch(*watched)
    return {p: {k: v.cpu() for k, v in result[p].items()} for p in sorted(result)}
