"""Declarative definitions of every Sana node: ids, widgets in order, defaults, tooltips, outputs.

This module never imports ComfyUI (nor torch), so CI can pin each node's input order and
validate the shipped workflows against it. Inside ComfyUI, `nodes/comfy_nodes.py` turns each
`NodeSpec` into a V3 `io.Schema`.

Compatibility rule (workflows store widget values by position): once shipped, a node id and
the order of its inputs never change. New inputs are appended at the end, optional, with a
default; `tests/test_nodes_specs.py` pins the current order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

CATEGORY = "Sana"
# The node library ("Add Node" menu) groups the nodes by stage of a SANA graph, as ComfyUI's own
# loaders/conditioning/sampling/latent categories do.
LOADERS_CATEGORY = f"{CATEGORY}/loaders"
CONDITIONING_CATEGORY = f"{CATEGORY}/conditioning"
SAMPLING_CATEGORY = f"{CATEGORY}/sampling"
LATENT_CATEGORY = f"{CATEGORY}/latent"
QUANTIZATION_CATEGORY = f"{CATEGORY}/quantization"

# Widget kinds: inputs of these kinds take a slot in a UI workflow's `widgets_values`.
INT, FLOAT, STRING, BOOLEAN, COMBO = "INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"
WIDGET_KINDS = frozenset({INT, FLOAT, STRING, BOOLEAN, COMBO})

# Socket kinds (links only). SANA_GEMMA is our own type: a loaded Gemma-2 with its tokenizer.
MODEL, CONDITIONING, LATENT, IMAGE, VAE = "MODEL", "CONDITIONING", "LATENT", "IMAGE", "VAE"
SAMPLER, SIGMAS, GEMMA, CONTROL_NET = "SAMPLER", "SIGMAS", "SANA_GEMMA", "CONTROL_NET"

# Dynamic combo sources: the options are the model files/folders found at schema time.
DIT_FILES = "dit_files"  # diffusion_models + checkpoints (files and diffusers folders)
GEMMA_FOLDERS = "gemma_folders"  # text_encoders (Gemma-2 folders and single .safetensors files)
VAE_FILES = "vae_files"  # vae (files and diffusers folders)
LORA_FILES = "lora_files"  # loras
CONTROLNET_FILES = "controlnet_files"  # controlnet (files and diffusers folders)

DTYPE_OPTIONS = ("auto", "bf16", "fp16", "fp32")
SOLVER_OPTIONS = ("flow_dpm_solver", "flow_euler", "trigflow")
CHI_OPTIONS = ("preset", "off", "custom")
RESOLUTION_BIN_OPTIONS = ("off", "512px", "1024px", "2048px", "4096px")
SEED_MAX = 0xFFFFFFFFFFFFFFFF
MAX_RESOLUTION = 16384  # ComfyUI's nodes.MAX_RESOLUTION


@dataclass(frozen=True)
class InputSpec:
    """One node input. `kind` is a widget kind (INT, FLOAT, STRING, BOOLEAN, COMBO) or a socket type."""

    name: str
    kind: str
    tooltip: str
    default: Any = None
    min: float | int | None = None
    max: float | int | None = None
    step: float | int | None = None
    round: float | None = None
    options: tuple[str, ...] | None = None  # static COMBO options
    options_source: str | None = None  # dynamic COMBO options (model listings)
    multiline: bool = False
    dynamic_prompts: bool = False
    control_after_generate: bool = False
    optional: bool = False

    @property
    def is_widget(self) -> bool:
        return self.kind in WIDGET_KINDS


@dataclass(frozen=True)
class OutputSpec:
    kind: str
    name: str
    tooltip: str


@dataclass(frozen=True)
class NodeSpec:
    node_id: str
    display_name: str
    description: str
    inputs: tuple[InputSpec, ...]
    outputs: tuple[OutputSpec, ...]
    category: str
    is_output_node: bool = False
    extra: dict = field(default_factory=dict)

    def input_order(self) -> list[str]:
        """Input names as ComfyUI orders them: required first, then optional, each in spec order."""
        return [i.name for i in self.inputs if not i.optional] + [i.name for i in self.inputs if i.optional]

    def widget_inputs(self) -> list[InputSpec]:
        """The inputs that take a widget slot, in the frontend's widget order."""
        by_name = {i.name: i for i in self.inputs}
        return [by_name[n] for n in self.input_order() if by_name[n].is_widget]


_FP16_RISK = "fp16 risks overflow in SANA's text encoder and DC-AE"
_DCAE_NO_FP16 = "fp16 is not used: the DC-AE overflows in it and decodes black images, so it loads as auto, with a warning"


