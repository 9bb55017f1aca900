"""One analysis run: caption images with a setting of methods while probes watch, then read per image the visual
attention share by output position, the consecutive-map Wasserstein diversity, SPARC's selection counts per image
token, and LVLMs-Saliency maps for chosen output tokens."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from neverfade.analysis.grid import TokenGrid, token_grid
from neverfade.analysis.objects import object_marks
from neverfade.analysis.saliency import saliency_maps
from neverfade.analysis.tokens import token_at, token_spans
from neverfade.analysis.wasserstein import consecutive_wasserstein
from neverfade.models.families import FAMILIES
from neverfade.probes import ImageAttentionMap, SparcSelections


@dataclass
class ImageAnalysis:
    id: str
    image: Image.Image  # as the model sees its grid (LLaVA-1.5: the centre square the processor crops)
    caption: str
    tokens: list[str]  # each generated token's text in the caption
    share: np.ndarray  # (n,) attention on the image tokens when writing each token
    maps: np.ndarray  # (n, rows, cols) that attention on the image's grid
    grid: TokenGrid
    diversity: np.ndarray  # (min(n, diversity_tokens) - 1,) W1 between consecutive maps
    selections: np.ndarray | None  # (n, rows, cols) bool, SPARC's selection at the step that wrote each token
    saliency: list[dict[str, Any]] = field(default_factory=list)
    objects: dict | None = None  # object_marks of the caption; None without ground truth
    not_found: list = field(default_factory=list)  # saliency tokens asked for that the caption does not have

    @property
    def selection_counts(self) -> np.ndarray | None:
        return None if self.selections is None else self.selections.sum(0)


def parse_saliency_tokens(spec: str) -> list[int | str]:
    """ "objects", "none", or a comma list of 1-based output token positions and words."""
    if spec in ("objects", "none"):
        return [spec]
    return [int(part) if part.strip().isdigit() else part.strip() for part in spec.split(",") if part.strip()]


def analyze_setting(
    captioner,
    items,
    prompt: str,
    max_new_tokens: int,
    layer: int | None = None,
    saliency_tokens: list[int | str] = ("objects",),
    diversity_tokens: int = 100,
    most_saliency: int = 8,
) -> list[ImageAnalysis]:
    """Caption `items` (data.items.Item) one at a time with the captioner's methods attached, watched."""
    if any(m.flags().strategy == "beam" for m in captioner.methods):
        raise ValueError("attention diagnostics cannot follow beam search (opera); analyze the other methods")
    return [
        _analyze_one(captioner, layer, item, prompt, max_new_tokens, saliency_tokens, diversity_tokens, most_saliency)
        for item in items
    ]


def _analyze_one(
    captioner, layer, item, prompt, max_new_tokens, saliency_tokens, diversity_tokens, most_saliency
) -> ImageAnalysis:
    from neverfade.data.images import load_image

    image = load_image(item.image)
    probe = ImageAttentionMap(layer=layer)
    sparc = next((m for m in captioner.methods if m.name == "sparc"), None)
    selected = SparcSelections(sparc) if sparc is not None else None
    run = captioner.run([image], item.prompt or prompt, max_new_tokens, watch=[probe] + [selected] * bool(selected))
    ids, batch, inputs = run.token_ids[0], run.batch, run.inputs
    n = len(ids)
    text, spans = token_spans(captioner.processor.tokenizer, ids)
    image_positions = batch.image_mask[0].nonzero().squeeze(1).cpu()
    grid = token_grid(captioner.model, inputs, len(image_positions))
    maps = run.records[probe.name][0, :n].float().cpu()  # (n, P): step k wrote token k
    placed = grid.place(maps[:, image_positions].numpy())
    selections = None
    if selected is not None:  # the selection at the step that wrote each token (none at the prompt's)
        selections = grid.place(run.records[selected.name][0, :n][:, image_positions].cpu().numpy())
    objects = object_marks(text, item.meta.get("objects")) if "objects" in item.meta else None
    analysis = ImageAnalysis(
        id=item.id,
        image=model_view(image, captioner),
        caption=text,
        tokens=[text[a:b] for a, b in spans],
        share=maps.sum(-1).numpy(),
        maps=placed,
        grid=grid,
        diversity=np.array(consecutive_wasserstein(placed[:diversity_tokens])),
        selections=selections,
        objects=objects,
    )
    positions, analysis.not_found = _saliency_positions(saliency_tokens, text, spans, most_saliency)
    found = saliency_maps(captioner, inputs, ids, positions)
    prompt_len = batch.prompt_len
    for p, rows in found.items():
        mention = next((m for m in (objects or {}).get("mentions", []) if token_at(spans, m["start"]) == p), None)
        analysis.saliency.append(
            {
                "position": p + 1,
                "token": analysis.tokens[p],
                "present": None if mention is None else mention["present"],
                "output": rows["saliency"][:, prompt_len:].numpy(),  # (layers, p): to the tokens written before
                "output_attention": rows["attention"][:, prompt_len:].numpy(),
                "image": grid.place(rows["saliency"][:, image_positions].numpy()),  # (layers, rows, cols)
                "image_attention": grid.place(rows["attention"][:, image_positions].numpy()),
            }
        )
    return analysis


def _saliency_positions(spec, text, spans, most) -> tuple[list[int], list]:
    """0-based output positions (the first token of each object kind's first mention; given 1-based positions; the
    first token of given words), at most `most`; and the asked-for positions and words the caption does not have."""
    positions, missing = set(), []
    for part in spec:
        if part == "objects":
            first = {}  # kind -> its first mention
            for m in object_marks(text, None)["mentions"]:
                first.setdefault(m["kind"], m["start"])
            positions |= {token_at(spans, start) for start in first.values()}
        elif isinstance(part, int):
            positions |= {part - 1} if 1 <= part <= len(spans) else set()
            missing += [] if 1 <= part <= len(spans) else [part]
        elif part != "none":
            start = _word_start(text, part)
            positions |= {token_at(spans, start)} if start is not None else set()
            missing += [part] if start is None else []
    return sorted(p for p in positions if p is not None)[:most], missing


def _word_start(text: str, word: str) -> int | None:
    import re

    match = re.search(rf"\b{re.escape(word)}\b", text, flags=re.IGNORECASE)
    return match.start() if match else None


def model_view(image: Image.Image, captioner) -> Image.Image:
    """The part of the image the token grid covers (`Family.model_view`: LLaVA-1.5's processor crops the centre
    square)."""
    family = FAMILIES.get(type(captioner.model).__name__)
    return image if family is None else family.model_view(image, captioner.processor)
