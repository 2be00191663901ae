"""Headless training (`python -m trainer`) built on `sana/`, never on `nodes/`.

Modules:
- `shapes`: the procedurally drawn "shapes world" (scenes, captions, held-out split) and its
  deterministic evaluator (colour, shape, position, count read back from pixels).
- `data`: image folders / JSONL manifests, aspect-ratio buckets, the resumable safetensors
  cache of DC-AE latents and text embeddings, deterministic bucketed batches.
- `train_dit`: flow-matching DiT training (full or LoRA), AdamW/CAME, warm-up, clipping, EMA,
  autocast, checkpointing, accumulation, exact resume; DDP/FSDP under torchrun.
- `train_dcae`: reconstruction training for small DC-AEs.
- `preset`: the embedded default model (`python -m trainer --preset shapes-tiny`; shipped packed in
  `assets/shapes-tiny`), `demo` and `evaluate` (both through `sana.generate`), `pack`.
- `tiny_models`, `sampling`, `plotting`, `options`, `distributed`: the supporting pieces.
"""
