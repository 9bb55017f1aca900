"""Does the embedded model's visual attention fade over a long caption? Measured on greedy captions of held-out scenes.

    python scripts/embedded_fading.py --scenes 100 [--model DIR] [--out fading.json]

For each caption, one eager forward pass over prompt + caption gives every caption position's attention row
(identical to the decode-time rows, by causality). Per layer it reports the share of attention on image tokens
(summed over the image, averaged over heads), by caption-token bins; and, over object mentions, the share that
is hallucinated by the mention's rank in the caption (1st, 2nd, ... object named), and how many hallucinated
kinds are a co-occurrence partner (kinds.PARTNERS) of a kind present in the scene.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict

import numpy as np
import torch

from neverfade.scenes import PARTNERS, embedded_model_path, find_mentions, make_scene, scene_metrics
from neverfade.scenes.examples import DESCRIBE_PROMPTS, user_message

BINS = (0, 40, 80, 120, 160, 200, 10_000)


def generate(model, processor, scenes, batch_size=25, max_new_tokens=400):
    text = processor.apply_chat_template(user_message(DESCRIBE_PROMPTS[0]), add_generation_prompt=True)
    out_ids, captions = [], []
    for i in range(0, len(scenes), batch_size):
        chunk = scenes[i : i + batch_size]
        inputs = processor(text=[text] * len(chunk), images=[s.image for s in chunk], return_tensors="pt", padding=True)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1] :]
        for row in new:
            row = row[row != processor.tokenizer.pad_token_id]
            out_ids.append(row)
            captions.append(processor.decode(row, skip_special_tokens=True).strip())
    return out_ids, captions


@torch.no_grad()
def image_share_by_position(model, processor, scene, caption_ids) -> np.ndarray:
    """(layers, caption tokens): attention share on image tokens of each caption position's query."""
    text = processor.apply_chat_template(user_message(DESCRIBE_PROMPTS[0]), add_generation_prompt=True)
    inputs = processor(text=[text], images=[scene.image], return_tensors="pt")
    prompt_len = inputs["input_ids"].shape[1]
    ids = torch.cat([inputs["input_ids"], caption_ids[None]], dim=1)
    out = model(input_ids=ids, pixel_values=inputs["pixel_values"], output_attentions=True)
    is_image = ids[0] == model.config.image_token_index
    # the query at position p predicts token p+1: caption token k is predicted by position prompt_len - 1 + k
    rows = slice(prompt_len - 1, ids.shape[1] - 1)
    return torch.stack([a[0, :, rows][..., is_image].sum(-1).mean(0) for a in out.attentions]).float().numpy()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(embedded_model_path()))
    p.add_argument("--scenes", type=int, default=100, help="held-out seeds 0..N-1")
    p.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = p.parse_args(argv)

    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model, attn_implementation="eager").eval()
    scenes = [make_scene(s) for s in range(args.scenes)]
    ids, captions = generate(model, processor, scenes)
    metrics = scene_metrics(captions, scenes)
    hallucinated = [(kind, s) for pc, s in zip(metrics.pop("per_caption"), scenes) for kind in pc["hallucinated"]]
    partner = sum(any(kind in PARTNERS.get(k, {}) for k in s.kinds) for kind, s in hallucinated)

    sums, counts = defaultdict(lambda: 0.0), defaultdict(int)
    for scene, caption_ids in zip(scenes, ids):
        share = image_share_by_position(model, processor, scene, caption_ids)
        for k in range(share.shape[1]):
            b = next(i for i in range(len(BINS) - 1) if BINS[i] <= k < BINS[i + 1])
            sums[b] = sums[b] + share[:, k]
            counts[b] += 1
    by_bin = {
        f"{BINS[b]}-{BINS[b + 1] - 1}": {
            "tokens": counts[b],
            "share_by_layer": [round(float(x), 4) for x in sums[b] / counts[b]],
        }
        for b in sorted(sums)
    }

    rank_total, rank_hall = defaultdict(int), defaultdict(int)
    for scene, caption in zip(scenes, captions):
        seen = []
        for m in find_mentions(caption):
            if m.negated or m.kind in seen:
                continue
            seen.append(m.kind)
            rank_total[len(seen)] += 1
            rank_hall[len(seen)] += m.kind not in scene.kinds
    by_rank = {r: {"mentions": rank_total[r], "hallucinated": rank_hall[r]} for r in sorted(rank_total)}

    result = {
        "model": args.model,
        "scenes": args.scenes,
        "metrics": metrics,
        "image_attention_share_by_caption_tokens": by_bin,
        "hallucination_by_mention_rank": by_rank,
        "hallucinated": {
            "total": len(hallucinated),
            "partner_of_a_present_kind": partner,
            "kinds": dict(Counter(k for k, _ in hallucinated).most_common()),
        },
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
