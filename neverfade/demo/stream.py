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
from neverfade.analysis.run import model_view
from neverfade.analysis.tokens import token_spans
from neverfade.probes import SparcSelections


def png_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class StreamTokens:
    """A logits processor that passes the tokens chosen since its last call (sequence 0) to a streamer; its first
    call, at the prompt, sends nothing."""

    def __init__(self, streamer):
        self.streamer, self.sent = streamer, None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.flush(input_ids[0])
        return scores

    def flush(self, ids: torch.Tensor | list) -> None:
        ids = torch.as_tensor(ids)
        if self.sent is not None and ids.shape[0] > self.sent:
            self.streamer.put(ids[self.sent :].cpu())
        self.sent = ids.shape[0]


def caption_events(
    captioner, image: Image.Image, objects: list[str] | None, settings, prompt: str, max_new_tokens: int
) -> Iterator[dict[str, Any]]:
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
    from transformers import LogitsProcessorList, TextIteratorStreamer

    captioner.use(names, params)
    sparc = next((m for m in captioner.methods if m.name == "sparc"), None)
    beams = any(m.flags().strategy == "beam" for m in captioner.methods)
    probe = SparcSelections(sparc) if sparc is not None and not beams else None
    tokenizer = captioner.processor.tokenizer
    streamer = None if beams else TextIteratorStreamer(tokenizer, skip_special_tokens=True, timeout=900)
    feed = StreamTokens(streamer) if streamer else None
    done: dict[str, Any] = {}

    def generate():
        try:
            done["run"] = captioner.run(
                [image],
                prompt,
                max_new_tokens,
                watch=[probe] if probe else [],
                logits_processor=LogitsProcessorList([feed] if feed else []),
            )
            if feed is not None:  # the last token: no logits processor saw it
                feed.flush(feed_ids(done["run"]))
        except Exception as err:
            done["error"] = err
        finally:
            if streamer is not None:
                streamer.end()

    def feed_ids(generation):
        return generation.inputs["input_ids"][0].tolist() + generation.token_ids[0]

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    for chunk in streamer or ():
        if chunk:
            yield {"event": "text", "run": run, "text": chunk}
    worker.join()
    if "error" in done:
        raise done["error"]
    generation = done["run"]
    ids = generation.token_ids[0]
    text, spans = token_spans(tokenizer, ids)
    words = [
        {
            "start": m.start(),
            "end": m.end(),
            "tokens": [k for k, (a, b) in enumerate(spans) if a < m.end() and b > m.start()],
        }
        for m in re.finditer(r"\S+", text)
    ]
    event = {
        "event": "done",
        "run": run,
        "caption": text,
        "new_tokens": len(ids),
        "words": words,
        **object_marks(text, objects),
        "heatmap": None,
    }
    if probe is not None and probe.name in generation.records:
        event["heatmap"] = _selections(captioner, generation, probe, words)
    yield event


def _selections(captioner, generation, probe, words: list[dict]) -> dict:
    """SPARC's selections over the image's token grid: per word, the cells selected at the steps that wrote it
    (reinforced from the next step on); and the count per cell over the caption."""
    n = len(generation.token_ids[0])
    positions = generation.batch.image_mask[0].nonzero().squeeze(1).cpu()
    grid = token_grid(captioner.model, generation.inputs, len(positions))
    chosen = generation.records[probe.name][0, :n][:, positions].cpu().numpy()  # step k wrote token k (0-based)
    cells = grid.place(chosen).reshape(n, -1)
    for word in words:
        word["cells"] = np.flatnonzero(cells[word["tokens"]].any(0)).tolist() if word["tokens"] else []
    return {"rows": grid.rows, "cols": grid.cols, "note": grid.note, "counts": cells.sum(0).astype(int).tolist()}