def _dtype(what: str, fp16_note: str = _FP16_RISK) -> InputSpec:
    return InputSpec(
        "dtype",
        COMBO,
        f"Weight dtype of the {what}. auto: bf16 on GPUs that support it, else fp32 ({fp16_note}).",
        default="auto",
        options=DTYPE_OPTIONS,
    )


def _tile_inputs(direction: str) -> tuple[InputSpec, InputSpec]:
    return (
        InputSpec(
            "tile_size",
            INT,
            f"Tile side in image pixels for the {direction} (a multiple of 32). 0 = automatic: the whole image "
            "when it fits in free memory, else 1024 px tiles (smaller if memory is tight).",
            default=0,
            min=0,
            max=MAX_RESOLUTION,
            step=32,
        ),
        InputSpec(
            "tile_overlap",
            INT,
            "Overlap between neighbouring tiles in image pixels (a multiple of 32, at most half the tile). "
            "Wider overlaps blend seams more smoothly.",
            default=256,
            min=0,
            max=4096,
            step=32,
        ),
    )


_SOLVER_TOOLTIP = (
    "flow_dpm_solver: SANA's Flow-DPM-Solver (DPM-Solver++ 2M on the flow, integer timesteps as diffusers). "
    "flow_euler: the flow-matching Euler sampler. trigflow: SANA-Sprint's few-step sCM sampler (Sprint models only)."
)
_SHIFT_TOOLTIP = "Flow shift of the noise schedule. 0 = auto: the model's trained shift (3.0; 6.0 for the 4K model)."

NODE_SPECS: dict[str, NodeSpec] = {}


def _add(spec: NodeSpec) -> None:
    NODE_SPECS[spec.node_id] = spec


_add(
    NodeSpec(
        "SanaDiTLoader",
        "Sana DiT Loader",
        "Loads a SANA, SANA-1.5 or SANA-Sprint DiT (official .pth/.safetensors, diffusers folder or single file, "
        "ComfyUI-prefixed weights, or a W8A8 int8 file saved by sana.quant.save_w8a8) from models/diffusion_models "
        "or models/checkpoints. The variant is detected from the weights. Works with ComfyUI's KSampler, SamplerCustomAdvanced, LoRA and ModelSampling nodes.",
        inputs=(
            InputSpec(
                "dit_name",
                COMBO,
                "The DiT file or diffusers folder, from models/diffusion_models (or models/checkpoints).",
                options_source=DIT_FILES,
            ),
            _dtype("DiT"),
            InputSpec(
                "variant",
                COMBO,
                "auto: detect the release from the weights. Pick one only to override detection, e.g. "
                "sana-1600m-2k / sana-1600m-4k for a bare diffusers file that cannot tell them from 1K.",
                default="auto",
                options=(
                    "auto",
                    "sana-600m-512",
                    "sana-600m-1024",
                    "sana-1600m-512",
                    "sana-1600m-1024",
                    "sana-1600m-2k",
                    "sana-1600m-4k",
                    "sana1.5-1.6b",
                    "sana1.5-4.8b",
                    "sana-sprint-0.6b",
                    "sana-sprint-1.6b",
                ),
            ),
        ),
        outputs=(OutputSpec(MODEL, "MODEL", "The SANA DiT as a native ComfyUI flow model."),),
        category=LOADERS_CATEGORY,
    )
)

_add(
    NodeSpec(
        "SanaGemmaLoader",
        "Sana Gemma Loader",
        "Loads SANA's text encoder, a Gemma-2 folder (e.g. gemma-2-2b-it, or a diffusers SANA folder with "
        "text_encoder/ and tokenizer/) or the single file Lumina Image 2.0 uses (gemma_2_2b_fp16.safetensors) from "
        "models/text_encoders. Offline only; managed by ComfyUI's memory manager.",
        inputs=(
            InputSpec(
                "gemma_name",
                COMBO,
                "A Gemma-2 folder under models/text_encoders (holding config.json, the weights and the tokenizer), "
                "or a single Gemma-2 .safetensors file carrying its tokenizer (gemma_2_2b_fp16.safetensors).",
                options_source=GEMMA_FOLDERS,
            ),
            _dtype("text encoder"),
        ),
        outputs=(OutputSpec(GEMMA, "gemma", "The Gemma-2 text encoder and tokenizer."),),
        category=LOADERS_CATEGORY,
    )
)

