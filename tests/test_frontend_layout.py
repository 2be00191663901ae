"""The shipped workflows as a user sees them in ComfyUI's real frontend (headless Chromium).

Skipped unless `COMFYUI_DIR` points at a ComfyUI checkout (with its frontend package), Node.js and
Chromium are installed and playwright-core can be found (next to tests/frontend_probe.mjs or in
`$PLAYWRIGHT_DIR`); `CHROMIUM` overrides /usr/bin/chromium. `SANA_FRONTEND_SHOTS=<folder>` keeps
the screenshots. workflows/README.md says how to set this up.

tests/frontend_probe.mjs loads each workflow into the canvas at the reference window size (1366x768,
the smallest common laptop screen; larger windows only show more) and reports the geometry; this
module judges it:

- at the saved view (`extra.ds`) every node, with its title bar and badge strip, lies on the canvas,
  clear of the frontend's own panels (tab strip, minimap, toolbar, canvas info), zoomed in enough
  for the frontend to draw text;
- no two nodes overlap and no link passes behind a node;
- no node was saved smaller than the frontend's minimum (a clipped widget row), no widget row
  ends below its node, and no combo or number row or title has to be shortened to fit;
- every Sana node added by hand shows its whole title;
- with the model files missing, the "Missing Models" dialog names each file the workflow's
  metadata points at, with a download button for the single .safetensors files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from canvas_geometry import bezier, inside, node_box, overlap, to_screen
from comfy_server import COMFYUI_DIR, ComfyServer, model_folders_moved_away, write_png
from node_fixtures import ROOT, write_model_folders

PROBE = Path(__file__).with_name("frontend_probe.mjs")
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
VIEWPORT = "1366x768"
PROBE_TIMEOUT_S = 600
LOADER_DIRECTORIES = {"SanaDiTLoader": "diffusion_models", "SanaDCAELoader": "vae", "SanaControlNetLoader": "controlnet"}  # the loaders whose files the dialog can name

# The frontend's drawing rules (ComfyUI_frontend 1.27, litegraph): a title gets the node width
# minus two title heights, a combo/number row the width minus 85 px (margins and arrows), with a
# 5 px gap between label and value.
ARROW_ROW_PADDING, LABEL_VALUE_GAP = 85, 5
GAP = 8  # the least free space kept between boxes, in graph pixels
LINK_END_ZONE = 16  # a link starts and ends inside its own nodes' edges, at the slot dots


def playwright_found() -> bool:
    if not shutil.which("node"):
        return False
    places = [str(PROBE.parent)] + ([os.environ["PLAYWRIGHT_DIR"]] if os.environ.get("PLAYWRIGHT_DIR") else [])
    check = f"require.resolve('playwright-core', {{paths: {json.dumps(places)}}})"
    return subprocess.run(["node", "-e", check], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(
    not (COMFYUI_DIR and Path(CHROMIUM).exists() and playwright_found()),
    reason="needs COMFYUI_DIR, Node.js with playwright-core (PLAYWRIGHT_DIR) and Chromium (CHROMIUM)",
)


def layout_problems(graph: dict, saved: dict) -> list[str]:
    """Everything a user would see wrong with this workflow at its saved view."""
    problems = []
    nodes = {node["id"]: node for node in graph["nodes"]}
    saved_sizes = {node["id"]: node["size"] for node in saved["nodes"]}
    boxes = {node_id: node_box(node) for node_id, node in nodes.items()}

    def name(node_id) -> str:
        return f"#{node_id} {nodes[node_id]['title']!r}"

    # Rows and titles
    for node_id, node in nodes.items():
        width, height = saved_sizes[node_id]
        min_width, min_height = node["minSize"]
        if width < min_width or height < min_height:
            problems.append(f"{name(node_id)} is saved at {width}x{height}, below the frontend's minimum {min_width:.0f}x{min_height:.0f}")
        if node["titleWidth"] > node["size"][0] - 2 * node["titleHeight"]:
            problems.append(f"{name(node_id)}: the title is cut")
        for widget in node["widgets"]:
            if widget["y"] is not None and widget["y"] + widget["height"] > node["size"][1] + 1:
                problems.append(f"{name(node_id)}: row {widget['name']} ends below the node")
            if widget["valueWidth"] and widget["labelWidth"] + LABEL_VALUE_GAP + widget["valueWidth"] > node["size"][0] - ARROW_ROW_PADDING:
                problems.append(f"{name(node_id)}: row {widget['name']} is shortened to fit")

    # Nodes on top of nodes
    ids = sorted(nodes)
    for i, a in enumerate(ids):
        for b in ids[i + 1 :]:
            if overlap(boxes[a], boxes[b], GAP):
                problems.append(f"{name(a)} and {name(b)} overlap (or are closer than {GAP} px)")

    # Links behind nodes
    if not graph["splineLinks"]:
        problems.append("links are not drawn as splines; only splines are checked")
    for link in graph["links"]:
        start, end = link["points"][0], link["points"][-1]
        for node_id, box in boxes.items():
            own = node_id in (link["origin"], link["target"])
            hidden = [
                p for p in bezier(link["points"])
                if inside(p, box) and not (own and min(abs(p[0] - q[0]) + abs(p[1] - q[1]) for q in (start, end)) < LINK_END_ZONE)
            ]
            if hidden:
                problems.append(f"link {link['id']} ({name(link['origin'])} -> {name(link['target'])}) passes behind {name(node_id)}")

    # The saved view
    ds, canvas = graph["ds"], graph["canvas"]
    if ds["scale"] < graph["lowQualityScale"]:
        problems.append(f"the saved zoom {ds['scale']} is below {graph['lowQualityScale']:.3f}, where the frontend stops drawing text")
    view = (0, 0, canvas["width"], canvas["height"])
    panels = [(o["x"], o["y"], o["x"] + o["width"], o["y"] + o["height"], o["name"]) for o in graph["overlays"]]
    for node_id, box in boxes.items():
        screen = to_screen(box, ds)
        if not (view[0] <= screen[0] and view[1] <= screen[1] and screen[2] <= view[2] and screen[3] <= view[3]):
            problems.append(f"{name(node_id)} is not entirely on the canvas at the saved view ({[round(v) for v in screen]})")
        for *panel, panel_name in panels:
            if overlap(screen, panel):
                problems.append(f"{name(node_id)} lies under the frontend's {panel_name}")
    return problems


# ---------------------------------------------------------------------------------------------
# Running the probe


@pytest.fixture(scope="module")
def model_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("frontend_models")
    write_model_folders(root)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_root):
    comfy = ComfyServer(tmp_path_factory.mktemp("frontend_server"), model_root)
    try:
        comfy.wait_ready()
        write_png(comfy.input / "example.png", 256, 192)  # the img2img workflow's LoadImage file
        yield comfy
    finally:
        comfy.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ["SANA_FRONTEND_SHOTS"]) if os.environ.get("SANA_FRONTEND_SHOTS") else tmp_path_factory.mktemp("shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def probe(server: ComfyServer, phase: str, shots: Path | None = None) -> dict:
    command = ["node", str(PROBE), "--url", server.url, "--phase", phase, "--viewport", VIEWPORT, "--chromium", CHROMIUM]
    if shots is not None:
        command += ["--shots", str(shots)]
    run = subprocess.run(command + [str(p) for p in WORKFLOWS], capture_output=True, text=True, timeout=PROBE_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def measured(server, shots) -> dict:
    return probe(server, "layout", shots)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_is_readable_at_its_saved_view(measured, path):
    problems = layout_problems(measured["workflows"][path.stem], json.loads(path.read_text()))
    assert not problems, "\n".join(problems)


def test_sana_nodes_added_by_hand_show_their_whole_title(measured):
    nodes = measured["handAdded"]
    assert {node["type"] for node in nodes} >= {"SanaDiTLoader", "SanaKSampler", "SanaW8A8Quantize"}
    cut = [node["title"] for node in nodes if node["titleWidth"] > node["size"][0] - 2 * node["titleHeight"]]
    assert not cut, cut
    assert all(node["category"].startswith("Sana/") for node in nodes)


def test_missing_models_dialog_names_every_file_to_fetch(server, model_root):
    """With the model folders away, loading each workflow lists its DiT and DC-AE files with their
    folders; the DC-AE (a .safetensors) can be downloaded from the dialog, the official DiT .pth
    cannot (the frontend downloads only .safetensors/.sft), so workflows/README.md says to fetch it."""
    with model_folders_moved_away(model_root):
        missing = probe(server, "missing")
    for path in WORKFLOWS:
        workflow = json.loads(path.read_text())
        expected = {f"{LOADER_DIRECTORIES[n['type']]} / {n['widgets_values'][0]}" for n in workflow["nodes"] if n["type"] in LOADER_DIRECTORIES}
        urls = {f"{m['directory']} / {m['name']}": m["url"] for n in workflow["nodes"] for m in n.get("properties", {}).get("models", [])}
        found = {entry["label"]: entry for entry in missing["workflows"][path.stem]["entries"]}
        assert set(found) == expected, (path.stem, found)
        for label, entry in found.items():
            assert entry["url"] == urls[label], entry
            downloadable = label.endswith(".safetensors")
            assert entry["downloadEnabled"] == downloadable and bool(entry["error"]) != downloadable, entry


def test_no_missing_models_dialog_when_the_files_are_there(server):
    present = probe(server, "missing")
    assert all(not result["dialog"] for result in present["workflows"].values()), present["workflows"]
