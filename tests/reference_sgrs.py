"""A plain SGRS: batch size 1, no KV cache (the whole sequence runs every step, eager attention returned by the model),
one backward per candidate, python lists. It shares no code with neverfade's loop."""

from __future__ import annotations

import torch
from conftest import full_forward_inputs


def reference_sgrs(model, inputs, image_token_id, eos_id, steps, alpha, k, tries, window, start, end):
    model.set_attn_implementation({"text_config": "eager"})
    ids = inputs["input_ids"]
    positions = [j for j, t in enumerate(ids[0].tolist()) if t == image_token_id]
    after_image = positions[-1] + 1
    history, chosen, rejected = [], [], 0
    for step in range(steps):
        with torch.enable_grad():
            out = model(**full_forward_inputs(inputs, ids), output_attentions=True)
            logits = out.logits[0, -1].float()
            scores = logits.detach().clone()
            scores[eos_id] = float("-inf")  # min_new_tokens
            cand_probs, cands = torch.softmax(scores, -1).topk(k)
            saliency = []
            for c in cands.tolist():
                loss = -torch.log_softmax(logits, -1)[c]
                attn = [out.attentions[layer] for layer in range(start, end + 1)]
                grads = torch.autograd.grad(loss, attn, retain_graph=True)
                per_layer = []
                for a, g in zip(attn, grads):
                    s = (a[0, :, -1, :] * g[0, :, -1, :]).abs().mean(0)
                    s = s / s.norm()
                    per_layer.append(s[after_image:].mean())
                saliency.append(float(sum(per_layer).detach() / len(per_layer)))
        order = cands.tolist()
        if step == 0:
            pick = order[0]
        else:
            recent = history[-window:]
            threshold = alpha * sum(recent) / len(recent)
            pick = None
            for c in order[:tries]:
                if saliency[order.index(c)] >= threshold:
                    pick = c
                    break
                rejected += 1
            if pick is None:
                pick = order[max(range(k), key=lambda i: saliency[i])]
        history.append(saliency[order.index(pick)])
        chosen.append(pick)
        ids = torch.cat([ids, torch.tensor([[pick]])], dim=1)
    return chosen, rejected, history
