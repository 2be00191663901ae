"""The node definitions: ids, the pinned input order, tooltips, defaults (no ComfyUI needed).

Workflows store widget values by position, so a shipped node's inputs may only ever be
appended to (optional, with a default). If a test here fails because an input was added,
append it to PINNED_INPUT_ORDER; if it fails because inputs moved or were removed, put them back.
"""

from __future__ import annotations

import pytest

from node_fixtures import ext_module

specs = ext_module("nodes.specs")
SPECS = specs.NODE_SPECS

PINNED_INPUT_ORDER = {
    "SanaDiTLoader": ["dit_name", "dtype", "variant"],
    "SanaGemmaLoader": ["gemma_name", "dtype"],
    "SanaGemmaTextEncode": ["gemma", "text", "chi", "custom_chi", "max_tokens"],
    "SanaGemmaNegativeEncode": ["gemma", "text", "max_tokens"],
    "SanaDCAELoader": ["vae_name", "dtype"],
    "SanaDCAEDecode": ["samples", "vae", "tile_size", "tile_overlap"],
    "SanaDCAEEncode": ["pixels", "vae", "tile_size", "tile_overlap"],
    "SanaKSampler": ["model", "positive", "negative", "latent_image", "seed", "steps", "cfg", "flow_shift", "solver", "pag_scale", "denoise"],
    "SanaSampler": ["solver"],
    "SanaSigmas": ["model", "solver", "steps", "flow_shift", "denoise"],
    "SanaEmptyLatentImage": ["width", "height", "batch_size", "resolution_bins"],
    "SanaLoRALoader": ["model", "lora_name", "strength"],
    "SanaW8A8Quantize": ["model"],
    "SanaControlNetLoader": ["controlnet_name", "dtype"],
}
PINNED_OUTPUTS = {
    "SanaDiTLoader": ["MODEL"],
    "SanaGemmaLoader": ["SANA_GEMMA"],
    "SanaGemmaTextEncode": ["CONDITIONING"],
    "SanaGemmaNegativeEncode": ["CONDITIONING"],
    "SanaDCAELoader": ["VAE"],
    "SanaDCAEDecode": ["IMAGE"],
    "SanaDCAEEncode": ["LATENT"],
    "SanaKSampler": ["LATENT"],
    "SanaSampler": ["SAMPLER"],
    "SanaSigmas": ["SIGMAS"],
    "SanaEmptyLatentImage": ["LATENT", "INT", "INT"],
    "SanaLoRALoader": ["MODEL"],
    "SanaW8A8Quantize": ["MODEL"],
    "SanaControlNetLoader": ["CONTROL_NET"],
}

# Display names follow one style ("Sana <what it is>") and each node sits in the sub-category of
# its stage. Display names and categories may change (workflows store node ids, not names), but
# deliberately: update these pins together with workflows/README.md.
PINNED_NAMES_AND_CATEGORIES = {
    "SanaDiTLoader": ("Sana DiT Loader", "Sana/loaders"),
    "SanaGemmaLoader": ("Sana Gemma Loader", "Sana/loaders"),
    "SanaDCAELoader": ("Sana DC-AE Loader", "Sana/loaders"),
    "SanaLoRALoader": ("Sana LoRA Loader", "Sana/loaders"),
    "SanaControlNetLoader": ("Sana ControlNet Loader", "Sana/loaders"),
    "SanaGemmaTextEncode": ("Sana CHI Text Encode", "Sana/conditioning"),
    "SanaGemmaNegativeEncode": ("Sana Negative Text Encode", "Sana/conditioning"),
    "SanaKSampler": ("Sana KSampler", "Sana/sampling"),
    "SanaSampler": ("Sana Sampler", "Sana/sampling"),
    "SanaSigmas": ("Sana Sigmas", "Sana/sampling"),
    "SanaEmptyLatentImage": ("Sana Empty Latent Image", "Sana/latent"),
    "SanaDCAEDecode": ("Sana DC-AE Decode", "Sana/latent"),
    "SanaDCAEEncode": ("Sana DC-AE Encode", "Sana/latent"),
    "SanaW8A8Quantize": ("Sana W8A8", "Sana/quantization"),
}


