"""Every shipped workflow fits the node definitions, without ComfyUI.

Checks, per workflow: UI-format shape (nodes, links, version), each node type known (ours from
nodes/specs.py, core ones from ComfyUI v0.3.64's definitions), widget values in number and order
(control_after_generate and upload slots included), their types, ranges and combo options,
links consistent on both ends and type-correct, every socket input linked, an output node
present, the official model file names listed in workflows/README.md, the model metadata that
ComfyUI's frontend turns into download offers, the saved layout, and the API conversion.
The same workflows in the real frontend: tests/test_frontend_layout.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from canvas_geometry import REFERENCE_CANVAS, TAB_STRIP_HEIGHT, overlap, saved_node_box, to_screen
from comfy_api_format import WorkflowError, input_spec, spec_object_info, to_api_prompt, widget_layout, widget_values
from node_fixtures import CONTROLNET_HED, DCAE_FILE, DIT_1024, DIT_4K, DIT_SPRINT, GEMMA_FOLDER, ROOT, ext_module

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
SPECS = ext_module("nodes.specs").NODE_SPECS
OBJECT_INFO = spec_object_info(SPECS)


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_four_workflows_ship():
    names = {p.name for p in WORKFLOWS}
    assert names == {
        "sana_1600m_1024px_t2i.json",
        "sana_1600m_4k_tiled_decode.json",
        "sana_sprint_1.6b_2step.json",
        "sana_1600m_img2img.json",
        "sana_1600m_1024px_w8a8.json",
        "sana_1600m_controlnet_canny.json",
    }


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_fits_the_node_definitions(path):
    workflow = load(path)
    assert workflow["version"] == 0.4
    nodes = {n["id"]: n for n in workflow["nodes"]}
    assert len(nodes) == len(workflow["nodes"])
    assert workflow["last_node_id"] >= max(nodes)
    links = {link[0]: link for link in workflow["links"]}
    assert workflow["last_link_id"] >= max(links)

    for node in workflow["nodes"]:
        info = OBJECT_INFO[node["type"]]
        values = widget_values(node, info)  # raises on a wrong count or a missing control value
        spec = SPECS.get(node["type"])
        if spec is not None:
            for i in spec.inputs:
                if i.is_widget:
                    check_value(node, i, values[i.name])
        sockets = [n for n in info["input_order"]["required"] if info["input"]["required"][n][0] not in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO") and not isinstance(info["input"]["required"][n][0], list)]
        linked = {slot["name"] for slot in node.get("inputs", []) if slot.get("link") is not None}
        assert set(sockets) <= linked, (node["type"], set(sockets) - linked)

    for link_id, origin, origin_slot, target, target_slot, kind in workflow["links"]:
        source, sink = nodes[origin], nodes[target]
        assert link_id in (source["outputs"][origin_slot]["links"] or [])
        assert sink["inputs"][target_slot]["link"] == link_id
        produced = OBJECT_INFO[source["type"]]["output"][origin_slot]
        wanted = input_spec(OBJECT_INFO[sink["type"]], sink["inputs"][target_slot]["name"])[0]
        assert produced == wanted == kind, (source["type"], sink["type"], produced, wanted, kind)

    assert any(OBJECT_INFO[n["type"]].get("output_node") for n in workflow["nodes"])


def check_value(node: dict, spec, value) -> None:
    where = f"{node['type']}.{spec.name}"
    if spec.kind == "INT":
        assert isinstance(value, int) and not isinstance(value, bool), where
    elif spec.kind == "FLOAT":
        assert isinstance(value, (int, float)) and not isinstance(value, bool), where
    elif spec.kind in ("STRING", "COMBO"):
        assert isinstance(value, str), where
    if spec.min is not None:
        assert value >= spec.min, where
    if spec.max is not None:
        assert value <= spec.max, where
    if spec.kind == "INT" and spec.step and spec.min is not None:
        assert (value - spec.min) % spec.step == 0 or value % spec.step == 0, where
    if spec.options is not None:
        assert value in spec.options, where


def model_names(workflow: dict) -> set[str]:
    names = set()
    for node in workflow["nodes"]:
        spec = SPECS.get(node["type"])
        if spec is None:
            continue
        values = widget_values(node, OBJECT_INFO[node["type"]])
        names |= {values[i.name] for i in spec.inputs if i.options_source is not None}
    return names


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_names_official_files_listed_in_the_readme(path):
    readme = (ROOT / "workflows" / "README.md").read_text()
    names = model_names(load(path))
    assert names, "a workflow must name the model files it needs"
    assert names <= {DIT_1024, DIT_4K, DIT_SPRINT, DCAE_FILE, GEMMA_FOLDER, CONTROLNET_HED}
    for name in names:
        assert name in readme, f"{name} is not listed in workflows/README.md"


# What ComfyUI's frontend (1.27, MissingModelsWarning) offers to download from a workflow's model
# metadata: only URLs from these hosts, and only files with these suffixes (plus three URLs it
# lists by name). It matches `name` against the file listing of `directory` (files only, so a
# folder such as a Gemma-2 checkout can never be found), and reads the metadata of a node only
# for the names that node's widgets hold.
DOWNLOAD_HOSTS = ("https://huggingface.co/", "https://civitai.com/")
DOWNLOAD_SUFFIXES = (".safetensors", ".sft")
LOADER_DIRECTORIES = {"SanaDiTLoader": "diffusion_models", "SanaDCAELoader": "vae", "SanaControlNetLoader": "controlnet"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_tells_the_frontend_where_each_model_file_comes_from(path):
    readme = (ROOT / "workflows" / "README.md").read_text()
    workflow = load(path)
    for node in workflow["nodes"]:
        spec = SPECS.get(node["type"])
        if spec is None:
            continue
        values = widget_values(node, OBJECT_INFO[node["type"]])
        names = [values[i.name] for i in spec.inputs if i.options_source is not None]
        models = node.get("properties", {}).get("models", [])
        if node["type"] not in LOADER_DIRECTORIES:
            assert not models, (node["type"], "folders cannot be matched by the frontend: say in the README what to fetch")
            continue
        assert [(m["name"], m["directory"]) for m in models] == [(names[0], LOADER_DIRECTORIES[node["type"]])], models
        url = models[0]["url"]
        assert url.startswith(DOWNLOAD_HOSTS) and "/resolve/main/" in url, url
        if not names[0].endswith(DOWNLOAD_SUFFIXES):  # listed as missing, but not offered for download
            assert url.rsplit("/", 1)[1] == names[0] and url in readme, (url, "fetch it by hand: the README must give the URL")
    assert "models" not in workflow  # node metadata only: the frontend then asks only for the files the widgets pick


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_saved_layout_has_room_for_every_node_at_the_saved_view(path):
    """Without a browser: no two nodes (title bars and badge strips included) overlap, and at the
    saved view all of them lie on the reference canvas below the tab strip, at a zoom where the
    frontend still draws text (8 px / 14 px). tests/test_frontend_layout.py checks the rest."""
    workflow = load(path)
    boxes = {node["id"]: saved_node_box(node) for node in workflow["nodes"]}
    ids = sorted(boxes)
    crowded = [(a, b) for i, a in enumerate(ids) for b in ids[i + 1 :] if overlap(boxes[a], boxes[b], 8)]
    assert not crowded, crowded
    ds = workflow["extra"]["ds"]
    assert ds["scale"] >= 8 / 14, ds
    width, height = REFERENCE_CANVAS
    for node_id, box in boxes.items():
        left, top, right, bottom = to_screen(box, ds)
        assert 0 <= left and TAB_STRIP_HEIGHT <= top and right <= width and bottom <= height, (node_id, ds)


def test_each_workflow_does_what_its_name_says():
    by_name = {p.stem: to_api_prompt(load(p), OBJECT_INFO) for p in WORKFLOWS}

    def nodes(prompt, kind):
        return [n["inputs"] for n in prompt.values() if n["class_type"] == kind]

    t2i = by_name["sana_1600m_1024px_t2i"]
    (ks,) = nodes(t2i, "SanaKSampler")
    assert (ks["steps"], ks["cfg"], ks["solver"], ks["denoise"]) == (20, 4.5, "flow_dpm_solver", 1.0)
    assert nodes(t2i, "SanaEmptyLatentImage")[0]["resolution_bins"] == "1024px"
    assert nodes(t2i, "SanaGemmaTextEncode")[0]["chi"] == "preset"
    assert len(nodes(t2i, "SanaGemmaNegativeEncode")) == 1  # the negative never gets the CHI

    four_k = by_name["sana_1600m_4k_tiled_decode"]
    latent = nodes(four_k, "SanaEmptyLatentImage")[0]
    assert (latent["width"], latent["height"], latent["resolution_bins"]) == (4096, 4096, "4096px")
    assert nodes(four_k, "SanaDCAEDecode")[0]["tile_size"] > 0
    assert nodes(four_k, "SanaDiTLoader")[0]["dit_name"] == DIT_4K

    sprint = by_name["sana_sprint_1.6b_2step"]
    assert nodes(sprint, "SanaSampler")[0]["solver"] == "trigflow"
    sigmas = nodes(sprint, "SanaSigmas")[0]
    assert (sigmas["solver"], sigmas["steps"]) == ("trigflow", 2)
    assert len(nodes(sprint, "SamplerCustomAdvanced")) == 1 and len(nodes(sprint, "FluxGuidance")) == 1

    img2img = by_name["sana_1600m_img2img"]
    assert nodes(img2img, "SanaKSampler")[0]["denoise"] < 1.0
    (encode,) = [k for k, n in img2img.items() if n["class_type"] == "SanaDCAEEncode"]
    assert nodes(img2img, "SanaKSampler")[0]["latent_image"] == [encode, 0]

    w8a8 = by_name["sana_1600m_1024px_w8a8"]
    (quantize,) = [k for k, n in w8a8.items() if n["class_type"] == "SanaW8A8Quantize"]
    (loader,) = [k for k, n in w8a8.items() if n["class_type"] == "SanaDiTLoader"]
    assert w8a8[quantize]["inputs"]["model"] == [loader, 0]
    assert nodes(w8a8, "SanaKSampler")[0]["model"] == [quantize, 0]

    control = by_name["sana_1600m_controlnet_canny"]
    ids = {n["class_type"]: k for k, n in control.items()}
    apply = control[ids["ControlNetApplyAdvanced"]]["inputs"]
    assert apply["control_net"] == [ids["SanaControlNetLoader"], 0] and apply["vae"] == [ids["SanaDCAELoader"], 0]
    assert apply["image"] == [ids["Canny"], 0] and control[ids["Canny"]]["inputs"]["image"] == [ids["LoadImage"], 0]
    (ks,) = nodes(control, "SanaKSampler")
    assert ks["positive"] == [ids["ControlNetApplyAdvanced"], 0] and ks["negative"] == [ids["ControlNetApplyAdvanced"], 1]
    assert nodes(control, "SanaControlNetLoader")[0]["controlnet_name"] == CONTROLNET_HED


def test_api_conversion_of_seed_widgets_skips_the_control_value():
    prompt = to_api_prompt(load(ROOT / "workflows" / "sana_1600m_1024px_t2i.json"), OBJECT_INFO)
    (ks,) = [n["inputs"] for n in prompt.values() if n["class_type"] == "SanaKSampler"]
    assert ks["seed"] == 42 and ks["steps"] == 20  # "randomize" sits between them in widgets_values
    assert ks["model"][1] == 0 and isinstance(ks["model"][0], str)
    assert set(ks) == set(SPECS["SanaKSampler"].input_order())


def test_widget_count_mismatch_is_refused():
    workflow = load(ROOT / "workflows" / "sana_1600m_1024px_t2i.json")
    node = next(n for n in workflow["nodes"] if n["type"] == "SanaKSampler")
    node["widgets_values"] = [v for v in node["widgets_values"] if v != "randomize"]  # an old save without the control
    with pytest.raises(WorkflowError, match="widget values"):
        to_api_prompt(workflow, OBJECT_INFO)


def test_seed_layout_has_a_control_slot_and_upload_slot_counts():
    assert widget_layout(OBJECT_INFO["SanaKSampler"])[0] == ("seed", True, False)
    assert widget_layout(OBJECT_INFO["RandomNoise"]) == [("noise_seed", True, False)]
    assert widget_layout(OBJECT_INFO["LoadImage"]) == [("image", False, True)]
