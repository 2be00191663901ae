"""UI-format workflow -> API-format prompt, with the widget rules of ComfyUI's frontend.

`to_api_prompt(workflow, object_info)` does what the frontend's `graphToPrompt` does for the
graphs we ship: every widget-capable input (in `input_order`, required then optional) takes the
next entry of `widgets_values`; an INT or COMBO with `control_after_generate` (and any INT named
seed/noise_seed) is followed by the frontend-only control value ("randomize", ...), and an
`image_upload` COMBO by the upload widget's value; neither reaches the prompt. A linked input
becomes `[origin_id, origin_slot]` and overrides a widget of the same name. Muted nodes (mode 2)
and notes are dropped; bypassed nodes (mode 4) are refused rather than guessed.

`object_info` is ComfyUI's `/object_info` answer, or `spec_object_info()` (our node specs plus
`CORE_OBJECT_INFO`, the core nodes the workflows use, as ComfyUI v0.3.64 defines them) in CI.
"""

from __future__ import annotations

from typing import Any

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
VIRTUAL_NODES = ("Note", "MarkdownNote", "Reroute", "PrimitiveNode")
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")

# Core nodes used by the shipped workflows, in /object_info form (ComfyUI v0.3.64: nodes.py,
# comfy_extras/nodes_custom_sampler.py, comfy_extras/nodes_flux.py, comfy_extras/nodes_canny.py).
CORE_OBJECT_INFO: dict[str, dict] = {
    "SaveImage": {
        "input": {"required": {"images": ["IMAGE", {}], "filename_prefix": ["STRING", {"default": "ComfyUI"}]}},
        "input_order": {"required": ["images", "filename_prefix"]},
        "output": [],
        "output_node": True,
    },
    "LoadImage": {
        "input": {"required": {"image": [[], {"image_upload": True}]}},
        "input_order": {"required": ["image"]},
        "output": ["IMAGE", "MASK"],
    },
    "SamplerCustomAdvanced": {
        "input": {"required": {"noise": ["NOISE"], "guider": ["GUIDER"], "sampler": ["SAMPLER"], "sigmas": ["SIGMAS"], "latent_image": ["LATENT"]}},
        "input_order": {"required": ["noise", "guider", "sampler", "sigmas", "latent_image"]},
        "output": ["LATENT", "LATENT"],
    },
    "RandomNoise": {
        "input": {"required": {"noise_seed": ["INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}]}},
        "input_order": {"required": ["noise_seed"]},
        "output": ["NOISE"],
    },
    "BasicGuider": {
        "input": {"required": {"model": ["MODEL"], "conditioning": ["CONDITIONING"]}},
        "input_order": {"required": ["model", "conditioning"]},
        "output": ["GUIDER"],
    },
    "Canny": {
        "input": {"required": {"image": ["IMAGE", {}],
                               "low_threshold": ["FLOAT", {"default": 0.4, "min": 0.01, "max": 0.99, "step": 0.01}],
                               "high_threshold": ["FLOAT", {"default": 0.8, "min": 0.01, "max": 0.99, "step": 0.01}]}},
        "input_order": {"required": ["image", "low_threshold", "high_threshold"]},
        "output": ["IMAGE"],
    },
    "ControlNetApplyAdvanced": {
        "input": {
            "required": {"positive": ["CONDITIONING", {}], "negative": ["CONDITIONING", {}], "control_net": ["CONTROL_NET", {}],
                         "image": ["IMAGE", {}], "strength": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01}],
                         "start_percent": ["FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001}],
                         "end_percent": ["FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001}]},
            "optional": {"vae": ["VAE", {}]},
        },
        "input_order": {"required": ["positive", "negative", "control_net", "image", "strength", "start_percent", "end_percent"],
                        "optional": ["vae"]},
        "output": ["CONDITIONING", "CONDITIONING"],
    },
    "FluxGuidance": {
        "input": {"required": {"conditioning": ["CONDITIONING"], "guidance": ["FLOAT", {"default": 3.5, "min": 0.0, "max": 100.0, "step": 0.1}]}},
        "input_order": {"required": ["conditioning", "guidance"]},
        "output": ["CONDITIONING"],
    },
}


class WorkflowError(ValueError):
    """A workflow that does not fit the node definitions (names the node and the problem)."""


def spec_object_info(node_specs: dict) -> dict[str, dict]:
    """`/object_info`-style entries for our `NodeSpec`s (dynamic combos get empty option lists), plus the core nodes."""
    info: dict[str, dict] = dict(CORE_OBJECT_INFO)
    for node_id, spec in node_specs.items():
        entry: dict[str, Any] = {"input": {"required": {}, "optional": {}}, "input_order": {"required": [], "optional": []}}
        for i in spec.inputs:
            group = "optional" if i.optional else "required"
            options: dict[str, Any] = {}
            if i.control_after_generate:
                options["control_after_generate"] = True
            for key in ("default", "min", "max"):
                if getattr(i, key) is not None:
                    options[key] = getattr(i, key)
            if i.kind == "COMBO":
                options["options"] = list(i.options or [])
                options["dynamic"] = i.options is None
            entry["input"][group][i.name] = [i.kind, options]
            entry["input_order"][group].append(i.name)
        entry["output"] = [o.kind for o in spec.outputs]
        entry["output_node"] = spec.is_output_node
        info[node_id] = entry
    return info


def input_spec(info: dict, name: str) -> list:
    for group in ("required", "optional"):
        if name in info["input"].get(group, {}):
            return info["input"][group][name]
    raise KeyError(name)


def input_kind(spec: list) -> str:
    """INT/FLOAT/... or a socket type; V1 combos (a list of options) are COMBO."""
    return "COMBO" if isinstance(spec[0], list) else spec[0]


def widget_layout(info: dict) -> list[tuple[str, bool, bool]]:
    """[(input name, has a control value after it, has an upload value after it)] in widget order."""
    order = info["input_order"].get("required", []) + info["input_order"].get("optional", [])
    layout = []
    for name in order:
        spec = input_spec(info, name)
        options = spec[1] if len(spec) > 1 else {}
        kind = input_kind(spec)
        if kind not in WIDGET_TYPES or options.get("forceInput"):
            continue
        control = bool(options.get("control_after_generate")) or (kind == "INT" and name in ("seed", "noise_seed"))
        layout.append((name, control, bool(options.get("image_upload"))))
    return layout


def widget_values(node: dict, info: dict) -> dict[str, Any]:
    """{input name: value} from a UI node's widgets_values; raises WorkflowError on a count mismatch
    or a missing control value."""
    values = node.get("widgets_values") or []
    if isinstance(values, dict):  # some frontends save widgets by name
        return dict(values)
    layout = widget_layout(info)
    expected = sum(1 + control + upload for _, control, upload in layout)
    if len(values) != expected:
        names = [name for name, _, _ in layout]
        raise WorkflowError(
            f"node {node['id']} ({node['type']}): {len(values)} widget values for {expected} slots (widgets {names})"
        )
    out, index = {}, 0
    for name, control, upload in layout:
        out[name] = values[index]
        index += 1
        if control:
            if values[index] not in CONTROL_VALUES:
                raise WorkflowError(f"node {node['id']} ({node['type']}): {name} is followed by {values[index]!r}, not a control value")
            index += 1
        if upload:
            index += 1
    return out


def to_api_prompt(workflow: dict, object_info: dict[str, dict]) -> dict[str, dict]:
    """The API-format prompt `{id: {"class_type", "inputs", "_meta"}}` for a UI-format workflow."""
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt: dict[str, dict] = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL_NODES or node.get("mode", 0) == 2:
            continue
        if node.get("mode", 0) == 4:
            raise WorkflowError(f"node {node['id']} ({node['type']}) is bypassed; bypass is not supported by this converter")
        if node["type"] not in object_info:
            raise WorkflowError(f"node {node['id']}: unknown node type {node['type']!r}")
        info = object_info[node["type"]]
        inputs = widget_values(node, info)
        for slot in node.get("inputs", []):
            if slot.get("link") is None:
                continue
            link = links.get(slot["link"])
            if link is None:
                raise WorkflowError(f"node {node['id']} ({node['type']}): input {slot['name']} names missing link {slot['link']}")
            inputs[slot["name"]] = [str(link[1]), link[2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": node.get("title", node["type"])}}
    return prompt