def test_every_shipped_node_is_pinned():
    assert set(SPECS) == set(PINNED_INPUT_ORDER) == set(PINNED_NAMES_AND_CATEGORIES)


@pytest.mark.parametrize("node_id", sorted(PINNED_INPUT_ORDER))
def test_input_order_only_grows_by_optional_appends(node_id):
    spec = SPECS[node_id]
    pinned = PINNED_INPUT_ORDER[node_id]
    order = spec.input_order()
    assert order[: len(pinned)] == pinned
    added = [i for i in spec.inputs if i.name in order[len(pinned):]]
    assert all(i.optional and i.default is not None for i in added), "new inputs must be optional with a default"
    assert [o.kind for o in spec.outputs] == PINNED_OUTPUTS[node_id]


@pytest.mark.parametrize("node_id", sorted(PINNED_INPUT_ORDER))
def test_ids_category_and_tooltips(node_id):
    spec = SPECS[node_id]
    assert spec.node_id == node_id and node_id.startswith("Sana")
    assert (spec.display_name, spec.category) == PINNED_NAMES_AND_CATEGORIES[node_id]
    assert spec.description
    for i in spec.inputs:
        assert len(i.tooltip) > 10, (node_id, i.name)
        if i.options is not None:
            assert i.default in i.options, (node_id, i.name)
        if i.kind in ("INT", "FLOAT") and i.default is not None:
            assert i.min <= i.default <= i.max, (node_id, i.name)
    assert all(o.tooltip for o in spec.outputs)


def test_defaults_follow_the_official_pipelines():
    ks = {i.name: i for i in SPECS["SanaKSampler"].inputs}
    assert (ks["steps"].default, ks["cfg"].default, ks["solver"].default, ks["denoise"].default) == (20, 4.5, "flow_dpm_solver", 1.0)
    assert ks["seed"].control_after_generate and ks["seed"].max == 2**64 - 1
    assert ks["flow_shift"].default == 0.0  # 0 = the model's own shift
    assert SPECS["SanaDiTLoader"].inputs[2].options[0] == "auto"
    assert SPECS["SanaDiTLoader"].inputs[1].options == ("auto", "bf16", "fp16", "fp32")
    assert {i.name: i.default for i in SPECS["SanaGemmaTextEncode"].inputs}["chi"] == "preset"
    assert "chi" not in SPECS["SanaGemmaNegativeEncode"].input_order()
    assert set(SPECS["SanaEmptyLatentImage"].inputs[3].options) == {"off", "512px", "1024px", "2048px", "4096px"}


def test_widget_inputs_skip_sockets():
    assert [i.name for i in SPECS["SanaKSampler"].widget_inputs()] == PINNED_INPUT_ORDER["SanaKSampler"][4:]
    assert [i.name for i in SPECS["SanaDCAEDecode"].widget_inputs()] == ["tile_size", "tile_overlap"]


def test_one_naming_style_in_names_and_texts():
    """Every display name reads "Sana <what>", and no description or tooltip still names a node in
    the old "<what> (Sana)" style or by a display name that no longer exists."""
    names = [spec.display_name for spec in SPECS.values()]
    assert len(set(names)) == len(names)
    assert all(name.startswith("Sana ") and "(Sana)" not in name for name in names)
    texts = [spec.description for spec in SPECS.values()] + [i.tooltip for spec in SPECS.values() for i in spec.inputs]
    for stale in ("(Sana)", "Empty Sana Latent", "Gemma CHI Text Encode", "Gemma Negative Text Encode", "Flow-DPM-Solver KSampler"):
        assert not [t for t in texts if stale in t], stale
