"""Geometry of ComfyUI's canvas (frontend 1.27, litegraph), shared by the workflow tests.

Boxes are (left, top, right, bottom) in graph pixels unless said otherwise. A node's `pos` is the
top left of its body: the title bar (30 px) sits above it, and above that the badge strip (a 20 px
badge and a 2 px gap) that the frontend draws for custom nodes (the "sana-comfy" source badge;
built-in nodes have none by default).
"""

from __future__ import annotations

TITLE_HEIGHT = 30
BADGE_STRIP = 22
# The window the saved views are made for: 1366x768, the smallest common laptop screen, leaves a
# 1326x728 canvas, whose top 37 px carry the workflow tabs.
REFERENCE_CANVAS = (1326, 728)
TAB_STRIP_HEIGHT = 37


def node_box(node: dict) -> tuple[float, float, float, float]:
    """What the node covers on the canvas: its body, its title bar and the badge strip above it.
    `node` has `pos`, `size`, `titleHeight` and `badgeHeight` (as tests/frontend_probe.mjs reports)."""
    x, y = node["pos"]
    width, height = node["size"]
    return x, y - node["titleHeight"] - node["badgeHeight"], x + width, y + height


def saved_node_box(node: dict) -> tuple[float, float, float, float]:
    """`node_box` of a node as a UI workflow file stores it."""
    badge = 0 if node.get("properties", {}).get("cnr_id") == "comfy-core" else BADGE_STRIP
    return node_box({"pos": node["pos"], "size": node["size"], "titleHeight": TITLE_HEIGHT, "badgeHeight": badge})


def overlap(a, b, margin: float = 0.0) -> bool:
    """Whether boxes a and b overlap, or come closer than `margin`."""
    return a[0] < b[2] + margin and b[0] < a[2] + margin and a[1] < b[3] + margin and b[1] < a[3] + margin


def inside(point, box) -> bool:
    return box[0] < point[0] < box[2] and box[1] < point[1] < box[3]


def bezier(points, steps: int = 64) -> list[tuple[float, float]]:
    """Points along the cubic Bezier curve with these four control points (a link's spline)."""
    (x0, y0), (x1, y1), (x2, y2), (x3, y3) = points
    samples = []
    for i in range(steps + 1):
        t = i / steps
        a, b, c, d = (1 - t) ** 3, 3 * t * (1 - t) ** 2, 3 * t**2 * (1 - t), t**3
        samples.append((a * x0 + b * x1 + c * x2 + d * x3, a * y0 + b * y1 + c * y2 + d * y3))
    return samples


def to_screen(box, ds: dict) -> tuple[float, float, float, float]:
    """A graph box in canvas pixels at the view `ds` ({"offset": [x, y], "scale": s}, as `extra.ds`)."""
    (ox, oy), scale = ds["offset"], ds["scale"]
    return (box[0] + ox) * scale, (box[1] + oy) * scale, (box[2] + ox) * scale, (box[3] + oy) * scale
