"""The Sana V3 nodes (imported only inside ComfyUI).

Each node's schema is generated from its `NodeSpec` (nodes/specs.py, the single source of ids,
widget order, defaults and tooltips); each `run_*` function below adds ComfyUI's services
(model folders, devices, memory management, progress, previews) around the comfy-free module
of its concern: `loaders`, `text`, `vae`, `sampling`, `latents`, `previews`, `lora`; the loaders'
`validate_*` functions report unusable model files when a prompt is queued.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

import comfy.lora
import comfy.model_management as model_management
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import latent_preview
import node_helpers
from comfy_api.latest import io

from ..sana.checkpoint import open_checkpoint
from ..sana.dcae_io import load_dcae
from ..sana.errors import SanaCheckpointError, SanaInputError
from ..sana.kernels import set_cache_dir
from ..sana.samplers import uses_cfg, uses_pag
from ..sana.sampling import FLOW_DPM_SOLVER, TRIGFLOW, sampling_schedule, select_solver
from ..sana.text_encoder import load_text_encoder
from . import specs
from .comfy_holders import ManagedModule, SanaGemma
from .comfy_controlnet import load_sana_controlnet
from .comfy_model import auto_dtype, load_sana_model, sana_dit, w8a8_model, with_pag
from .comfy_vae import SanaDCAEVAE
from .latents import empty_latent
from .loaders import DTYPES, dcae_dtype, has_config, is_gemma_folder, list_model_entries, resolve_model_entry
from .lora import lora_alpha_entries, lora_patch_keys
from .previews import fit_latent_rgb_factors, preview_fit_images, register_preview_factors
from .sampling import check_sampler_inputs, sampler_function
from .text import chi_argument, encode_conditioning
from .vae import decode_latents, encode_images

# The kernel dispatcher keeps its per-GPU timing choices with the user's ComfyUI data.
set_cache_dir(Path(folder_paths.get_user_directory()) / "sana-comfy")

# --------------------------------------------------------------------------------------------
# Model folders

# The ComfyUI folder keys each loader searches, in order.
DIT_FOLDER_KEYS = ("diffusion_models", "checkpoints")
GEMMA_FOLDER_KEYS = ("text_encoders",)
VAE_FOLDER_KEYS = ("vae",)
LORA_FOLDER_KEYS = ("loras",)
CONTROLNET_FOLDER_KEYS = ("controlnet",)


def _roots(*keys: str) -> list[str]:
    roots: list[str] = []
    for key in keys:
        try:
            roots += folder_paths.get_folder_paths(key)
        except KeyError:
            pass
    return roots


def _dit_is_folder(path: Path) -> bool:
    return has_config(path, "transformer")


def _vae_is_folder(path: Path) -> bool:
    return has_config(path, "vae")


def _controlnet_is_folder(path: Path) -> bool:
    return has_config(path, "controlnet")


DYNAMIC_OPTIONS: dict[str, Callable[[], list[str]]] = {
    specs.DIT_FILES: lambda: list_model_entries(
        _roots(*DIT_FOLDER_KEYS), folder_paths.supported_pt_extensions, _dit_is_folder
    ),
    # Folders, and the single-file Gemma-2 ComfyUI users keep for Lumina (gemma_2_2b_fp16.safetensors).
    specs.GEMMA_FOLDERS: lambda: list_model_entries(_roots(*GEMMA_FOLDER_KEYS), (".safetensors",), is_gemma_folder),
    specs.VAE_FILES: lambda: list_model_entries(_roots(*VAE_FOLDER_KEYS), folder_paths.supported_pt_extensions, _vae_is_folder),
    specs.LORA_FILES: lambda: folder_paths.get_filename_list("loras"),
    specs.CONTROLNET_FILES: lambda: list_model_entries(
        _roots(*CONTROLNET_FOLDER_KEYS), folder_paths.supported_pt_extensions, _controlnet_is_folder
    ),
}


# --------------------------------------------------------------------------------------------
# Schemas from specs

GEMMA_TYPE = io.Custom(specs.GEMMA)
SOCKET_TYPES = {
    specs.MODEL: io.Model,
    specs.CONDITIONING: io.Conditioning,
    specs.LATENT: io.Latent,
    specs.IMAGE: io.Image,
    specs.VAE: io.Vae,
    specs.SAMPLER: io.Sampler,
    specs.SIGMAS: io.Sigmas,
    specs.GEMMA: GEMMA_TYPE,
    specs.INT: io.Int,
    specs.CONTROL_NET: io.ControlNet,
}


def schema_input(spec: specs.InputSpec):
    common: dict[str, Any] = {"tooltip": spec.tooltip, "optional": spec.optional}
    if spec.kind == specs.INT:
        return io.Int.Input(spec.name, default=spec.default, min=spec.min, max=spec.max, step=spec.step,
                            control_after_generate=spec.control_after_generate or None, **common)
    if spec.kind == specs.FLOAT:
        return io.Float.Input(spec.name, default=spec.default, min=spec.min, max=spec.max, step=spec.step,
                              round=spec.round, **common)
    if spec.kind == specs.STRING:
        return io.String.Input(spec.name, default=spec.default, multiline=spec.multiline,
                               dynamic_prompts=spec.dynamic_prompts or None, **common)
    if spec.kind == specs.BOOLEAN:
        return io.Boolean.Input(spec.name, default=spec.default, **common)
    if spec.kind == specs.COMBO:
        options = list(spec.options) if spec.options is not None else DYNAMIC_OPTIONS[spec.options_source]()
        default = spec.default if spec.default in options else None
        return io.Combo.Input(spec.name, options=options, default=default, **common)
    return SOCKET_TYPES[spec.kind].Input(spec.name, **common)


def schema_for(spec: specs.NodeSpec) -> io.Schema:
    return io.Schema(
        node_id=spec.node_id,
        display_name=spec.display_name,
        category=spec.category,
        description=spec.description,
        inputs=[schema_input(i) for i in spec.inputs],
        outputs=[SOCKET_TYPES[o.kind].Output(display_name=o.name, tooltip=o.tooltip) for o in spec.outputs],
        is_output_node=spec.is_output_node,
    )


# --------------------------------------------------------------------------------------------
# Node behaviour


def run_dit_loader(dit_name: str, dtype: str, variant: str):
    path = resolve_model_entry(_roots(*DIT_FOLDER_KEYS), dit_name)
    return (load_sana_model(path, DTYPES[dtype], None if variant == "auto" else variant),)


def run_gemma_loader(gemma_name: str, dtype: str):
    path = resolve_model_entry(_roots(*GEMMA_FOLDER_KEYS), gemma_name)
    load_device = model_management.text_encoder_device()
    offload_device = model_management.text_encoder_offload_device()
    weight_dtype = auto_dtype(DTYPES[dtype], load_device)
    text_encoder = load_text_encoder(path, dtype=weight_dtype, device=offload_device)
    holder = ManagedModule(text_encoder.model, offload_device)
    patcher = comfy.model_patcher.ModelPatcher(holder, load_device=load_device, offload_device=offload_device)
    return (SanaGemma(text_encoder, patcher),)


def _encode(gemma: SanaGemma, text: str, chi, max_tokens: int):
    if not isinstance(gemma, SanaGemma):
        raise SanaInputError("the gemma input must come from 'Sana Gemma Loader'")
    model_management.load_models_gpu([gemma.patcher])
    return (encode_conditioning(gemma.text_encoder, text, chi=chi, max_tokens=max_tokens),)


def run_text_encode(gemma, text: str, chi: str, custom_chi: str, max_tokens: int):
    return _encode(gemma, text, chi_argument(chi, custom_chi), max_tokens)


def run_negative_encode(gemma, text: str, max_tokens: int):
    return _encode(gemma, text, False, max_tokens)


def run_dcae_loader(vae_name: str, dtype: str):
    path = resolve_model_entry(_roots(*VAE_FOLDER_KEYS), vae_name)
    device = model_management.vae_device()
    weight_dtype = dcae_dtype(dtype, model_management.vae_dtype(device, [torch.bfloat16, torch.float32]), device)
    dcae = load_dcae(path, dtype=weight_dtype, device=model_management.vae_offload_device())
    vae = SanaDCAEVAE(dcae, weight_dtype)
    try:
        images = preview_fit_images(dcae.spatial_compression)
        vae.load(images.shape, "encode")
        factors, bias = fit_latent_rgb_factors(vae.dcae, images)
        register_preview_factors(dcae.latent_channels, factors, bias)
    except Exception as error:  # previews are a convenience: never fail the load over them
        logging.warning("Sana: could not fit latent preview colours for %s: %s", vae_name, error)
    return (vae,)


def _progress(total_hint: int = 1):
    bar = comfy.utils.ProgressBar(total_hint)
    # update_absolute also checks for interrupts (ComfyUI's global progress hook).
    return lambda done, total: bar.update_absolute(done, total)


def run_dcae_decode(samples: dict, vae, tile_size: int, tile_overlap: int):
    latents = samples["samples"]
    if not isinstance(vae, SanaDCAEVAE):  # another VAE: behave like ComfyUI's own decode nodes
        if tile_size > 0:
            f = vae.spacial_compression_decode()
            return (vae.decode_tiled(latents, tile_x=tile_size // f, tile_y=tile_size // f, overlap=tile_overlap // f),)
        return (vae.decode(latents),)
    vae.load(latents.shape, "decode")
    images = decode_latents(vae.dcae, latents, tile_size, tile_overlap, _progress())
    return (images.to(model_management.intermediate_device()),)


def run_dcae_encode(pixels: torch.Tensor, vae, tile_size: int, tile_overlap: int):
    if not isinstance(vae, SanaDCAEVAE):
        return ({"samples": vae.encode(pixels[:, :, :, :3])},)
    vae.load(tuple(pixels.movedim(-1, 1).shape), "encode")
    latents = encode_images(vae.dcae, pixels, tile_size, tile_overlap, _progress())
    return ({"samples": latents.to(model_management.intermediate_device())},)


def _shift(model, flow_shift: float) -> float:
    """The flow shift: the widget's value, or (0 = auto) the MODEL's own shift, which is the
    variant's trained shift unless a ModelSamplingSD3-style node changed it upstream."""
    if flow_shift > 0:
        return float(flow_shift)
    return float(model.get_model_object("model_sampling").shift)


