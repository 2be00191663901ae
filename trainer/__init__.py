"""Headless training (`python -m trainer`) built on `sana/`, never on `nodes/`.

Modules, from the data to the commands:
- `shapes`: the procedurally drawn "shapes world" (scenes, captions, held-out split, edge maps) and
  its deterministic evaluator (colour, shape, position, count read back from pixels).
- `data`: image folders / JSONL manifests, aspect-ratio buckets (small ones merged), image
  loading bounded by the bin, deterministic bucketed batches with repeats.
- `cache`: the latent / text-embedding cache, encoded on the accelerator, incremental, refused
  when what it was built from changed; `LatentCache` reads it.
- `dit_config`, `dit_step`, `dit_checkpoint`, `dit_resume`, `train_dit`: flow-matching DiT
  training (full or LoRA): options and their checks, one step, what is saved, where a run
  starts, the loop; DDP/FSDP under torchrun. `optimizers` (AdamW, 8-bit AdamW, CAME, stochastic
  rounding for bf16 weights), `reporting` (loss.jsonl, TensorBoard, W&B), `sampling` (grids).
- `controlnet_config`, `train_controlnet`: a ControlNet trained on a frozen DiT by `train_dit`'s
  loop (a `Trainee` says what differs); `controlnet_demo`: one trained for the shipped model on
  shapes-world edge maps and scored with vs without control (`python -m trainer controlnet-demo`).
- `memory_plan`: the modelled peak memory of a training step, for each memory option.
- `train_dcae`: reconstruction training for small DC-AEs.
- `preset` (builds the embedded default model, `python -m trainer --preset shapes-tiny`),
  `shapes_model` (it as one object; `demo`), `evaluate` (prompt adherence), `pack` (the compact
  copy shipped in `assets/shapes-tiny`).
- `tiny_models`, `plotting`, `options`, `distributed` (devices, threads, torch.distributed),
  `run_folder`: the supporting pieces.
"""
