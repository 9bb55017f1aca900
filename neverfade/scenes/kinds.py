"""The scene world's catalogue: object kinds, their words, colours, and which kinds tend to appear together."""

from __future__ import annotations

# Colour name -> RGB. Object colours are drawn from these; every name is one caption word.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (214, 40, 40),
    "orange": (245, 130, 30),
    "yellow": (250, 215, 40),
    "green": (50, 160, 60),
    "blue": (40, 90, 210),
    "purple": (130, 60, 180),
    "pink": (240, 120, 180),
    "brown": (130, 80, 40),
    "black": (25, 25, 25),
    "white": (250, 250, 250),
    "gray": (128, 128, 128),
}

# kind -> (caption noun, plural, synonyms (singular, plural) accepted when parsing text).
NOUNS: dict[str, tuple[str, ...]] = {
    "house": ("house", "houses", "cottage", "cottages", "hut", "huts"),
    "tree": ("tree", "trees"),
    "car": ("car", "cars", "automobile", "automobiles"),
    "boat": ("boat", "boats", "sailboat", "sailboats", "ship", "ships"),
    "fish": ("fish", "fishes"),
    "sun": ("sun", "suns"),
    "cloud": ("cloud", "clouds"),
    "moon": ("moon", "moons"),
    "star": ("star", "stars"),
    "cat": ("cat", "cats", "kitten", "kittens"),
    "ball": ("ball", "balls"),
    "cup": ("cup", "cups", "mug", "mugs"),
    "spoon": ("spoon", "spoons"),
    "umbrella": ("umbrella", "umbrellas"),
    "key": ("key", "keys"),
    "heart": ("heart", "hearts"),
    "flower": ("flower", "flowers", "blossom", "blossoms"),
    "bird": ("bird", "birds"),
    "kite": ("kite", "kites"),
    "mushroom": ("mushroom", "mushrooms"),
    "apple": ("apple", "apples"),
    "bell": ("bell", "bells"),
    "clock": ("clock", "clocks"),
    "lamp": ("lamp", "lamps"),
}
KINDS: tuple[str, ...] = tuple(NOUNS)

# Colours a kind is drawn in (the first ones are the usual ones: a colour prior, weighted by position).
KIND_COLOURS: dict[str, tuple[str, ...]] = {
    "house": ("red", "yellow", "blue", "white", "orange", "pink", "gray"),
    "tree": ("green", "green", "orange", "yellow", "pink"),
    "car": ("red", "blue", "yellow", "green", "black", "white", "gray", "orange", "purple"),
    "boat": ("white", "red", "blue", "brown", "yellow", "orange"),
    "fish": ("orange", "blue", "yellow", "red", "purple", "pink", "green"),
    "sun": ("yellow", "orange", "red"),
    "cloud": ("white", "gray", "blue"),
    "moon": ("yellow", "white", "gray", "orange"),
    "star": ("yellow", "orange", "white", "red", "blue", "purple"),
    "cat": ("orange", "gray", "black", "white", "brown"),
    "ball": ("red", "blue", "green", "yellow", "orange", "purple", "pink"),
    "cup": ("white", "red", "blue", "green", "yellow", "brown", "purple", "pink"),
    "spoon": ("gray", "white", "black", "blue", "red"),
    "umbrella": ("red", "blue", "purple", "green", "black", "yellow", "pink"),
    "key": ("yellow", "gray", "brown", "black", "orange"),
    "heart": ("red", "pink", "purple", "orange"),
    "flower": ("pink", "red", "yellow", "purple", "blue", "white", "orange"),
    "bird": ("black", "blue", "red", "brown", "green", "gray"),
    "kite": ("red", "blue", "yellow", "green", "purple", "orange"),
    "mushroom": ("red", "brown", "orange", "purple"),
    "apple": ("red", "green", "yellow"),
    "bell": ("yellow", "orange", "gray", "brown"),
    "clock": ("black", "red", "blue", "brown", "green"),
    "lamp": ("yellow", "white", "green", "blue", "red", "purple"),
}

# Co-occurrence priors: when `kind` is in a scene, each partner joins with the given probability.
PARTNERS: dict[str, dict[str, float]] = {
    "boat": {"fish": 0.75, "cloud": 0.5},
    "fish": {"boat": 0.45},
    "cup": {"spoon": 0.8},
    "spoon": {"cup": 0.6},
    "moon": {"star": 0.8},
    "star": {"moon": 0.5},
    "house": {"tree": 0.7, "car": 0.45},
    "car": {"house": 0.35},
    "cat": {"ball": 0.65},
    "umbrella": {"cloud": 0.7},
    "kite": {"cloud": 0.5, "bird": 0.4},
    "flower": {"bird": 0.45, "heart": 0.3},
    "mushroom": {"tree": 0.6},
    "apple": {"tree": 0.5},
    "clock": {"lamp": 0.6},
    "lamp": {"clock": 0.4},
    "key": {"house": 0.4},
    "bell": {"clock": 0.4},
}

# Kinds that never share a scene (day vs night).
EXCLUDES: dict[str, frozenset[str]] = {
    "sun": frozenset({"moon", "star"}),
    "moon": frozenset({"sun"}),
    "star": frozenset({"sun"}),
}

# Backgrounds: name -> RGB (light and dark, so object colours contrast with some of them).
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "light blue": (190, 215, 240),
    "pale yellow": (245, 238, 195),
    "light gray": (215, 215, 215),
    "beige": (230, 215, 185),
    "light green": (200, 235, 195),
    "lavender": (222, 210, 240),
    "dark blue": (30, 40, 90),
    "dark gray": (60, 60, 64),
    "dark green": (30, 70, 45),
}