def run_ksampler(model, positive, negative, latent_image: dict, seed: int, steps: int, cfg: float,
                 flow_shift: float, solver: str, pag_scale: float, denoise: float):
    check_sampler_inputs(seed=seed, steps=steps, cfg=cfg, flow_shift=flow_shift, pag_scale=pag_scale, denoise=denoise)
    dit = sana_dit(model)
    solver = select_solver(dit, solver)
    schedule = sampling_schedule(solver, steps, _shift(model, flow_shift), denoise)
    sampler = comfy.samplers.KSAMPLER(
        sampler_function(solver, schedule.timesteps if solver == FLOW_DPM_SOLVER else None)
    )
    if solver == TRIGFLOW:
        if uses_pag(pag_scale):
            raise SanaInputError("PAG needs a flow solver; SANA-Sprint's trigflow sampler has none (set pag_scale to 0)")
        # Sprint: cfg is the embedded guidance, one conditional pass per step.
        positive = node_helpers.conditioning_set_values(positive, {"guidance": float(cfg)})
        negative, cfg = positive, 1.0
    elif not uses_cfg(cfg):
        cfg = 1.0  # SANA's rule: guidance <= 1 is one conditional pass, never extrapolation
    if uses_pag(pag_scale):
        model = with_pag(model, pag_scale)
    latent = comfy.sample.fix_empty_latent_channels(model, latent_image["samples"])
    noise = comfy.sample.prepare_noise(latent, seed, latent_image.get("batch_index"))
    x0_output: dict = {}
    callback = latent_preview.prepare_callback(model, schedule.num_steps, x0_output)
    samples = comfy.sample.sample_custom(
        model, noise, cfg, sampler, schedule.sigmas, positive, negative, latent,
        noise_mask=latent_image.get("noise_mask"), callback=callback,
        disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed,
    )
    out = latent_image.copy()
    out["samples"] = samples
    return (out,)


