"""Pictograms: one small drawing function per object kind, each filling a square box of side `s` at (x, y).

A function draws the object's main body in `fill` and its fixed parts (wheels, trunks, hands) in fixed colours;
`detail` is the kind's one varying part (a roof colour, a facing direction), chosen by the scene generator.
"""

from __future__ import annotations

import math

from .kinds import COLOURS

DARK = (35, 35, 40)
LIGHT = (240, 240, 235)
BROWN = COLOURS["brown"]
GREEN = COLOURS["green"]


def _pts(x, y, s, rel):
    return [(x + a * s, y + b * s) for a, b in rel]


def _mirror(rel, flip):
    return [(1 - a, b) for a, b in rel] if flip else rel


def house(d, x, y, s, fill, detail):
    d.rectangle((x + 0.15 * s, y + 0.45 * s, x + 0.85 * s, y + s), fill=fill)
    d.polygon(_pts(x, y, s, [(0.03, 0.47), (0.5, 0.06), (0.97, 0.47)]), fill=COLOURS[detail])
    d.rectangle((x + 0.42 * s, y + 0.68 * s, x + 0.58 * s, y + s), fill=DARK)
    d.rectangle((x + 0.22 * s, y + 0.55 * s, x + 0.36 * s, y + 0.68 * s), fill=LIGHT)


def tree(d, x, y, s, fill, detail):
    d.rectangle((x + 0.42 * s, y + 0.55 * s, x + 0.58 * s, y + s), fill=BROWN)
    d.ellipse((x + 0.12 * s, y + 0.02 * s, x + 0.88 * s, y + 0.7 * s), fill=fill)


def car(d, x, y, s, fill, detail):
    d.polygon(_pts(x, y, s, [(0.2, 0.46), (0.3, 0.2), (0.7, 0.2), (0.8, 0.46)]), fill=fill)
    d.polygon(_pts(x, y, s, [(0.3, 0.44), (0.36, 0.27), (0.64, 0.27), (0.7, 0.44)]), fill=LIGHT)
    d.rectangle((x, y + 0.45 * s, x + s, y + 0.78 * s), fill=fill)
    for cx in (0.25, 0.75):
        d.ellipse((x + (cx - 0.13) * s, y + 0.67 * s, x + (cx + 0.13) * s, y + 0.93 * s), fill=DARK)


def boat(d, x, y, s, fill, detail):
    d.line((x + 0.5 * s, y + 0.05 * s, x + 0.5 * s, y + 0.66 * s), fill=DARK, width=max(1, round(0.05 * s)))
    d.polygon(_pts(x, y, s, [(0.53, 0.08), (0.53, 0.6), (0.92, 0.6)]), fill=COLOURS[detail])
    d.polygon(_pts(x, y, s, [(0.47, 0.2), (0.47, 0.6), (0.18, 0.6)]), fill=COLOURS[detail])
    d.polygon(_pts(x, y, s, [(0.0, 0.64), (1.0, 0.64), (0.8, 0.92), (0.2, 0.92)]), fill=fill)


def fish(d, x, y, s, fill, detail):
    flip = detail == "right"
    d.polygon(_pts(x, y, s, _mirror([(0.62, 0.5), (0.98, 0.2), (0.98, 0.8)], flip)), fill=fill)
    (a0, _), (a1, _) = _mirror([(0.04, 0), (0.74, 0)], flip)
    d.ellipse((x + min(a0, a1) * s, y + 0.26 * s, x + max(a0, a1) * s, y + 0.74 * s), fill=fill)
    ((ex, ey),) = _mirror([(0.2, 0.45)], flip)
    r = 0.06 * s
    d.ellipse((x + ex * s - r, y + ey * s - r, x + ex * s + r, y + ey * s + r), fill=DARK)


def sun(d, x, y, s, fill, detail):
    cx, cy = x + s / 2, y + s / 2
    for k in range(8):
        a = k * math.pi / 4
        d.line(
            (
                cx + 0.34 * s * math.cos(a),
                cy + 0.34 * s * math.sin(a),
                cx + 0.5 * s * math.cos(a),
                cy + 0.5 * s * math.sin(a),
            ),
            fill=fill,
            width=max(1, round(0.08 * s)),
        )
    d.ellipse((cx - 0.28 * s, cy - 0.28 * s, cx + 0.28 * s, cy + 0.28 * s), fill=fill)