_MAX_TOKENS = InputSpec(
    "max_tokens",
    INT,
    "Prompt tokens kept (SANA was trained with 300; the first token plus the last max_tokens - 1).",
    default=300,
    min=2,
    max=4096,
)

_add(
    NodeSpec(
        "SanaGemmaTextEncode",
        "Sana CHI Text Encode",
        "Encodes the positive prompt with Gemma-2 and SANA's complex human instruction (CHI), as the official "
        "pipelines do. The CONDITIONING carries its own attention mask. Encode negative prompts with "
        "Sana Negative Text Encode, which never adds the CHI.",
        inputs=(
            InputSpec("gemma", GEMMA, "The Gemma-2 text encoder from Sana Gemma Loader."),
            InputSpec("text", STRING, "The prompt.", default="", multiline=True, dynamic_prompts=True),
            InputSpec(
                "chi",
                COMBO,
                "preset: prepend SANA's default complex human instruction (diffusers' text). off: plain encoding. "
                "custom: prepend custom_chi instead.",
                default="preset",
                options=CHI_OPTIONS,
            ),
            InputSpec(
                "custom_chi",
                STRING,
                "The instruction to prepend when chi is 'custom' (ignored otherwise).",
                default="",
                multiline=True,
            ),
            _MAX_TOKENS,
        ),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING", "Prompt embeddings with their attention mask."),),
        category=CONDITIONING_CATEGORY,
    )
)

_add(
    NodeSpec(
        "SanaGemmaNegativeEncode",
        "Sana Negative Text Encode",
        "Encodes a negative (or empty) prompt with Gemma-2 and no CHI, as diffusers' SANA pipelines encode the "
        "negative prompt.",
        inputs=(
            InputSpec("gemma", GEMMA, "The Gemma-2 text encoder from Sana Gemma Loader."),
            InputSpec("text", STRING, "The negative prompt (often empty).", default="", multiline=True, dynamic_prompts=True),
            _MAX_TOKENS,
        ),
        outputs=(OutputSpec(CONDITIONING, "CONDITIONING", "Negative prompt embeddings with their attention mask."),),
        category=CONDITIONING_CATEGORY,
    )
)

_add(
    NodeSpec(
        "SanaDCAELoader",
        "Sana DC-AE Loader",
        "Loads a DC-AE autoencoder (mit-han-lab original .safetensors/.pth or a diffusers AutoencoderDC folder) "
        "from models/vae. The result is a native VAE: ComfyUI's VAE Decode, VAE Encode and VAE Decode (Tiled) work "
        "with it. Also fits the latent-preview colours for this DC-AE.",
        inputs=(
            InputSpec(
                "vae_name",
                COMBO,
                "The DC-AE file or diffusers folder under models/vae (e.g. dc-ae-f32c32-sana-1.1-diffusers).",
                options_source=VAE_FILES,
            ),
            _dtype("DC-AE", _DCAE_NO_FP16),
        ),
        outputs=(OutputSpec(VAE, "VAE", "The DC-AE as a native ComfyUI VAE."),),
        category=LOADERS_CATEGORY,
    )
)

_add(
    NodeSpec(
        "SanaDCAEDecode",
        "Sana DC-AE Decode",
        "Decodes SANA latents to images with the DC-AE. Tiles automatically when the image would not fit in "
        "free memory (4K), or with the tile size you set.",
        inputs=(
            InputSpec("samples", LATENT, "The latents to decode."),
            InputSpec("vae", VAE, "The DC-AE from Sana DC-AE Loader."),
            *_tile_inputs("decode"),
        ),
        outputs=(OutputSpec(IMAGE, "IMAGE", "The decoded images."),),
        category=LATENT_CATEGORY,
    )
)

_add(
    NodeSpec(
        "SanaDCAEEncode",
        "Sana DC-AE Encode",
        "Encodes images to SANA latents with the DC-AE (for image-to-image). Images are centre-cropped to a "
        "multiple of 32 pixels.",
        inputs=(
            InputSpec("pixels", IMAGE, "The images to encode."),
            InputSpec("vae", VAE, "The DC-AE from Sana DC-AE Loader."),
            *_tile_inputs("encode"),
        ),
        outputs=(OutputSpec(LATENT, "LATENT", "The image latents."),),
        category=LATENT_CATEGORY,
    )
)

