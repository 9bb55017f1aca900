"""Object words in a caption, marked against the scene's ground truth where it is known."""

from __future__ import annotations


def object_marks(text: str, objects: list[str] | None) -> dict:
    """Each (not negated) object mention with its characters and, when the scene's `objects` are known, whether the
    scene has it (`present`: True, or False for a hallucination; None when unknown); and the objects never named."""
    from neverfade.scenes import find_mentions

    known = set(objects) if objects is not None else None
    mentions = [
        {"start": m.start, "end": m.end, "kind": m.kind, "present": None if known is None else m.kind in known}
        for m in find_mentions(text)
        if not m.negated
    ]
    named = {m["kind"] for m in mentions}
    return {"mentions": mentions, "missed": sorted(known - named) if known is not None else None}