def cloud(d, x, y, s, fill, detail):
    for box in [(0.02, 0.42, 0.5, 0.82), (0.22, 0.18, 0.76, 0.76), (0.5, 0.36, 0.98, 0.82)]:
        d.ellipse(_pts(x, y, s, [box[:2], box[2:]]), fill=fill)
    d.rectangle((x + 0.2 * s, y + 0.55 * s, x + 0.8 * s, y + 0.82 * s), fill=fill)


def _crescent(n=48):
    """A crescent as one polygon in unit-box coordinates: a disc minus an overlapping disc up and to the right."""
    (ox, oy, orad), (ix, iy, irad) = (0.5, 0.5, 0.45), (0.74, 0.42, 0.42)
    angles = [2 * math.pi * k / n for k in range(n)]
    outer = [(ox + orad * math.cos(a), oy + orad * math.sin(a)) for a in angles]
    inner = [(ix + irad * math.cos(a), iy + irad * math.sin(a)) for a in angles]
    outer = [p for p in outer if math.dist(p, (ix, iy)) > irad]
    inner = [p for p in inner if math.dist(p, (ox, oy)) < orad]
    return outer + inner[::-1]


CRESCENT = _crescent()


def moon(d, x, y, s, fill, detail):
    d.polygon(_pts(x, y, s, CRESCENT), fill=fill)


def star(d, x, y, s, fill, detail):
    cx, cy = x + s / 2, y + 0.53 * s
    pts = []
    for k in range(10):
        r = 0.5 * s if k % 2 == 0 else 0.2 * s
        a = -math.pi / 2 + k * math.pi / 5
        pts.append((cx + r * math.cos(a), cy + r * math.sin(a)))
    d.polygon(pts, fill=fill)


def cat(d, x, y, s, fill, detail):
    for ear in ([(0.12, 0.5), (0.18, 0.04), (0.48, 0.3)], [(0.88, 0.5), (0.82, 0.04), (0.52, 0.3)]):
        d.polygon(_pts(x, y, s, ear), fill=fill)
    d.ellipse((x + 0.1 * s, y + 0.22 * s, x + 0.9 * s, y + 0.95 * s), fill=fill)
    eye = DARK if fill != COLOURS["black"] else LIGHT
    for ex in (0.35, 0.65):
        d.ellipse((x + (ex - 0.06) * s, y + 0.45 * s, x + (ex + 0.06) * s, y + 0.58 * s), fill=eye)
    d.polygon(_pts(x, y, s, [(0.45, 0.66), (0.55, 0.66), (0.5, 0.73)]), fill=COLOURS["pink"])
    w = max(1, round(0.03 * s))
    for sx in (-1, 1):
        for dy in (-0.05, 0.05):
            d.line(
                (x + (0.5 + sx * 0.12) * s, y + 0.72 * s, x + (0.5 + sx * 0.5) * s, y + (0.72 + dy) * s),
                fill=eye,
                width=w,
            )


def ball(d, x, y, s, fill, detail):
    d.ellipse((x + 0.08 * s, y + 0.08 * s, x + 0.92 * s, y + 0.92 * s), fill=fill)
    w = max(1, round(0.07 * s))
    d.arc((x - 0.45 * s, y + 0.12 * s, x + 0.45 * s, y + 0.88 * s), -50, 50, fill=COLOURS[detail], width=w)
    d.arc((x + 0.55 * s, y + 0.12 * s, x + 1.45 * s, y + 0.88 * s), 130, 230, fill=COLOURS[detail], width=w)


def cup(d, x, y, s, fill, detail):
    body = [(0.12, 0.25), (0.7, 0.25), (0.64, 0.9), (0.18, 0.9)]
    handle = (0.56, 0.36, 0.94, 0.74)
    flip = detail == "left"
    if flip:
        body = _mirror(body, True)
        handle = (1 - handle[2], handle[1], 1 - handle[0], handle[3])
    start, end = (90, 270) if flip else (-90, 90)
    d.arc(_pts(x, y, s, [handle[:2], handle[2:]]), start, end, fill=fill, width=max(1, round(0.08 * s)))
    d.polygon(_pts(x, y, s, body), fill=fill)
    (r0, _), (r1, _) = body[0], body[1]
    d.line((x + r0 * s, y + 0.25 * s, x + r1 * s, y + 0.25 * s), fill=DARK, width=max(1, round(0.04 * s)))