def run_sampler(solver: str):
    return (comfy.samplers.KSAMPLER(sampler_function(solver)),)


def run_sigmas(model, solver: str, steps: int, flow_shift: float, denoise: float):
    check_sampler_inputs(steps=steps, flow_shift=flow_shift, denoise=denoise)
    solver = select_solver(sana_dit(model), solver)
    return (sampling_schedule(solver, steps, _shift(model, flow_shift), denoise).sigmas,)


def run_empty_latent(width: int, height: int, batch_size: int, resolution_bins: str):
    latent, width, height = empty_latent(
        width, height, batch_size, resolution_bins, device=model_management.intermediate_device()
    )
    return ({"samples": latent}, width, height)


def run_lora_loader(model, lora_name: str, strength: float):
    path = folder_paths.get_full_path_or_raise("loras", lora_name)
    dit = sana_dit(model)
    anchor = dit.x_embedder.proj.weight
    weight_prefix = next(n for n, p in model.model.named_parameters() if p is anchor)[: -len("x_embedder.proj.weight")]
    key_map = lora_patch_keys(dit, weight_prefix)
    lora_state = comfy.utils.load_torch_file(path, safe_load=True)
    lora_state.update(lora_alpha_entries(lora_state, open_checkpoint(path).metadata))
    patches = comfy.lora.load_lora(lora_state, key_map)
    if not patches:
        raise SanaCheckpointError(f"{lora_name}: no SANA LoRA weights found (expected keys like transformer.transformer_blocks.0.attn1.to_q.lora_A.weight)")
    patched = model.clone()
    applied = patched.add_patches(patches, strength)
    if len(applied) != len(patches):
        logging.warning("Sana LoRA Loader: %d of %d LoRA modules matched no weight", len(patches) - len(applied), len(patches))
    return (patched,)


