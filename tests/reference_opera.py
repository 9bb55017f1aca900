"""An independent, plain OPERA (the definition in neverfade/methods/opera.py): batch size 1, no KV cache (every
forward recomputes the whole sequence with eager attention and output_attentions), beams as Python lists. It shares
no code with neverfade. Generation runs exactly `steps` tokens with end-of-sequence scored -inf after the
candidates' softmax (as generate's min_new_tokens does), so every hypothesis finishes at the last step and the
answer is the best-scoring one."""

from __future__ import annotations

from collections import Counter

import torch


class ReferenceOPERA:
    def __init__(
        self,
        model,
        inputs,
        image_token_id,
        eos_token_id,
        num_beams=5,
        candidates=5,
        scale=50.0,
        penalty=1.0,
        threshold=15,
        window=512,
        early=10,
    ):
        assert inputs["input_ids"].shape[0] == 1, "the reference runs batch size 1"
        model.set_attn_implementation("eager")
        self.model, self.inputs, self.eos, self.image_token = model, inputs, eos_token_id, image_token_id
        self.prompt = inputs["input_ids"][0].tolist()
        self.image = [k for k, tok in enumerate(self.prompt) if tok == image_token_id]
        self.n, self.c, self.scale, self.penalty = num_beams, candidates, scale, penalty
        self.threshold, self.window, self.early = threshold, window, early

    def forward(self, tokens):
        """Logits after the last token and the last layer's attention, max over heads, each row normalised."""
        # a generated image token is a plain token (its text embedding), not a place for image features: it goes in
        # as another token, and its embedding is put back after the embedding layer
        generated_images = [k for k in range(len(self.prompt), len(tokens)) if tokens[k] == self.image_token]
        ids = torch.tensor([[self.eos if k in generated_images else tok for k, tok in enumerate(tokens)]])
        embedding = self.model.get_input_embeddings()

        def put_back(module, args, out):
            out[0, generated_images] = embedding.weight[self.image_token]

        hook = embedding.register_forward_hook(put_back)
        extra = {k: v for k, v in self.inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        if "mm_token_type_ids" in self.inputs:
            pad = len(tokens) - self.inputs["mm_token_type_ids"].shape[1]
            extra["mm_token_type_ids"] = torch.nn.functional.pad(self.inputs["mm_token_type_ids"], (0, pad))
        try:
            out = self.model(
                input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False, output_attentions=True, **extra
            )
        finally:
            hook.remove()
        rows = out.attentions[-1][0].double().max(dim=0).values  # (L, L)
        return out.logits[0, -1].double(), (rows / rows.sum(-1, keepdim=True)).tolist()

    def penalty_and_location(self, rows, t):
        """rows: the normalised attention rows of a sequence ending with the candidate at response position t."""
        p = len(self.prompt)
        best, location = -1.0, None
        for j in range(max(0, t + 1 - self.window), t + 1):
            score = 1e-7
            for i in range(j, t + 1):
                score *= self.scale * rows[p + i][p + j]
            if score > best:
                best, location = score, j
        if t + 1 <= self.early:
            return -sum(rows[p + t][k] for k in self.image), location
        return min(best, 65504.0), location

    def run(self, steps):
        """The generated tokens; `self.rollbacks` lists (at step, back to position)."""
        n, p = self.n, len(self.prompt)
        beams = [(list(self.prompt), torch.tensor(0.0 if i == 0 else -1e9), None) for i in range(n)]  # + parent
        states, history, rollbacks_at, rejected = [], [], Counter(), {}
        self.rollbacks = []
        t = 0
        while t < steps:
            del states[t:]
            states.append(beams)
            scored, slot_modes = [], []
            for slot, (tokens, score, _) in enumerate(beams):
                logits, _ = self.forward(tokens)
                top = torch.topk(logits, self.c).indices.tolist()
                found = [self.penalty_and_location(self.forward(tokens + [c])[1], t) for c in top]
                locations = Counter(loc for _, loc in found)
                slot_modes.append(min(v for v in locations if locations[v] == max(locations.values())))
                penalised = torch.log_softmax(
                    torch.stack([logits[c] - self.penalty * phi for c, (phi, _) in zip(top, found)]), 0
                ).float()
                scored += [(score + lp, slot, c) for c, lp in zip(top, penalised) if c != self.eos]
            history.append(slot_modes)
            back_to = self.rollback_target(history, rollbacks_at)
            if back_to is not None:
                self.rollbacks.append((t, back_to))
                rejected = {q: r for q, r in rejected.items() if q <= back_to}
                rejected.setdefault(back_to, set()).update(
                    (parent, tokens[-1]) for tokens, _, parent in states[back_to + 1]
                )
                del history[back_to + 1 :]
                t = back_to
                scored = []
                for slot, (tokens, score, _) in enumerate(states[t]):
                    log_probs = torch.log_softmax(self.forward(tokens)[0], 0).float()
                    scored += [
                        (score + log_probs[c], slot, c)
                        for c in range(len(log_probs))
                        if c != self.eos and (slot, c) not in rejected[t]
                    ]
            best = sorted(scored, key=lambda x: -float(x[0]))[:n]  # the num_beams best continuations, best first
            beams = [(states[t][slot][0] + [c], score, slot) for score, slot, c in best]
            t += 1
        return beams[0][0][p:]

    def rollback_target(self, history, rollbacks_at):
        current = Counter(history[-1])
        consensus = min(v for v in current if current[v] == max(current.values()))
        if consensus < self.early:
            return None
        if not all(sum(1 for modes in history if modes[slot] == consensus) > self.threshold for slot in range(self.n)):
            return None
        target = consensus + 1
        if rollbacks_at[target] >= self.c:
            target = consensus
            if rollbacks_at[target] >= self.c:
                return None
        rollbacks_at[target] += 1
        return target
