"""The events of one demo request: each setting's caption as it streams, then its object marks and SPARC's
selections per word.

Streaming: transformers' TextIteratorStreamer (it sends whole words), fed by a logits processor rather than by
`generate(streamer=...)`: transformers 5.23 does not hand `streamer` to a callable `custom_generate`, so neverfade's
own loops (VCD, PAI's guidance, SGRS, the captured decode path) would never see it. Every loop applies the logits
processors once per step, so the processor sees each chosen token one step later; the last token is sent when
generate returns. OPERA is a beam search: its caption arrives whole when it is done.
"""

from __future__ import annotations

import base64
import io
import re
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image

from neverfade.analysis.grid import token_grid
from neverfade.analysis.objects import object_marks
from neverfade.analysis.probes import ImageAttentionShare
from neverfade.analysis.run import model_view
from neverfade.analysis.tokens import token_spans


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class StreamTokens:
    """A logits processor that passes the tokens chosen since its last call (sequence 0) to a streamer."""

    def __init__(self, streamer, prompt_len: int):
        self.streamer, self.sent = streamer, prompt_len

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.flush(input_ids[0])
        return scores

    def flush(self, ids: torch.Tensor) -> None:
        if ids.shape[0] > self.sent:
            self.streamer.put(ids[self.sent:].cpu())
            self.sent = ids.shape[0]


def caption_events(captioner, image: Image.Image, objects: list[str] | None, settings, prompt: str,
                   max_new_tokens: int) -> Iterator[dict[str, Any]]:
    """`settings`: (label, method names, their parameters) per pane. `objects`: the scene's ground truth, if known."""
    yield {"event": "image", "src": png_data_url(model_view(image, captioner)), "ground_truth": objects is not None}
    for run, (label, names, params) in enumerate(settings):
        yield {"event": "run", "run": run, "label": label}
        try:
            yield from _one_run(captioner, run, image, objects, names, params, prompt, max_new_tokens)
        except Exception as err:  # one pane fails, the others go on
            yield {"event": "error", "run": run, "message": f"{type(err).__name__}: {str(err).splitlines()[0]}"}
    yield {"event": "end"}


def _one_run(captioner, run, image, objects, names, params, prompt, max_new_tokens) -> Iterator[dict[str, Any]]:
    from transformers import TextIteratorStreamer

    captioner.use(names, params)
    sparc = next((m for m in captioner.methods if m.name == "sparc"), None)
    beams = any(m.strategy == "beam" for m in captioner.methods)
    probe = ImageAttentionShare() if sparc is not None and not beams else None  # to find SPARC's batch
    if probe is not None:
        sparc.keep_selections = True
    captioner.watch(*([probe] if probe else []))
    inputs = captioner.processor(text=[captioner.prompt_text(prompt)], images=[image], return_tensors="pt")
    inputs = inputs.to(captioner.model.device)
    captioner.check_room(inputs["attention_mask"].sum(1).tolist(), max_new_tokens)  # past it: garbage, so an error
    if "pixel_values" in inputs and inputs["pixel_values"].is_floating_point():
        inputs["pixel_values"] = inputs["pixel_values"].to(captioner.model.dtype)
    tokenizer = captioner.processor.tokenizer
    streamer = None if beams else TextIteratorStreamer(tokenizer, skip_special_tokens=True, timeout=900)
    feed = StreamTokens(streamer, inputs["input_ids"].shape[1]) if streamer else None
    done: dict[str, Any] = {}

    def generate():
        from transformers import LogitsProcessorList

        try:
            with torch.no_grad():
                done["out"] = captioner.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                                 logits_processor=LogitsProcessorList([feed] if feed else []))
            if feed is not None:
                feed.flush(done["out"][0])
        except Exception as err:
            done["error"] = err
        finally:
            if streamer is not None:
                streamer.end()

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    for chunk in streamer or ():
        if chunk:
            yield {"event": "text", "run": run, "text": chunk}
    worker.join()
    captioner.watch()
    if "error" in done:
        raise done["error"]
    ids = done["out"][0, inputs["input_ids"].shape[1]:].tolist()
    eos = captioner.model.generation_config.eos_token_id
    eos = {eos} if isinstance(eos, int) else set(eos or [])
    ids = ids[: next((k + 1 for k, t in enumerate(ids) if t in eos), len(ids))]
    text, spans = token_spans(tokenizer, ids)
    words = [{"start": m.start(), "end": m.end(),
              "tokens": [k for k, (a, b) in enumerate(spans) if a < m.end() and b > m.start()]}
             for m in re.finditer(r"\S+", text)]
    event = {"event": "done", "run": run, "caption": text, "new_tokens": len(ids), "words": words,
             **object_marks(text, objects), "heatmap": None}
    if probe is not None:
        event["heatmap"] = _selections(captioner, sparc, probe, inputs, len(ids), words)
    yield event


def _selections(captioner, sparc, probe, inputs, n: int, words: list[dict]) -> dict | None:
    """SPARC's selections over the image's token grid: per word, the cells selected at the steps that wrote it
    (reinforced from the next step on); and the count per cell over the caption."""
    taken = probe.take_batch()
    if taken is None:
        return None
    batch = taken[0]
    positions = batch.image_mask[0].nonzero().squeeze(1).cpu()
    grid = token_grid(captioner.model, inputs, len(positions))
    chosen = np.zeros((n, len(positions)), dtype=bool)
    for k, selected in enumerate(sparc.selections(batch)[: n - 1], start=1):  # step k wrote token k (0-based)
        chosen[k] = selected[0, positions].cpu().numpy()
    cells = grid.place(chosen).reshape(n, -1)
    for word in words:
        word["cells"] = np.flatnonzero(cells[word["tokens"]].any(0)).tolist() if word["tokens"] else []
    return {"rows": grid.rows, "cols": grid.cols, "note": grid.note, "counts": cells.sum(0).astype(int).tolist()}
