"""The extension inside a real ComfyUI (skipped unless COMFYUI_DIR points at a ComfyUI checkout).

`COMFYUI_PYTHON` is the interpreter with ComfyUI's requirements (default: this one); it also
needs this project's runtime requirements (torch, transformers, safetensors, einops, numpy).

1. `test_shipped_workflows_run_headless`: ComfyUI is started headless on the CPU (127.0.0.1,
   a free port) with this extension and temporary model folders (extra_model_paths.yaml) holding
   tiny random checkpoints under the official file names the workflows use. Each workflow is
   converted UI -> API with the server's own /object_info, shrunk to 256x192 px for CPU time
   (the 4K workflow keeps a forced tiled decode, with 128 px tiles), queued, and must finish
   with no node errors and a PNG of the expected size. The server is always killed.
   `test_workflows_are_served_as_templates`: the same files, as ComfyUI's template list serves them.
2. `test_every_missing_model_file_is_reported_at_queue_time`: the same workflows queued with the
   model folders moved away are refused before anything runs, every loader named with its file
   and the folders searched (and an empty file is refused as well, naming its path).
3. `test_ksampler_node_matches_sana_generate`: in a ComfyUI process (no server), the
   SanaKSampler node (Flow-DPM-Solver, Flow-DPM-Solver + PAG, Sprint's trigflow) against
   `sana.generate` on the same noise: ComfyUI starts flow sampling at sigma0 * noise, so the
   reference gets `latents = sigma0 * noise` (Sprint: the seed, whose stream also gives the
   per-step noise). With the Sana ControlNet Loader's CONTROL_NET through ComfyUI's own Apply
   ControlNet (the DC-AE as its vae): the SanaKSampler equals `sana.generate(controlnet=...)`
   with the same control image, two chained Apply nodes equal one of their summed strength, and
   ComfyUI's own KSampler (euler, simple) equals sana's Flow-Euler over ComfyUI's sigmas with the
   ControlNet.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import textwrap
from pathlib import Path

import pytest

from comfy_api_format import to_api_prompt
from comfy_server import COMFYUI_DIR, COMFYUI_PYTHON, PROMPT_TIMEOUT_S, ComfyServer, model_folders_moved_away, write_png
from node_fixtures import ROOT, write_model_folders

pytestmark = pytest.mark.skipif(not COMFYUI_DIR, reason="set COMFYUI_DIR (and COMFYUI_PYTHON) to run against a real ComfyUI")

TEST_WIDTH, TEST_HEIGHT = 256, 192


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def model_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("comfy_models")
    write_model_folders(root)
    return root


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_root):
    comfy = ComfyServer(tmp_path_factory.mktemp("comfy_server"), model_root)
    try:
        comfy.wait_ready()
        yield comfy
    finally:
        comfy.stop()


def shrink_for_cpu(prompt: dict) -> tuple[int, int]:
    """Sizes that a CPU runs in seconds (the img2img input image is written at this size too);
    returns the expected output (width, height)."""
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "SanaEmptyLatentImage":
            inputs.update(width=TEST_WIDTH, height=TEST_HEIGHT, resolution_bins="off")
        if node["class_type"] == "SanaDCAEDecode" and inputs["tile_size"] > 0:
            inputs.update(tile_size=128, tile_overlap=32)  # still tiled: 8x6 latents in 4x4 tiles
    return TEST_WIDTH, TEST_HEIGHT


WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


def test_extension_imports_cleanly(server):
    log = server.log_path.read_text()
    assert "IMPORT FAILED" not in "\n".join(l for l in log.splitlines() if "sana" in l.lower())
    info = json.loads(server.get("/object_info"))
    assert {k for k in info if k.startswith("Sana")} >= {"SanaDiTLoader", "SanaKSampler", "SanaDCAELoader", "SanaEmptyLatentImage"}
    assert info["SanaKSampler"]["category"] == "Sana/sampling"


def test_workflows_are_served_as_templates(server):
    """ComfyUI lists workflows/ among this extension's templates and serves each file as it is."""
    templates = json.loads(server.get("/workflow_templates"))
    (folder,) = [name for name, stems in templates.items() if "sana_1600m_1024px_t2i" in stems]
    assert sorted(templates[folder]) == sorted(p.stem for p in WORKFLOWS)  # each once
    for path in WORKFLOWS:
        assert json.loads(server.get(f"/api/workflow_templates/{folder}/{path.name}")) == json.loads(path.read_text())


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_shipped_workflows_run_headless(server, path):
    write_png(server.input / "example.png", TEST_WIDTH, TEST_HEIGHT)  # LoadImage's file in the img2img workflow
    workflow = json.loads(path.read_text())
    object_info = json.loads(server.get("/object_info"))
    prompt = to_api_prompt(workflow, object_info)
    width, height = shrink_for_cpu(prompt)
    answer = server.queue(prompt, workflow)
    assert answer.get("node_errors") == {}, answer
    history = server.wait_history(answer["prompt_id"])
    errors = [m[1] for m in history["status"]["messages"] if m[0] == "execution_error"]
    assert history["status"]["status_str"] == "success", errors or history["status"]
    images = [image for output in history["outputs"].values() for image in output.get("images", [])]
    assert images, history["outputs"]
    for image in images:
        query = f"/view?filename={image['filename']}&subfolder={image['subfolder']}&type={image['type']}"
        assert png_size(server.get(query)) == (width, height)