def run_w8a8_quantize(model):
    return (w8a8_model(model),)


def run_controlnet_loader(controlnet_name: str, dtype: str):
    path = resolve_model_entry(_roots(*CONTROLNET_FOLDER_KEYS), controlnet_name)
    return (load_sana_controlnet(path, DTYPES[dtype]),)


# --------------------------------------------------------------------------------------------
# Validation before anything runs
#
# ComfyUI validates every node of a queued prompt before it runs any, and answers with all the
# failures at once (`node_errors`). It does not check a V3 combo's value against its options,
# so without these checks a missing model file surfaces only when its loader runs: one file per
# run. Each check is a classmethod named `validate_inputs` whose parameters name the inputs it
# takes (ComfyUI passes only those and keeps its own checks of the others; a linked input comes
# as None); it returns True or the reason, which ComfyUI shows on the node.


def model_entry_problem(keys: tuple[str, ...], name: str, is_model_folder: Callable[[Path], bool], folder_kind: str) -> str | None:
    """Why model entry `name` cannot be loaded from the folders of `keys` (missing, with the folders
    searched; unreadable; empty; a folder that is not a `folder_kind`), or None."""
    try:
        path = resolve_model_entry(_roots(*keys), name)
    except (SanaCheckpointError, SanaInputError) as error:
        return str(error)
    if path.is_dir():
        if not os.access(path, os.R_OK | os.X_OK):
            return f"{path} cannot be read (permission denied)"
        if not is_model_folder(path):
            return f"{path} is not a {folder_kind}"
        return None
    try:
        with open(path, "rb") as file:
            if not file.read(1):
                return f"{path} is empty (an interrupted download?)"
    except OSError as error:
        return f"{path} cannot be read: {error.strerror or error}"
    return None


