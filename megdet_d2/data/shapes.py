"""Drawing for the built-in data: the shape classes, unannotated clutter and pixel noise.

The first three classes are the quickstart's (square, circle, triangle apex up); the others make
the harder variant (``MEGDET.QUICKSTART.NUM_CLASSES`` up to 8), two of them told apart from an
earlier class only by a detail (a ring is a circle with a hole, a triangle apex down is the
first triangle turned over).
"""

import numpy as np
from PIL import Image

__all__ = ["SHAPES", "add_noise", "draw_clutter", "draw_shape"]

SHAPES = ("square", "circle", "triangle", "diamond", "cross", "ring", "hexagon", "triangle_down")


def _polygon(draw, pts, colour):
    draw.polygon(pts, fill=colour)
    return [c for p in pts for c in p]


def draw_shape(draw, shape, box, colour, background=None):
    """Draw one filled shape inside ``box`` (x0, y0, x1, y1); return its COCO polygon.
    ``background`` fills a ring's hole."""
    x0, y0, x1, y1 = box
    cx, cy, r = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2
    if shape == "square":
        draw.rectangle([x0, y0, x1 - 1, y1 - 1], fill=colour)
        poly = [x0, y0, x1, y0, x1, y1, x0, y1]
    elif shape in ("circle", "ring"):
        draw.ellipse([x0, y0, x1 - 1, y1 - 1], fill=colour)
        if shape == "ring":
            h = r * 0.5
            draw.ellipse([cx - h, cy - h, cx + h - 1, cy + h - 1], fill=background)
        t = np.linspace(0, 2 * np.pi, 16, endpoint=False)
        poly = np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1).ravel().tolist()
    elif shape == "triangle":  # apex up
        poly = _polygon(draw, [(cx, y0), (x1, y1), (x0, y1)], colour)
    elif shape == "triangle_down":
        poly = _polygon(draw, [(x0, y0), (x1, y0), (cx, y1)], colour)
    elif shape == "diamond":
        poly = _polygon(draw, [(cx, y0), (x1, cy), (cx, y1), (x0, cy)], colour)
    elif shape == "hexagon":
        t = np.linspace(0, 2 * np.pi, 6, endpoint=False)
        poly = _polygon(draw, [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in t], colour)
    elif shape == "cross":
        w = (x1 - x0) / 3
        draw.rectangle([x0 + w, y0, x1 - w - 1, y1 - 1], fill=colour)
        draw.rectangle([x0, y0 + w, x1 - 1, y1 - w - 1], fill=colour)
        a, b, c, d = x0 + w, x1 - w, y0 + w, y1 - w
        pts = [(a, y0), (b, y0), (b, c), (x1, c), (x1, d), (b, d), (b, y1), (a, y1), (a, d),
               (x0, d), (x0, c), (a, c)]  # fmt: skip
        poly = [v for p in pts for v in p]
    else:
        raise ValueError(f"unknown shape {shape!r}; one of {SHAPES}")
    return [round(float(v), 2) for v in poly]


def draw_clutter(draw, rng, width, height, count):
    """``count`` unannotated distractors: lines, outlines of boxes and ellipses, and small
    blobs, in any colour (objects' colours included)."""
    small = min(width, height)
    for _ in range(count):
        kind = int(rng.integers(4))
        colour = tuple(int(v) for v in rng.integers(0, 256, size=3))
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        side = int(rng.integers(max(2, small // 16), max(3, small // 3)))
        x1, y1 = x0 + side, y0 + int(side * rng.uniform(0.3, 1.5))
        if kind == 0:
            draw.line([x0, y0, int(rng.integers(0, width)), int(rng.integers(0, height))],
                      fill=colour, width=int(rng.integers(1, 4)))  # fmt: skip
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], outline=colour, width=int(rng.integers(1, 3)))
        elif kind == 2:
            draw.ellipse([x0, y0, x1, y1], outline=colour, width=int(rng.integers(1, 3)))
        else:  # a small filled blob, under the smallest objects' size
            s = max(2, side // 3)
            draw.ellipse([x0, y0, x0 + s, y0 + int(s * rng.uniform(0.5, 2.0))], fill=colour)


def add_noise(image, rng, std):
    """``image`` plus Gaussian pixel noise of standard deviation ``std`` (0-255 units)."""
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, std, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8))