LOADER_FOLDERS = {"SanaDiTLoader": "diffusion_models", "SanaGemmaLoader": "text_encoders", "SanaDCAELoader": "vae",
                  "SanaControlNetLoader": "controlnet"}


def loader_errors(answer: dict, prompt: dict) -> dict[str, str]:
    """class_type -> the validation details ComfyUI gave for each of our loaders."""
    errors = answer.get("node_errors", {})
    return {
        prompt[node_id]["class_type"]: " | ".join(e["details"] for e in errors.get(node_id, {}).get("errors", []))
        for node_id in prompt if prompt[node_id]["class_type"] in LOADER_FOLDERS
    }


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_every_missing_model_file_is_reported_at_queue_time(server, model_root, path):
    """With no model files, queueing a shipped workflow is refused before anything runs, and the
    answer names every loader's file and the folders searched, all at once."""
    write_png(server.input / "example.png", TEST_WIDTH, TEST_HEIGHT)
    workflow = json.loads(path.read_text())
    prompt = to_api_prompt(workflow, json.loads(server.get("/object_info")))
    history_before = json.loads(server.get("/history"))
    with model_folders_moved_away(model_root):
        status, answer = server.post_prompt(prompt, workflow)
    assert status == 400 and answer["error"]["type"] == "prompt_outputs_failed_validation", answer
    reported = loader_errors(answer, prompt)
    loaders = {node["class_type"] for node in prompt.values()} & set(LOADER_FOLDERS)
    assert set(reported) == loaders and len(loaders) >= 3, reported  # every loader, in one answer
    for class_type, details in reported.items():
        inputs = next(n["inputs"] for n in prompt.values() if n["class_type"] == class_type)
        model_name = next(value for key, value in inputs.items() if key.endswith("_name"))
        assert repr(model_name) in details and "was not found in" in details, details
        assert str(model_root / LOADER_FOLDERS[class_type]) in details, details  # the folders searched
    assert json.loads(server.get("/history")) == history_before  # nothing ran
    assert json.loads(server.get("/queue")) == {"queue_running": [], "queue_pending": []}