_add(
    NodeSpec(
        "SanaKSampler",
        "Sana KSampler",
        "Samples a SANA model with Flow-DPM-Solver (or Flow-Euler, or Sprint's TrigFlow), classifier-free guidance "
        "and optional perturbed-attention guidance, the way the official pipelines do. For the same noise it "
        "gives the same latents as sana.generate. Previews, progress and interrupts come from ComfyUI.",
        inputs=(
            InputSpec("model", MODEL, "A SANA model from Sana DiT Loader."),
            InputSpec("positive", CONDITIONING, "The prompt conditioning (Sana CHI Text Encode)."),
            InputSpec("negative", CONDITIONING, "The negative conditioning (Sana Negative Text Encode); unused by trigflow."),
            InputSpec("latent_image", LATENT, "The starting latent: Sana Empty Latent Image, or Sana DC-AE Encode for img2img."),
            InputSpec(
                "seed",
                INT,
                "Seed of the initial noise (drawn on the CPU, as ComfyUI and sana.generate do).",
                default=0,
                min=0,
                max=SEED_MAX,
                control_after_generate=True,
            ),
            InputSpec("steps", INT, "Number of sampling steps (SANA: 20; Sprint: 1-4).", default=20, min=1, max=10000),
            InputSpec(
                "cfg",
                FLOAT,
                "Classifier-free guidance scale (SANA: 4.5; <= 1 means a single conditional pass). For trigflow it is "
                "SANA-Sprint's embedded guidance.",
                default=4.5,
                min=0.0,
                max=100.0,
                step=0.1,
                round=0.01,
            ),
            InputSpec("flow_shift", FLOAT, _SHIFT_TOOLTIP, default=0.0, min=0.0, max=100.0, step=0.01),
            InputSpec("solver", COMBO, _SOLVER_TOOLTIP, default="flow_dpm_solver", options=SOLVER_OPTIONS),
            InputSpec(
                "pag_scale",
                FLOAT,
                "Perturbed-attention guidance scale (0 = off; SANA's PAG pipelines use about 2-3). Adds one extra "
                "model pass per step, with identity self-attention in NVlabs' PAG block (8 of 20, 14 of 28).",
                default=0.0,
                min=0.0,
                max=20.0,
                step=0.1,
                round=0.01,
            ),
            InputSpec(
                "denoise",
                FLOAT,
                "Denoising strength: 1.0 for text-to-image; lower keeps more of the input latent (img2img keeps the "
                "last round(steps*denoise) steps, diffusers' rule).",
                default=1.0,
                min=0.01,
                max=1.0,
                step=0.01,
            ),
        ),
        outputs=(OutputSpec(LATENT, "LATENT", "The denoised latents."),),
        category=SAMPLING_CATEGORY,
    )
)

_add(
    NodeSpec(
        "SanaSampler",
        "Sana Sampler",
        "A SAMPLER for SamplerCustom / SamplerCustomAdvanced: Flow-DPM-Solver, Flow-Euler, or SANA-Sprint's "
        "TrigFlow (which re-noises every step from the noise seed). Pair it with Sana Sigmas of the same solver.",
        inputs=(InputSpec("solver", COMBO, _SOLVER_TOOLTIP, default="flow_dpm_solver", options=SOLVER_OPTIONS),),
        outputs=(OutputSpec(SAMPLER, "SAMPLER", "The sampler."),),
        category=SAMPLING_CATEGORY,
    )
)

_add(
    NodeSpec(
        "SanaSigmas",
        "Sana Sigmas",
        "The noise schedule SANA's pipelines use: Flow-DPM-Solver's or Flow-Euler's shifted flow sigmas, or "
        "SANA-Sprint's TrigFlow steps as flow times. For SamplerCustom / SamplerCustomAdvanced.",
        inputs=(
            InputSpec("model", MODEL, "The SANA model (its trained flow shift is the auto shift)."),
            InputSpec("solver", COMBO, "The solver this schedule is for. " + _SOLVER_TOOLTIP, default="flow_dpm_solver", options=SOLVER_OPTIONS),
            InputSpec("steps", INT, "Number of sampling steps (SANA: 20; Sprint: 2).", default=20, min=1, max=10000),
            InputSpec("flow_shift", FLOAT, _SHIFT_TOOLTIP + " Ignored by trigflow.", default=0.0, min=0.0, max=100.0, step=0.01),
            InputSpec(
                "denoise",
                FLOAT,
                "Denoising strength: 1.0 for text-to-image; lower keeps the last round(steps*denoise) steps.",
                default=1.0,
                min=0.01,
                max=1.0,
                step=0.01,
            ),
        ),
        outputs=(OutputSpec(SIGMAS, "SIGMAS", "The sigmas, descending to 0."),),
        category=SAMPLING_CATEGORY,
    )
)

