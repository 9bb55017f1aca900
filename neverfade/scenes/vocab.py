"""Which object kinds a text mentions, exactly, using the scene world's nouns, plurals and synonyms.

Rules (the metric's documented choices):
- Words are maximal runs of letters, lower-cased; a kind is mentioned when one of its words (`kinds.NOUNS`)
  appears as a whole word ("starfish" mentions nothing, "star-shaped" mentions a star).
- Negated mentions do not count: a noun preceded by a negation word ("no", "not", "without", "nor", "never")
  with only articles, numbers, sizes and colours between them ("there is no cat", "not a single red cat",
  "without any small balls"). "no cat and a dog" negates only the cat.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .kinds import COLOURS, NOUNS

WORD_TO_KIND = {word: kind for kind, words in NOUNS.items() for word in words}
NEGATIONS = frozenset({"no", "not", "without", "nor", "never"})
# Words allowed between a negation and the noun it negates.
MODIFIERS = frozenset(
    {
        "a",
        "an",
        "any",
        "the",
        "single",
        "other",
        "one",
        "small",
        "little",
        "tiny",
        "large",
        "big",
        "medium",
        "sized",
        "dark",
        "light",
        *COLOURS,
    }
)
_WORD = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class Mention:
    kind: str
    word: str
    start: int  # character offsets of the word in the text
    end: int
    word_index: int  # position among the text's words
    negated: bool


def find_mentions(text: str) -> list[Mention]:
    """Every object word in `text`, in order, with whether it is negated."""
    words = list(_WORD.finditer(text.lower()))
    mentions = []
    for i, match in enumerate(words):
        kind = WORD_TO_KIND.get(match.group())
        if kind is None:
            continue
        j = i - 1
        while j >= 0 and words[j].group() in MODIFIERS and _same_clause(text, words[j], words[j + 1]):
            j -= 1
        negated = j >= 0 and words[j].group() in NEGATIONS and _same_clause(text, words[j], words[j + 1])
        mentions.append(Mention(kind, match.group(), match.start(), match.end(), i, negated))
    return mentions


def _same_clause(text: str, left: re.Match, right: re.Match) -> bool:
    """No sentence or clause punctuation between two words."""
    return not re.search(r"[.,;:!?]", text[left.end() : right.start()])


def mentioned_objects(text: str) -> set[str]:
    """The kinds `text` mentions (not negated)."""
    return {m.kind for m in find_mentions(text) if not m.negated}