def spoon(d, x, y, s, fill, detail):
    d.line((x + 0.5 * s, y + 0.35 * s, x + 0.5 * s, y + 0.98 * s), fill=fill, width=max(1, round(0.1 * s)))
    d.ellipse((x + 0.3 * s, y + 0.02 * s, x + 0.7 * s, y + 0.45 * s), fill=fill)


def umbrella(d, x, y, s, fill, detail):
    w = max(1, round(0.06 * s))
    d.line((x + 0.5 * s, y + 0.45 * s, x + 0.5 * s, y + 0.86 * s), fill=DARK, width=w)
    d.arc((x + 0.3 * s, y + 0.74 * s, x + 0.5 * s, y + 0.96 * s), 0, 180, fill=DARK, width=w)
    d.pieslice((x + 0.02 * s, y + 0.06 * s, x + 0.98 * s, y + 0.86 * s), 180, 360, fill=fill)


def key(d, x, y, s, fill, detail):
    w = max(1, round(0.11 * s))
    d.ellipse((x + 0.02 * s, y + 0.28 * s, x + 0.44 * s, y + 0.72 * s), outline=fill, width=w)
    d.line((x + 0.42 * s, y + 0.5 * s, x + 0.98 * s, y + 0.5 * s), fill=fill, width=w)
    for tx in (0.74, 0.88):
        d.rectangle((x + tx * s, y + 0.5 * s, x + (tx + 0.08) * s, y + 0.72 * s), fill=fill)


def heart(d, x, y, s, fill, detail):
    for cx in (0.29, 0.71):
        d.ellipse((x + (cx - 0.23) * s, y + 0.12 * s, x + (cx + 0.23) * s, y + 0.58 * s), fill=fill)
    d.polygon(_pts(x, y, s, [(0.08, 0.42), (0.92, 0.42), (0.5, 0.92)]), fill=fill)


def flower(d, x, y, s, fill, detail):
    cx, cy = x + 0.5 * s, y + 0.36 * s
    d.line((cx, cy, cx, y + s), fill=GREEN, width=max(1, round(0.07 * s)))
    d.ellipse((cx + 0.02 * s, y + 0.7 * s, cx + 0.3 * s, y + 0.82 * s), fill=GREEN)
    for k in range(5):
        a = -math.pi / 2 + k * 2 * math.pi / 5
        px, py = cx + 0.2 * s * math.cos(a), cy + 0.2 * s * math.sin(a)
        d.ellipse((px - 0.15 * s, py - 0.15 * s, px + 0.15 * s, py + 0.15 * s), fill=fill)
    d.ellipse((cx - 0.1 * s, cy - 0.1 * s, cx + 0.1 * s, cy + 0.1 * s), fill=COLOURS[detail])


def bird(d, x, y, s, fill, detail):
    w = max(2, round(0.1 * s))
    d.arc((x + 0.02 * s, y + 0.25 * s, x + 0.52 * s, y + 0.85 * s), 200, 340, fill=fill, width=w)
    d.arc((x + 0.48 * s, y + 0.25 * s, x + 0.98 * s, y + 0.85 * s), 200, 340, fill=fill, width=w)
    d.ellipse((x + 0.42 * s, y + 0.3 * s, x + 0.58 * s, y + 0.46 * s), fill=fill)


def kite(d, x, y, s, fill, detail):
    pts = [(0.5, 0.7), (0.42, 0.8), (0.55, 0.88), (0.45, 0.98)]
    d.line(_pts(x, y, s, pts), fill=DARK, width=max(1, round(0.03 * s)))
    d.polygon(_pts(x, y, s, [(0.5, 0.02), (0.82, 0.34), (0.5, 0.72), (0.18, 0.34)]), fill=fill)
    w = max(1, round(0.025 * s))
    d.line((x + 0.5 * s, y + 0.02 * s, x + 0.5 * s, y + 0.72 * s), fill=DARK, width=w)
    d.line((x + 0.18 * s, y + 0.34 * s, x + 0.82 * s, y + 0.34 * s), fill=DARK, width=w)