_add(
    NodeSpec(
        "SanaEmptyLatentImage",
        "Sana Empty Latent Image",
        "An empty 32-channel SANA latent (1/32 of the image size). With resolution bins on, the size snaps to "
        "the nearest trained aspect-ratio bin of that resolution (height and width kept the right way round).",
        inputs=(
            InputSpec("width", INT, "Image width in pixels (a multiple of 32).", default=1024, min=32, max=MAX_RESOLUTION, step=32),
            InputSpec("height", INT, "Image height in pixels (a multiple of 32).", default=1024, min=32, max=MAX_RESOLUTION, step=32),
            InputSpec("batch_size", INT, "Number of latents in the batch.", default=1, min=1, max=4096),
            InputSpec(
                "resolution_bins",
                COMBO,
                "Snap to the nearest aspect-ratio bin of the model's training resolution (512px, 1024px, 2048px, "
                "4096px), or off to use width and height as given.",
                default="1024px",
                options=RESOLUTION_BIN_OPTIONS,
            ),
        ),
        outputs=(
            OutputSpec(LATENT, "LATENT", "The empty latent."),
            OutputSpec(INT, "width", "The image width used (after snapping)."),
            OutputSpec(INT, "height", "The image height used (after snapping)."),
        ),
        category=LATENT_CATEGORY,
    )
)

_add(
    NodeSpec(
        "SanaW8A8Quantize",
        "Sana W8A8",
        "Quantizes a SANA DiT to W8A8 as the SANA paper does: int8 weights per output channel and int8 activations "
        "per token for the blocks' linear and 1x1-conv layers (Triton int8 GEMMs on CUDA), with norms, linear "
        "attention, embedders and the final layer kept in high precision and the cross-attention K/V projection "
        "on float activations. Halves the blocks' weight memory. The input MODEL is left unchanged. Apply LoRAs to "
        "the float model and save merged weights first: a MODEL with weight patches is refused.",
        inputs=(InputSpec("model", MODEL, "A SANA model from Sana DiT Loader (float weights)."),),
        outputs=(OutputSpec(MODEL, "MODEL", "The W8A8 SANA model."),),
        category=QUANTIZATION_CATEGORY,
    )
)

__all__ = ["CATEGORY", "InputSpec", "NODE_SPECS", "NodeSpec", "OutputSpec", "WIDGET_KINDS"]


_add(
    NodeSpec(
        "SanaLoRALoader",
        "Sana LoRA Loader",
        "Applies a SANA LoRA in the diffusers/PEFT key layout (what `python -m trainer dit --lora-rank` and "
        "diffusers' SANA LoRA trainer write) to a SANA MODEL, through ComfyUI's own weight patches: the input "
        "model is left unchanged and the strength can be changed without reloading.",
        inputs=(
            InputSpec("model", MODEL, "A SANA model from Sana DiT Loader."),
            InputSpec("lora_name", COMBO, "The LoRA file under models/loras.", options_source=LORA_FILES),
            InputSpec(
                "strength",
                FLOAT,
                "How strongly the LoRA applies (1.0 = as trained; negative values subtract it).",
                default=1.0,
                min=-10.0,
                max=10.0,
                step=0.01,
            ),
        ),
        outputs=(OutputSpec(MODEL, "MODEL", "The model with the LoRA applied."),),
        category=LOADERS_CATEGORY,
    )
)

_add(
    NodeSpec(
        "SanaControlNetLoader",
        "Sana ControlNet Loader",
        "Loads a SANA ControlNet from models/controlnet: NVlabs' release as downloaded (e.g. "
        "Sana_1600M_1024px_BF16_ControlNet_HED.pth, trained on HED edge maps) or a diffusers SanaControlNetModel "
        "folder or file. Connect it to ComfyUI's Apply ControlNet with the Sana DC-AE as its vae (the control image "
        "goes through the DC-AE); strength, start/end percent and chaining several ControlNets work as for any model. "
        "For a SANA MODEL from Sana DiT Loader of the same family (600M or 1600M), with Sana KSampler or ComfyUI's samplers.",
        inputs=(
            InputSpec(
                "controlnet_name",
                COMBO,
                "The ControlNet file or diffusers folder under models/controlnet.",
                options_source=CONTROLNET_FILES,
            ),
            _dtype("ControlNet"),
        ),
        outputs=(OutputSpec(CONTROL_NET, "CONTROL_NET", "The ControlNet, for ComfyUI's Apply ControlNet nodes."),),
        category=LOADERS_CATEGORY,
    )
)