def test_empty_model_file_is_reported_at_queue_time(server, model_root):
    """A model file that exists but cannot be used (here empty, as an interrupted download leaves
    it) is refused at queue time too, naming its path."""
    workflow = json.loads((ROOT / "workflows" / "sana_1600m_1024px_t2i.json").read_text())
    prompt = to_api_prompt(workflow, json.loads(server.get("/object_info")))
    empty = model_root / "diffusion_models" / "interrupted.safetensors"
    empty.write_bytes(b"")
    try:
        for node in prompt.values():
            if node["class_type"] == "SanaDiTLoader":
                node["inputs"]["dit_name"] = empty.name
        status, answer = server.post_prompt(prompt, workflow)
    finally:
        empty.unlink()
    assert status == 400, answer
    reported = loader_errors(answer, prompt)
    assert f"{empty} is empty" in reported["SanaDiTLoader"], reported
    assert reported["SanaGemmaLoader"] == reported["SanaDCAELoader"] == "", reported  # the others are fine


PARITY_SCRIPT = textwrap.dedent(
    r'''
    import importlib.util, json, sys
    comfy_dir, root, models = sys.argv[1], sys.argv[2], sys.argv[3]
    sys.argv = [sys.argv[0], "--cpu"]
    sys.path.insert(0, comfy_dir)
    import comfy.options
    comfy.options.enable_args_parsing()
    import torch
    import folder_paths
    for key in ("diffusion_models", "vae", "text_encoders", "controlnet"):
        folder_paths.add_model_folder_path(key, f"{models}/{key}", is_default=True)
    spec = importlib.util.spec_from_file_location("sana_comfy_parity", f"{root}/__init__.py", submodule_search_locations=[root])
    module = importlib.util.module_from_spec(spec); sys.modules[spec.name] = module; spec.loader.exec_module(module)
    from sana_comfy_parity.nodes import comfy_nodes as cn
    from sana_comfy_parity.sana.sampling import sampling_schedule
    from sana_comfy_parity.sana.pipeline import generate
    from sana_comfy_parity.sana.samplers import draw_noise
    from sana_comfy_parity import sana

    H, W, seed, steps = 192, 256, 5, 8
    results = {}
    # A LoRA on every attention and FFN projection, written as the trainer writes it.
    import os
    from sana_comfy_parity.sana.lora import inject_lora, save_lora
    folder_paths.add_model_folder_path("loras", f"{models}/loras", is_default=True)
    os.makedirs(f"{models}/loras", exist_ok=True)
    adapted = sana.load_dit(f"{models}/diffusion_models/Sana_1600M_1024px_BF16.pth", dtype=torch.float32)
    inject_lora(adapted, rank=4, targets=("to_q", "to_k", "to_v", "to_out.0", "conv_inverted", "conv_point"))
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora" in name:
                p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))
    save_lora(adapted, f"{models}/loras/test_lora.safetensors")
    with torch.inference_mode():
        (gemma,) = cn.run_gemma_loader("gemma-2-2b-it", "fp32")
        (vae,) = cn.run_dcae_loader("dc-ae-f32c32-sana-1.1-diffusers", "fp32")
        positive = cn.run_text_encode(gemma, "a red bicycle", "preset", "", 300)[0]
        negative = cn.run_negative_encode(gemma, "", 300)[0]
        latent = cn.run_empty_latent(W, H, 1, "off")[0]
        for name, dit_file, solver, cfg, pag in (("dpm", "Sana_1600M_1024px_BF16.pth", "flow_dpm_solver", 4.5, 0.0),
                                                 ("dpm_pag", "Sana_1600M_1024px_BF16.pth", "flow_dpm_solver", 4.5, 2.0),
                                                 ("euler", "Sana_1600M_1024px_BF16.pth", "flow_euler", 4.5, 0.0),
                                                 ("sprint", "Sana_Sprint_1.6B_1024px.pth", "trigflow", 4.5, 0.0)):
            (model,) = cn.run_dit_loader(dit_file, "fp32", "auto")
            (out,) = cn.run_ksampler(model, positive, negative, latent, seed, 2 if solver == "trigflow" else steps, cfg, 0.0, solver, pag, 1.0)
            (ours,) = cn.run_dcae_decode(out, vae, 0, 256)
            dit = sana.load_dit(f"{models}/diffusion_models/{dit_file}", dtype=torch.float32)
            kwargs = dict(dit=dit, dcae=vae.dcae, text_encoder=gemma.text_encoder, prompt="a red bicycle", height=H, width=W,
                          resolution_binning=False, guidance_scale=cfg, pag_scale=pag, seed=seed)
            if solver == "trigflow":
                reference = generate(steps=2, **kwargs)
            else:
                schedule = sampling_schedule(solver, steps, dit.config.flow_shift)
                noise = draw_noise((1, 32, H // 32, W // 32), torch.Generator().manual_seed(seed))
                reference = generate(steps=steps, solver=solver, latents=schedule.sigmas[0] * noise, **kwargs)
            results[name] = {"max_abs_diff": float((ours - reference).abs().max()), "std": float(ours.std())}
            if name == "dpm":
                results_dpm_image = ours
        # Sana LoRA Loader: ComfyUI's weight patches equal sana.load_lora; the input MODEL is untouched.
        (model,) = cn.run_dit_loader("Sana_1600M_1024px_BF16.pth", "fp32", "auto")
        (lora_model,) = cn.run_lora_loader(model, "test_lora.safetensors", 0.7)
        (out_lora,) = cn.run_ksampler(lora_model, positive, negative, latent, seed, steps, 4.5, 0.0, "flow_dpm_solver", 0.0, 1.0)
        (out_plain,) = cn.run_ksampler(model, positive, negative, latent, seed, steps, 4.5, 0.0, "flow_dpm_solver", 0.0, 1.0)
        dit = sana.lora.load_lora(sana.load_dit(f"{models}/diffusion_models/Sana_1600M_1024px_BF16.pth", dtype=torch.float32),
                                  f"{models}/loras/test_lora.safetensors", 0.7)
        schedule = sampling_schedule("flow_dpm_solver", steps, dit.config.flow_shift)
        noise = draw_noise((1, 32, H // 32, W // 32), torch.Generator().manual_seed(seed))
        reference = generate(dit=dit, dcae=vae.dcae, text_encoder=gemma.text_encoder, prompt="a red bicycle", height=H, width=W,
                             resolution_binning=False, guidance_scale=4.5, seed=seed, steps=steps, solver="flow_dpm_solver",
                             latents=schedule.sigmas[0] * noise)
        ours = cn.run_dcae_decode(out_lora, vae, 0, 256)[0]
        plain = cn.run_dcae_decode(out_plain, vae, 0, 256)[0]
        results["lora"] = {"max_abs_diff": float((ours - reference).abs().max()), "std": float(ours.std()),
                           "changed_by": float((ours - plain).abs().max())}
        results["lora_leaves_input_model"] = {"max_abs_diff": float((plain - results_dpm_image).abs().max()), "std": float(plain.std())}
        # The padded caption is cut to the length computed once per sampling: the DiT never trims (and
        # reads the mask back) by itself during the steps.
        import sana_comfy_parity.sana.dit as dit_module
        trim_per_step = dit_module.trim_padded_context
        def refuse(*args, **kwargs):
            raise AssertionError("the DiT trimmed the caption during a step")
        dit_module.trim_padded_context = refuse
        try:
            (model,) = cn.run_dit_loader("Sana_1600M_1024px_BF16.pth", "fp32", "auto")
            (out_cut,) = cn.run_ksampler(model, positive, negative, latent, seed, steps, 4.5, 0.0, "flow_dpm_solver", 0.0, 1.0)
        finally:
            dit_module.trim_padded_context = trim_per_step
        image_cut = cn.run_dcae_decode(out_cut, vae, 0, 256)[0]
        results["caption_cut_once"] = {"max_abs_diff": float((image_cut - results_dpm_image).abs().max()), "std": float(image_cut.std())}
        # ComfyUI's TorchCompileModel path (the whole diffusion_model), with fullgraph so that a graph break fails.
        from comfy_api.torch_helpers import set_torch_compile_wrapper
        (model,) = cn.run_dit_loader("Sana_1600M_1024px_BF16.pth", "fp32", "auto")
        compiled = model.clone()
        set_torch_compile_wrapper(model=compiled, backend="inductor", fullgraph=True)
        (out_compiled,) = cn.run_ksampler(compiled, positive, negative, latent, seed, steps, 4.5, 0.0, "flow_dpm_solver", 0.0, 1.0)
        image_compiled = cn.run_dcae_decode(out_compiled, vae, 0, 256)[0]
        results["torch_compile_model"] = {"max_abs_diff": float((image_compiled - results_dpm_image).abs().max()),
                                          "std": float(image_compiled.std())}
        # ComfyUI's own VAE Decode / VAE Decode (Tiled) paths on the DC-AE VAE object.
        samples = out["samples"]
        core = vae.decode(samples)
        results["core_vae_decode"] = {"max_abs_diff": float((core - cn.run_dcae_decode(out, vae, 0, 256)[0]).abs().max()), "std": float(core.std())}
        core_tiled = vae.decode_tiled(samples, tile_x=4, tile_y=4, overlap=1)
        ours_tiled = cn.run_dcae_decode(out, vae, 128, 32)[0]
        results["core_vae_decode_tiled"] = {"max_abs_diff": float((core_tiled - ours_tiled).abs().max()), "std": float(core_tiled.std())}

        # The Sana ControlNet through ComfyUI's own Apply ControlNet, the DC-AE as its vae.
        import comfy.samplers
        import nodes as comfy_nodes
        from sana_comfy_parity.sana.pipeline import Control, denoise_flow, encode_prompts
        from sana_comfy_parity.sana.sampling import images_to_latents, latents_to_images
        from sana_comfy_parity.sana.schedules import FlowSchedule
        cn_file = "Sana_1600M_1024px_BF16_ControlNet_HED.pth"
        (control_net,) = cn.run_controlnet_loader(cn_file, "fp32")
        controlnet = sana.load_controlnet(f"{models}/controlnet/{cn_file}", dtype=torch.float32)
        dit = sana.load_dit(f"{models}/diffusion_models/Sana_1600M_1024px_BF16.pth", dtype=torch.float32)
        edges = (torch.rand(1, H, W, 1, generator=torch.Generator().manual_seed(7)) > 0.85).float().expand(-1, -1, -1, 3).contiguous()
        noise = draw_noise((1, 32, H // 32, W // 32), torch.Generator().manual_seed(seed))
        apply = comfy_nodes.ControlNetApplyAdvanced()

        def with_control(solver, scale):
            schedule = sampling_schedule(solver, steps, dit.config.flow_shift)
            return generate(dit=dit, dcae=vae.dcae, text_encoder=gemma.text_encoder, prompt="a red bicycle", height=H, width=W,
                            resolution_binning=False, guidance_scale=4.5, seed=seed, steps=steps, solver=solver,
                            latents=schedule.sigmas[0] * noise, controlnet=controlnet, control_image=edges, control_scale=scale)

        def compare(name, latent_out, reference):
            image = cn.run_dcae_decode(latent_out, vae, 0, 256)[0]
            results[name] = {"max_abs_diff": float((image - reference).abs().max()), "std": float(image.std())}
            return image

        effects = {}
        (model,) = cn.run_dit_loader("Sana_1600M_1024px_BF16.pth", "fp32", "auto")
        pos_c, neg_c = apply.apply_controlnet(positive, negative, control_net, edges, 0.8, 0.0, 1.0, vae=vae)
        for name, solver in (("controlnet_dpm", "flow_dpm_solver"), ("controlnet_euler", "flow_euler")):
            (out_c,) = cn.run_ksampler(model, pos_c, neg_c, latent, seed, steps, 4.5, 0.0, solver, 0.0, 1.0)
            image_c = compare(name, out_c, with_control(solver, 0.8))
            if solver == "flow_dpm_solver":
                effects["control_changes_the_image"] = float((image_c - results_dpm_image).abs().max())
                controlled_image = image_c
        # Chaining: each Apply node wraps the previous one and the residuals add up (0.3 + 0.5 = 0.8).
        pos_1, neg_1 = apply.apply_controlnet(positive, negative, control_net, edges, 0.3, 0.0, 1.0, vae=vae)
        pos_2, neg_2 = apply.apply_controlnet(pos_1, neg_1, control_net, edges, 0.5, 0.0, 1.0, vae=vae)
        (out_chain,) = cn.run_ksampler(model, pos_2, neg_2, latent, seed, steps, 4.5, 0.0, "flow_dpm_solver", 0.0, 1.0)
        compare("controlnet_chained", out_chain, with_control("flow_dpm_solver", 0.8))
        # start/end percent: ComfyUI's own rule (sigma range); a half range lies between none and all.
        pos_h, neg_h = apply.apply_controlnet(positive, negative, control_net, edges, 0.8, 0.0, 0.5, vae=vae)
        (out_half,) = cn.run_ksampler(model, pos_h, neg_h, latent, seed, steps, 4.5, 0.0, "flow_dpm_solver", 0.0, 1.0)
        half = cn.run_dcae_decode(out_half, vae, 0, 256)[0]
        effects["half_range_vs_full"] = float((half - controlled_image).abs().max())
        effects["half_range_vs_none"] = float((half - results_dpm_image).abs().max())
        # ComfyUI's own KSampler (euler, simple) with the ControlNet = sana's Flow-Euler over ComfyUI's sigmas.
        (out_core,) = comfy_nodes.common_ksampler(model, seed, steps, 4.5, "euler", "simple", pos_c, neg_c, latent)
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).float()
        text = encode_prompts(gemma.text_encoder, ["a red bicycle"], copies=1, negative_prompt="", chi=True, device=torch.device("cpu"))
        control = Control(controlnet, images_to_latents(vae.dcae, edges, H, W), 0.8, range(steps))
        final = denoise_flow(dit, text, sigmas[0] * noise, FlowSchedule(sigmas=sigmas, timesteps=sigmas[:-1] * 1000),
                             solver="flow_euler", branches=("uncond", "cond"), guidance_scale=4.5, control=control)
        compare("controlnet_core_ksampler", out_core, latents_to_images(vae.dcae, final, H, W))
    print("PARITY " + json.dumps(results))
    print("EFFECTS " + json.dumps(effects))
    '''
)


def test_ksampler_node_matches_sana_generate(model_root, tmp_path):
    script = tmp_path / "parity.py"
    script.write_text(PARITY_SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([COMFYUI_PYTHON, str(script), COMFYUI_DIR, str(ROOT), str(model_root)], cwd=COMFYUI_DIR,
                         capture_output=True, text=True, timeout=PROMPT_TIMEOUT_S, env=env)
    line = next((l for l in run.stdout.splitlines() if l.startswith("PARITY ")), None)
    assert run.returncode == 0 and line, run.stdout[-3000:] + run.stderr[-5000:]
    results = json.loads(line[len("PARITY "):])
    effects = json.loads(next(l for l in run.stdout.splitlines() if l.startswith("EFFECTS "))[len("EFFECTS "):])
    print(results, effects)
    for name, result in results.items():
        assert result["max_abs_diff"] < 1e-4, (name, result)
        assert result["std"] > 0.01, (name, result)
    assert results["lora"]["changed_by"] > 1e-3, results["lora"]  # the LoRA did something
    assert effects["control_changes_the_image"] > 1e-2, effects  # the ControlNet steers: the parity proves something
    assert effects["half_range_vs_full"] > 1e-3 and effects["half_range_vs_none"] > 1e-3, effects