def _verdict(problem: str | None) -> bool | str:
    return True if problem is None else problem


def validate_dit_loader(cls, dit_name: str | None = None) -> bool | str:
    if dit_name is None:
        return True
    return _verdict(model_entry_problem(DIT_FOLDER_KEYS, dit_name, _dit_is_folder,
                                        "diffusers DiT folder (no config.json, nor transformer/config.json)"))


def validate_gemma_loader(cls, gemma_name: str | None = None) -> bool | str:
    if gemma_name is None:
        return True
    return _verdict(model_entry_problem(GEMMA_FOLDER_KEYS, gemma_name, is_gemma_folder,
                                        "Gemma-2 folder (no config.json with model_type gemma2, nor text_encoder/config.json)"))


def validate_dcae_loader(cls, vae_name: str | None = None) -> bool | str:
    if vae_name is None:
        return True
    return _verdict(model_entry_problem(VAE_FOLDER_KEYS, vae_name, _vae_is_folder,
                                        "diffusers DC-AE folder (no config.json, nor vae/config.json)"))


def validate_lora_loader(cls, lora_name: str | None = None) -> bool | str:
    if lora_name is None:
        return True
    return _verdict(model_entry_problem(LORA_FOLDER_KEYS, lora_name, lambda path: False, "LoRA file"))


def validate_controlnet_loader(cls, controlnet_name: str | None = None) -> bool | str:
    if controlnet_name is None:
        return True
    return _verdict(model_entry_problem(CONTROLNET_FOLDER_KEYS, controlnet_name, _controlnet_is_folder,
                                        "diffusers ControlNet folder (no config.json, nor controlnet/config.json)"))


VALIDATORS: dict[str, Callable[..., bool | str]] = {
    "SanaDiTLoader": validate_dit_loader,
    "SanaGemmaLoader": validate_gemma_loader,
    "SanaDCAELoader": validate_dcae_loader,
    "SanaLoRALoader": validate_lora_loader,
    "SanaControlNetLoader": validate_controlnet_loader,
}


RUNNERS: dict[str, Callable[..., tuple]] = {
    "SanaDiTLoader": run_dit_loader,
    "SanaGemmaLoader": run_gemma_loader,
    "SanaGemmaTextEncode": run_text_encode,
    "SanaGemmaNegativeEncode": run_negative_encode,
    "SanaDCAELoader": run_dcae_loader,
    "SanaDCAEDecode": run_dcae_decode,
    "SanaDCAEEncode": run_dcae_encode,
    "SanaKSampler": run_ksampler,
    "SanaSampler": run_sampler,
    "SanaSigmas": run_sigmas,
    "SanaEmptyLatentImage": run_empty_latent,
    "SanaLoRALoader": run_lora_loader,
    "SanaW8A8Quantize": run_w8a8_quantize,
    "SanaControlNetLoader": run_controlnet_loader,
}


def make_node(spec: specs.NodeSpec, run: Callable[..., tuple],
              validate: Callable[..., bool | str] | None = None) -> type[io.ComfyNode]:
    """A V3 node class whose schema comes from `spec`, whose execute calls `run` and, if given,
    whose `validate_inputs` is `validate`."""

    class SanaNode(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> io.Schema:
            return schema_for(spec)

        @classmethod
        def execute(cls, **inputs) -> io.NodeOutput:
            return io.NodeOutput(*run(**inputs))

    if validate is not None:
        SanaNode.validate_inputs = classmethod(validate)
    SanaNode.__name__ = SanaNode.__qualname__ = spec.node_id
    return SanaNode


NODE_CLASSES: list[type[io.ComfyNode]] = [
    make_node(spec, RUNNERS[node_id], VALIDATORS.get(node_id)) for node_id, spec in specs.NODE_SPECS.items()
]
