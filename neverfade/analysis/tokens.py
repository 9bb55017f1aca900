"""Which characters of a caption each generated token wrote."""

from __future__ import annotations


def token_spans(tokenizer, ids: list[int]) -> tuple[str, list[tuple[int, int]]]:
    """The decoded caption (stripped, special tokens skipped) and each token's (start, end) characters in it, from
    decoding every prefix: token k wrote what decode(ids[:k + 1]) adds to decode(ids[:k])."""
    ends = [len(tokenizer.decode(ids[: k + 1], skip_special_tokens=True)) for k in range(len(ids))]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    lead = len(text) - len(text.lstrip())
    text = text.strip()
    spans, start = [], 0
    for end in ends:
        span = (min(max(start - lead, 0), len(text)), min(max(end - lead, 0), len(text)))
        spans.append(span)
        start = max(start, end)
    return text, spans


def token_at(spans: list[tuple[int, int]], char: int) -> int | None:
    """The index of the token that wrote character `char`."""
    return next((k for k, (start, end) in enumerate(spans) if start <= char < end), None)