def mushroom(d, x, y, s, fill, detail):
    d.rectangle((x + 0.38 * s, y + 0.48 * s, x + 0.62 * s, y + 0.95 * s), fill=(235, 225, 200))
    d.pieslice((x + 0.04 * s, y + 0.08 * s, x + 0.96 * s, y + 0.9 * s), 180, 360, fill=fill)
    for px, py in ((0.3, 0.32), (0.55, 0.22), (0.72, 0.38)):
        d.ellipse((x + (px - 0.05) * s, y + (py - 0.05) * s, x + (px + 0.05) * s, y + (py + 0.05) * s), fill=LIGHT)


def apple(d, x, y, s, fill, detail):
    d.ellipse((x + 0.1 * s, y + 0.24 * s, x + 0.9 * s, y + 0.96 * s), fill=fill)
    d.line((x + 0.5 * s, y + 0.3 * s, x + 0.55 * s, y + 0.06 * s), fill=BROWN, width=max(1, round(0.06 * s)))
    d.ellipse((x + 0.56 * s, y + 0.04 * s, x + 0.84 * s, y + 0.18 * s), fill=GREEN)


def bell(d, x, y, s, fill, detail):
    d.ellipse((x + 0.42 * s, y + 0.8 * s, x + 0.58 * s, y + 0.96 * s), fill=DARK)
    d.pieslice((x + 0.25 * s, y + 0.06 * s, x + 0.75 * s, y + 0.56 * s), 180, 360, fill=fill)
    d.polygon(_pts(x, y, s, [(0.25, 0.3), (0.75, 0.3), (0.92, 0.84), (0.08, 0.84)]), fill=fill)
    d.ellipse((x + 0.45 * s, y + 0.0 * s, x + 0.55 * s, y + 0.1 * s), fill=fill)


def clock(d, x, y, s, fill, detail):
    d.ellipse((x + 0.04 * s, y + 0.04 * s, x + 0.96 * s, y + 0.96 * s), fill=fill)
    d.ellipse((x + 0.15 * s, y + 0.15 * s, x + 0.85 * s, y + 0.85 * s), fill=LIGHT)
    w = max(1, round(0.06 * s))
    c = x + 0.5 * s, y + 0.5 * s
    d.line((*c, x + 0.5 * s, y + 0.24 * s), fill=DARK, width=w)
    d.line((*c, x + 0.7 * s, y + 0.58 * s), fill=DARK, width=w)


def lamp(d, x, y, s, fill, detail):
    w = max(1, round(0.06 * s))
    d.line((x + 0.5 * s, y + 0.4 * s, x + 0.5 * s, y + 0.9 * s), fill=DARK, width=w)
    d.rectangle((x + 0.28 * s, y + 0.88 * s, x + 0.72 * s, y + 0.98 * s), fill=DARK)
    d.polygon(_pts(x, y, s, [(0.32, 0.04), (0.68, 0.04), (0.86, 0.42), (0.14, 0.42)]), fill=fill)


PICTOGRAMS = {
    "house": house,
    "tree": tree,
    "car": car,
    "boat": boat,
    "fish": fish,
    "sun": sun,
    "cloud": cloud,
    "moon": moon,
    "star": star,
    "cat": cat,
    "ball": ball,
    "cup": cup,
    "spoon": spoon,
    "umbrella": umbrella,
    "key": key,
    "heart": heart,
    "flower": flower,
    "bird": bird,
    "kite": kite,
    "mushroom": mushroom,
    "apple": apple,
    "bell": bell,
    "clock": clock,
    "lamp": lamp,
}

# Kinds whose drawing has one varying part: kind -> (choices, caption phrase with {detail}).
DETAILS: dict[str, tuple[tuple[str, ...], str]] = {
    "house": (("red", "brown", "gray", "black", "blue"), "with a {detail} roof"),
    "boat": (("white", "yellow", "red", "orange"), "with {detail} sails"),
    "fish": (("left", "right"), "facing {detail}"),
    "ball": (("white", "black", "yellow"), "with {detail} stripes"),
    "cup": (("left", "right"), "with its handle on the {detail}"),
    "flower": (("yellow", "orange", "white"), "with a {detail} centre"),
}
