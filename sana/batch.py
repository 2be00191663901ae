"""Batch mode of `python -m sana generate`: a prompts file to a folder of PNGs, on one process or
many (`torchrun`), resumable, every image with its generation record.

    python -m sana generate --dit ... --vae ... --text-encoder ... --prompts prompts.jsonl --out-dir out/
    torchrun --nproc_per_node 8 -m sana generate ... --prompts prompts.jsonl --out-dir out/ --batch-size 8

The prompts file (`read_items`) is plain text, one prompt a line, or JSONL: one object a line
with `prompt` and any of `ITEM_KEYS` (`negative_prompt`, `seed`, `width`, `height`, `steps`,
`cfg`, `shift`, `pag`, `solver`, `control_image`, `control_scale`, `control_start`,
`control_end`, and `meta`, any JSON carried into the index untouched); a key left out or null
takes the command line's value. With a ControlNet (`--controlnet`) every item needs a control
image, its own (a path relative to the prompts file's folder) or `--control-image`
(`check_control_inputs`); items are then batched with control images of one size. Blank lines are skipped; an item's number is
its place among the items, from 0, and names its output `DIR/000012.png`. Every line is checked
before any model loads, and all bad lines are reported at once (file and line numbers).

How a run goes (`run`):
1. Every rank reads the file and joins the world `torchrun` describes (`join_world`; a plain
   process is a world of one). Rank 0 hashes the model files (`sana.provenance`) while the
   others load the models; then rank 0 loads them too.
2. Each item's request is resolved against the models (`resolve_request`): the `generate`
   keyword arguments that make it, with every default filled in. An item's seed is its own, or
   `--seed` + its number (mod 2^64): it depends on the item alone.
3. Rank 0 looks at the outputs already there (`scan_outputs`): a complete PNG whose record is
   this item's request with these model hashes is done and skipped (writes are atomic, so a
   file that exists is whole; a killed run leaves at most a hidden temporary, never a partial
   PNG); any other file at that name is not overwritten and its item fails, naming it.
4. The items left are grouped by everything but prompt and seed (one batch shares size, steps,
   guidance, negative prompt...), cut into batches of `--batch-size`, and batch j goes to rank
   j mod world size. The batches do not depend on the world size, so every world size writes
   the same images: bit-identical on the same machine and thread count. Each batch is one
   `generate` call with one seed per image (`generate(seed=[...])`), and image i is the image
   its seed gives its prompt alone, up to the rounding another batch shape brings (the tests
   state the tolerance). A batch that raises a `SanaError` or runs out of memory is run again
   item by item, so a failed item (bad size for the model, non-finite output, a write that
   cannot be done) is recorded alone and the run goes on.
5. Rank 0 shows one progress bar over the whole run (done, skipped and failed items of every
   rank, counted on the launcher's store, and images/s), writes `DIR/index.jsonl` (one line
   per item in item order: item, line, file, status, prompt, seed, error, meta) and prints the
   summary. The exit status is 1 when any item failed, else 0.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from .checkpoint import write_bytes
from .controlnet import SanaControlNet
from .controlnet_io import load_controlnet
from .dcae_io import load_dcae
from .dit import SanaDiT
from .dit_io import load_dit
from .errors import SanaCheckpointError, SanaError, SanaInputError
from .pipeline import SEED_LIMIT, ProgressCallback, check_sampling_values, generate, native_size
from .png import encode_png, read_image
from .provenance import describe_models, file_sha256, make_record, png_text, read_record, same_generation
from .sampling import SOLVERS, TRIGFLOW, Autoencoder, default_pag_layers, select_solver
from .text_encoder import TextEncoder, load_text_encoder

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
# JSONL keys -> the `generate` argument each overrides ("prompt" and "meta" are the item's own).
ITEM_KEYS = {
    "prompt": "prompt", "negative_prompt": "negative_prompt", "seed": "seed", "width": "width", "height": "height",
    "steps": "steps", "cfg": "guidance_scale", "shift": "flow_shift", "pag": "pag_scale", "solver": "solver",
    "control_scale": "control_scale", "control_start": "control_start", "control_end": "control_end",
    "meta": None, "control_image": None,
}
# The item keys that steer a ControlNet: a run without --controlnet refuses them.
CONTROL_KEYS = ("control_image", "control_scale", "control_start", "control_end")
DEFAULT_FLOW_STEPS = 20  # diffusers' SanaPipeline default
DEFAULT_SPRINT_STEPS = 2  # diffusers' SanaSprintPipeline default
INDEX_NAME = "index.jsonl"
MAX_REPORTED_LINES = 10  # bad lines described in full; the rest are listed by number
_OUT_OF_MEMORY = tuple({getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError})


# ---------------------------------------------------------------------------------------
# The prompts file


@dataclass(frozen=True)
class Item:
    """One line of the prompts file: its number among the items (from 0), its line (from 1),
    the prompt, the `generate` arguments it overrides and the caller's `meta`."""

    index: int
    line: int
    prompt: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    meta: Any = None
    control_image: str | None = None  # absolute, or relative to the prompts file's folder as written


def is_jsonl(path: Path, first_line: str) -> bool:
    """JSONL for a `.jsonl`/`.ndjson` file, text for `.txt`, else JSONL when the first
    non-blank line opens a JSON object."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES or suffix in TEXT_SUFFIXES:
        return suffix in JSONL_SUFFIXES
    return first_line.lstrip().startswith("{")


def read_items(path: str | os.PathLike) -> list[Item]:
    """The items of a prompts file (module docstring). Raises `SanaCheckpointError` when the
    file cannot be read, and one `SanaInputError` naming the file and every bad line (not
    UTF-8, invalid JSON, not an object, no prompt, an unknown key, a value out of range)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise SanaCheckpointError(f"--prompts: cannot read {path}: {error}") from None
    lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
    items, problems = [], []
    jsonl = None
    for number, raw in enumerate(lines, start=1):
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as error:
            problems.append((number, f"not UTF-8 text ({error.reason} at byte {error.start})"))
            continue
        if not text:
            continue
        if jsonl is None:
            jsonl = is_jsonl(path, text)
        if not jsonl:
            items.append(Item(index=len(items), line=number, prompt=text))
            continue
        parsed = _parse_json_item(text)
        if isinstance(parsed, str):
            problems.append((number, parsed))
        else:
            control = parsed.pop("control_image", None)
            items.append(Item(index=len(items), line=number, prompt=parsed.pop("prompt"), meta=parsed.pop("meta", None),
                              overrides=parsed, control_image=str(path.parent / control) if control else None))
    if problems:
        raise SanaInputError(_bad_lines_message(path, problems))
    if not items:
        raise SanaInputError(f"--prompts: {path} holds no prompts (blank lines are skipped)")
    return items


def _parse_json_item(text: str) -> dict[str, Any] | str:
    """The item's keys (`generate` names, nulls dropped), or what is wrong with the line."""
    try:
        obj = json.loads(text)
    except ValueError as error:
        return f"invalid JSON ({error})"
    if not isinstance(obj, dict):
        return f"a JSON {type(obj).__name__}, not an object with a \"prompt\""
    unknown = sorted(set(obj) - set(ITEM_KEYS))
    if unknown:
        return f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} (known: {', '.join(ITEM_KEYS)})"
    if not isinstance(obj.get("prompt"), str):
        return f"\"prompt\" must be a string, got {obj.get('prompt')!r:.80}"
    control = obj.get("control_image")
    if control is not None and (not isinstance(control, str) or not control):
        return f"\"control_image\" must be a file path, got {control!r:.80}"
    item = {"prompt": obj["prompt"], "meta": obj.get("meta"), "control_image": control}
    item.update({ITEM_KEYS[k]: v for k, v in obj.items() if ITEM_KEYS.get(k) and k != "prompt" and v is not None})
    return _item_value_problem(item) or item


def _item_value_problem(item: Mapping[str, Any]) -> str | None:
    names = {argument: key for key, argument in ITEM_KEYS.items() if argument}
    if not isinstance(item.get("negative_prompt", ""), str):
        return f"negative_prompt must be a string, got {item['negative_prompt']!r:.80}"
    if item.get("solver", SOLVERS[0]) not in SOLVERS:
        return f"solver must be one of {', '.join(SOLVERS)}, got {item['solver']!r:.80}"
    numbers = {k: item[k] for k in ("steps", "guidance_scale", "pag_scale", "flow_shift", "seed", "height", "width",
                                    "control_scale", "control_start", "control_end") if k in item}
    try:
        check_sampling_values(**numbers, names=names)
    except SanaInputError as error:
        return str(error)
    return None


def _bad_lines_message(path: Path, problems: list[tuple[int, str]]) -> str:
    numbers = _ranges([number for number, _ in problems])
    shown = "; ".join(f"line {number}: {problem}" for number, problem in problems[:MAX_REPORTED_LINES])
    more = f"; and {len(problems) - MAX_REPORTED_LINES} more" if len(problems) > MAX_REPORTED_LINES else ""
    return f"--prompts {path}: {len(problems)} bad line{'s' if len(problems) > 1 else ''} ({numbers}): {shown}{more}"


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 7] -> "1-3, 7"."""
    spans: list[list[int]] = []
    for number in numbers:
        if spans and number == spans[-1][1] + 1:
            spans[-1][1] = number
        else:
            spans.append([number, number])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in spans)


# ---------------------------------------------------------------------------------------
# Requests: an item's `generate` arguments, every default resolved


@dataclass(frozen=True)
class Defaults:
    """The command line's values for what an item leaves out, and the run-wide choices."""

    negative_prompt: str = ""
    seed: int = 0  # the base seed: an item without its own gets seed + its number
    width: int | None = None  # None: the DiT's native size
    height: int | None = None
    steps: int | None = None  # None: 20, or 2 for SANA-Sprint
    guidance_scale: float = 4.5
    flow_shift: float | None = None  # None: the DiT's
    pag_scale: float = 0.0
    solver: str | None = None  # None: trigflow for a Sprint DiT, flow_dpm_solver otherwise
    pag_layers: Sequence[int] | None = None
    chi: bool = True
    resolution_binning: bool = True
    control_scale: float = 1.0  # with a ControlNet only
    control_start: float = 0.0
    control_end: float = 1.0


def item_seed(item: Item, base_seed: int) -> int:
    """The item's own seed, else the base seed plus its number (mod 2^64): never its rank or batch."""
    own = item.overrides.get("seed")
    return int(own) if own is not None else (int(base_seed) + item.index) % SEED_LIMIT


def resolve_request(dit: SanaDiT, dcae: Autoencoder, *, prompt: str | list[str], seed: int, defaults: Defaults,
                    overrides: Mapping[str, Any] | None = None, control: bool = False) -> dict[str, Any]:
    """The `generate` keyword arguments (the record's `request`) for `prompt` with `defaults`
    and `overrides`, with the solver, steps, size, flow shift and PAG layers the models imply;
    `control`: with the ControlNet settings (the ControlNet and its image are the caller's)."""
    values = {**{k: getattr(defaults, k) for k in (
        "negative_prompt", "width", "height", "steps", "guidance_scale", "flow_shift", "pag_scale", "solver",
        "control_scale", "control_start", "control_end")},
        **(overrides or {})}
    solver = select_solver(dit, values["solver"])
    side = native_size(dit, dcae)
    # PAG and the negative prompt pass as given: generate refuses PAG with TrigFlow, which has
    # no use for a negative prompt either.
    pag = float(values["pag_scale"])
    layers = None
    if pag > 0 and solver != TRIGFLOW:
        layers = list(defaults.pag_layers) if defaults.pag_layers is not None else list(default_pag_layers(dit))
    request = {
        "prompt": prompt,
        "negative_prompt": values["negative_prompt"],
        "seed": seed,
        "width": int(values["width"] if values["width"] is not None else side),
        "height": int(values["height"] if values["height"] is not None else side),
        "steps": int(values["steps"] if values["steps"] is not None else
                     (DEFAULT_SPRINT_STEPS if solver == TRIGFLOW else DEFAULT_FLOW_STEPS)),
        "guidance_scale": float(values["guidance_scale"]),
        "flow_shift": None if solver == TRIGFLOW else float(
            values["flow_shift"] if values["flow_shift"] is not None else dit.config.flow_shift),
        "solver": solver,
        "pag_scale": pag,
        "pag_layers": layers,
        "chi": defaults.chi,
        "resolution_binning": defaults.resolution_binning,
        "batch_size": 1,
    }
    if control:
        request.update({k: float(values[k]) for k in ("control_scale", "control_start", "control_end")})
    return request


def batch_key(request: Mapping[str, Any]) -> str:
    """What the items of one batch share: every argument but the prompt and the seed."""
    return json.dumps({k: v for k, v in request.items() if k not in ("prompt", "seed")}, sort_keys=True)


def make_batches(pending: Iterable[int], requests: Mapping[int, Mapping[str, Any]], batch_size: int,
                 apart: Mapping[int, Any] | None = None) -> list[list[int]]:
    """The pending items grouped by `batch_key` (groups in order of first item), cut into
    batches of at most `batch_size`: the same for every world size. `apart` adds what else
    must be equal within a batch (the control images' sizes, stacked into one tensor)."""
    groups: dict[str, list[int]] = {}
    for index in pending:
        key = batch_key(requests[index]) + (json.dumps(apart.get(index)) if apart else "")
        groups.setdefault(key, []).append(index)
    return [group[i : i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


def output_name(index: int, count: int) -> str:
    """The file of item `index` of `count`: zero-padded to 6 digits (more for a million items)."""
    return f"{index:0{max(6, len(str(count - 1)))}d}.png"


# ---------------------------------------------------------------------------------------
# The world: torchrun's ranks, and the launcher's key-value store they share


@dataclass
class World:
    """This process's place in the run. A world of one has no store and keeps its counts here."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    store: Any = None
    prefix: str = "sana_batch"
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def add(self, key: str, amount: int = 0) -> int:
        """Add to a run-wide counter and return its total (atomic on the store)."""
        if self.store is None:
            self.counts[key] = self.counts.get(key, 0) + amount
            return self.counts[key]
        return int(self.store.add(f"{self.prefix}/{key}", amount))

    def publish(self, key: str, value: Any) -> None:
        if self.store is not None:
            self.store.set(f"{self.prefix}/{key}", json.dumps(value))

    def fetch(self, key: str, timeout_s: float = 24 * 3600) -> Any:
        """What a rank published under `key`, waiting for it (rank 0 hashes gigabytes first)."""
        name = f"{self.prefix}/{key}"
        self.store.wait([name], timedelta(seconds=timeout_s))
        return json.loads(self.store.get(name))


def join_world() -> World:
    """The world `torchrun` (torch.distributed.run) describes in the environment, joined with a
    gloo process group (it only carries a few numbers on the CPU, on GPU machines too), or a
    world of one for a plain process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if size <= 1:
        return World()
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="gloo")
    # Keys are per launch attempt: an elastic restart must not read the last attempt's counts.
    prefix = f"sana_batch/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    return World(rank=rank, size=size, local_rank=local_rank, store=dist.distributed_c10d._get_default_store(), prefix=prefix)


def leave_world(world: World, timeout_s: float = 600.0) -> None:
    """Every rank checks in on the store, and none leaves the process group before all have (a
    rank tearing its connections down while a peer still uses them aborts that peer)."""
    if world.store is None:
        return
    import torch.distributed as dist

    world.add("left", 1)
    deadline = time.monotonic() + timeout_s
    while world.add("left") < world.size:
        if time.monotonic() > deadline:
            raise SanaError(f"not every one of the {world.size} ranks reached the end within {timeout_s:.0f} s")
        time.sleep(0.01)
    if dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------
# Progress: one bar on rank 0 over every rank's work


class Progress:
    """Rank 0's bar: items finished by every rank (generated, failed) plus those skipped, and
    the images/s generated since the start. `refresh` reads the store at most every 0.2 s."""

    def __init__(self, world: World, total: int, already: int, stream=None):
        self.world, self.total, self.already = world, total, already
        self.stream = stream if stream is not None else sys.stderr
        self.started = time.perf_counter()
        self.last = self.last_line = 0.0
        self.bar = None
        if world.is_main:
            try:
                from tqdm.auto import tqdm

                # Our images/s (generated images only) replaces tqdm's rate, which counts failures too.
                self.bar = tqdm(total=total, initial=already, desc="images", unit="image", file=self.stream,
                                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")
            except ImportError:
                pass

    def rate(self) -> float:
        return self.world.add("generated") / max(time.perf_counter() - self.started, 1e-9)

    def refresh(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.world.is_main or (not force and now - self.last < 0.2):
            return
        self.last = now
        finished = self.already + self.world.add("generated") + self.world.add("failed")
        if self.bar is not None:
            self.bar.n = finished
            self.bar.set_postfix_str(f"{self.rate():.2f} images/s", refresh=False)
            self.bar.refresh()
        elif force or now - self.last_line >= 5:
            self.last_line = now
            print(f"{finished}/{self.total} images, {self.rate():.2f} images/s", file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.refresh(force=True)
            self.bar.close()


# ---------------------------------------------------------------------------------------
# The run


@dataclass(frozen=True)
class BatchOptions:
    """A batch run: the files, the models (paths by component, dtypes, device type) and the defaults."""

    prompts_file: Path
    out_dir: Path
    model_paths: Mapping[str, str]  # "dit", "vae", "text_encoder" -> path
    dtypes: Mapping[str, torch.dtype]  # same keys
    device: str = "cpu"  # "cuda" runs rank r on cuda:<local rank r>
    defaults: Defaults = field(default_factory=Defaults)
    batch_size: int = 1
    compile_model: bool = False
    controlnet: str | None = None  # a ControlNet for every item, each with its control image
    control_image: str | None = None  # the control image of the items that name none


@dataclass
class Parts:
    """The loaded models of a run."""

    dit: SanaDiT
    dcae: Autoencoder
    text_encoder: TextEncoder
    controlnet: SanaControlNet | None = None


def load_parts(paths: Mapping[str, str], dtypes: Mapping[str, torch.dtype], device: str) -> Parts:
    """The DiT and DC-AE on `device`, the text encoder on the CPU (`generate` moves it while
    encoding); a ControlNet (`paths["controlnet"]`, when given) in the DiT's dtype, beside it."""
    dit = load_dit(paths["dit"], dtype=dtypes["dit"], device=device)
    return Parts(
        dit=dit,
        dcae=load_dcae(paths["vae"], dtype=dtypes["vae"], device=device),
        text_encoder=load_text_encoder(paths["text_encoder"], dtype=dtypes["text_encoder"]),
        controlnet=load_controlnet(paths["controlnet"], dtype=dit.dtype, device=device) if paths.get("controlnet") else None,
    )


def dtype_names(parts: Parts) -> dict[str, str]:
    """The loaded dtypes by component, as a record keeps them ("float32", "bfloat16")."""
    models = {"dit": parts.dit, "vae": parts.dcae, "text_encoder": parts.text_encoder}
    return {component: str(model.dtype).removeprefix("torch.") for component, model in models.items()}


def check_out_dir(out_dir: Path) -> None:
    """Refuse, before any loading, an output folder that is a file or cannot be created or written."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SanaInputError(f"--out-dir {out_dir} is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SanaCheckpointError(f"--out-dir: cannot create {out_dir}: {error}") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise SanaCheckpointError(f"--out-dir: {out_dir} is not a writable folder")


def check_control_inputs(items: Sequence[Item], options: BatchOptions) -> dict[int, Path]:
    """Each item's control image (its own, else `--control-image`) when the run has a ControlNet;
    `SanaInputError` naming the lines of items steering a ControlNet the run lacks, or lacking
    the image the run's ControlNet needs, and `SanaCheckpointError` naming the control images that
    are not there: all before any model loads."""
    where = f"--prompts {options.prompts_file}"
    if options.controlnet is None:
        steered = [item.line for item in items if item.control_image or any(k in item.overrides for k in CONTROL_KEYS)]
        if steered:
            raise SanaInputError(f"{where}: line(s) {_ranges(steered)} steer a ControlNet ({', '.join(CONTROL_KEYS)}); "
                                 "give --controlnet")
        if options.control_image:
            raise SanaInputError("--control-image needs --controlnet: a control image steers a ControlNet")
        return {}
    paths = {item.index: Path(item.control_image or options.control_image) for item in items
             if item.control_image or options.control_image}
    lacking = [item.line for item in items if item.index not in paths]
    if lacking:
        raise SanaInputError(f"{where}: line(s) {_ranges(lacking)} have no \"control_image\" for --controlnet; "
                             "give one per line, or --control-image for all")
    absent = [f"line {item.line}: {paths[item.index]}" for item in items if not paths[item.index].is_file()]
    if absent:
        more = f"; and {len(absent) - MAX_REPORTED_LINES} more" if len(absent) > MAX_REPORTED_LINES else ""
        raise SanaCheckpointError(f"{where}: {len(absent)} control image(s) not found: "
                                  f"{'; '.join(absent[:MAX_REPORTED_LINES])}{more}")
    return paths


def image_size(path: Path) -> list[int]:
    """[height, width] of an image file, from its header; `SanaCheckpointError` naming it."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            return [opened.height, opened.width]
    except OSError as error:
        raise SanaCheckpointError(f"cannot read the control image {path}: {error}") from None


def scan_outputs(items: Sequence[Item], requests: Mapping[int, Any], out_dir: Path,
                 hashes: Mapping[str, str], inputs: Mapping[int, Mapping[str, Mapping[str, str]]] | None = None,
                 ) -> tuple[list[int], list[int], dict[int, str]]:
    """(done, pending, failed): items whose output is already this item's complete image (made
    with these model `hashes` and the `inputs` beside them, e.g. its control image), items to
    generate, and items that cannot be (their request failed to resolve, or another file holds
    their name; it is left alone)."""
    done, pending, failed = [], [], {}
    for item in items:
        request = requests[item.index]
        if isinstance(request, str):
            failed[item.index] = request
            continue
        path = out_dir / output_name(item.index, len(items))
        if not path.exists():
            pending.append(item.index)
            continue
        try:
            record = read_record(path)
            difference = same_generation(record, request, hashes)
        except SanaCheckpointError as error:
            record, difference = {}, str(error)
        for key, made_with in (inputs or {}).get(item.index, {}).items():
            if difference is None and record.get(key, {}).get("sha256") != made_with["sha256"]:
                difference = f"another {key.replace('_', ' ')} (SHA-256 differs)"
        if difference is None:
            done.append(item.index)
        else:
            failed[item.index] = f"{path} exists and is not this item's image ({difference}); move it away to make this one"
    return done, pending, failed


def _resolve_all(items: Sequence[Item], parts: Parts, defaults: Defaults) -> dict[int, Any]:
    """Each item's request, or the message of the `SanaError` that resolving it raised."""
    requests: dict[int, Any] = {}
    for item in items:
        try:
            requests[item.index] = resolve_request(
                parts.dit, parts.dcae, prompt=item.prompt, seed=item_seed(item, defaults.seed), defaults=defaults,
                overrides=item.overrides, control=parts.controlnet is not None,
            )
        except SanaError as error:
            requests[item.index] = str(error)
    return requests


def generate_batch(parts: Parts, requests: Sequence[Mapping[str, Any]], *, callback: ProgressCallback | None = None,
                   compile_model: bool = False, control_images: Sequence[Path] | None = None) -> list[torch.Tensor | str]:
    """One `generate` call for requests that share a `batch_key` (one seed per image, and with
    `parts.controlnet` one control image per request, of one size); each result is the image,
    or the error that made it fail. A failing batch of several is run again one request at a
    time, so one bad item does not take its neighbours down."""
    shared = {k: v for k, v in requests[0].items() if k not in ("prompt", "seed", "batch_size")}
    try:
        control = {}
        if parts.controlnet is not None:
            control = {"controlnet": parts.controlnet, "control_image": torch.cat([read_image(p) for p in control_images])}
        images = generate(
            dit=parts.dit, dcae=parts.dcae, text_encoder=parts.text_encoder, prompt=[r["prompt"] for r in requests],
            seed=[r["seed"] for r in requests], callback=callback, compile_model=compile_model, **control, **shared,
        )
        return list(images)
    except (SanaError, *_OUT_OF_MEMORY) as error:
        if isinstance(error, _OUT_OF_MEMORY) and torch.cuda.is_available():
            torch.cuda.empty_cache()  # the failed batch's blocks, before the smaller calls
        if len(requests) == 1:
            return [f"{type(error).__name__}: {error}"]
    alone = control_images if control_images is not None else [None] * len(requests)
    return [result for request, image in zip(requests, alone) for result in
            generate_batch(parts, [request], callback=callback, compile_model=compile_model,
                           control_images=None if image is None else [image])]


def write_image(path: Path, image: torch.Tensor, record: Mapping[str, Any]) -> None:
    """The PNG with its record, atomically (`sana.checkpoint.write_bytes`)."""
    write_bytes(path, encode_png(image, png_text(record)))


def run(options: BatchOptions, *, log: Callable[[str], None] | None = None) -> int:
    """A batch run (module docstring); returns the exit status (1 when an item failed)."""
    log = log if log is not None else (lambda message: print(message, file=sys.stderr, flush=True))
    items = read_items(options.prompts_file)
    check_sampling_values(batch_size=options.batch_size, names={"batch_size": "--batch-size"})
    control_paths = check_control_inputs(items, options)
    check_out_dir(options.out_dir)
    world = join_world()
    # On an error this rank just exits: torchrun then stops the others (waiting for them here
    # would hang, as they wait for this rank's results).
    status = _run(options, items, control_paths, world, log if world.is_main else (lambda message: None))
    leave_world(world)
    return status


def _run(options: BatchOptions, items: list[Item], control_paths: Mapping[int, Path], world: World,
         log: Callable[[str], None]) -> int:
    device = f"cuda:{world.local_rank}" if options.device == "cuda" else options.device
    if device.startswith("cuda"):
        torch.cuda.set_device(torch.device(device))
    started = time.perf_counter()
    if world.is_main:  # while the other ranks load the models
        hashed = describe_models(options.model_paths)
        controlnet = describe_models({"controlnet": options.controlnet})["controlnet"] if options.controlnet else None
        log(f"hashed the model files in {time.perf_counter() - started:.1f} s")
    parts = load_parts({**options.model_paths, "controlnet": options.controlnet}, options.dtypes, device)
    requests = _resolve_all(items, parts, options.defaults)
    if world.is_main:
        models = {c: {**m, "dtype": dtype_names(parts)[c]} for c, m in hashed.items()}
        if controlnet is not None:
            controlnet["dtype"] = str(parts.controlnet.dtype).removeprefix("torch.")
        plan = _make_plan(options, items, requests, models, controlnet, control_paths)
        world.publish("plan", plan)
        log(f"{len(items)} items: {len(plan['done'])} already done, {len(plan['failed'])} cannot be made, "
            f"{len(plan['pending'])} to generate on {world.size} process(es); models loaded in "
            f"{time.perf_counter() - started:.1f} s")
    else:
        plan = world.fetch("plan")
    failed = {int(k): v for k, v in plan["failed"].items()}
    sizes = {int(k): v["size"] for k, v in plan["control"].items()}
    mine = make_batches(plan["pending"], requests, options.batch_size, sizes)[world.rank :: world.size]
    progress = Progress(world, len(items), len(plan["done"]) + len(failed))
    results = _generate_share(options, items, parts, plan, requests, mine, world, progress)
    world.publish(f"results/{world.rank}", results)
    world.add("finished", 1)
    while world.add("finished") < world.size:
        progress.refresh()
        time.sleep(0.05)
    progress.close()
    total_failed = len(failed) + world.add("failed")
    if world.is_main:
        _finish(options, items, world, plan, results, progress, log, total_failed)
    return 1 if total_failed else 0


def _make_plan(options: BatchOptions, items: list[Item], requests: Mapping[int, Any],
               models: Mapping[str, Mapping[str, str]], controlnet: Mapping[str, str] | None,
               control_paths: Mapping[int, Path]) -> dict[str, Any]:
    """Rank 0's plan, the same for every rank: the models' record, each item's control image
    (path, SHA-256, size), and the items done, pending and failed."""
    hashes = {component: model["sha256"] for component, model in models.items()}
    control, unreadable = {}, {}
    for index, path in control_paths.items():
        try:
            control[index] = {"path": os.path.abspath(path), "sha256": file_sha256(path), "size": image_size(path)}
        except (OSError, SanaCheckpointError) as error:
            unreadable[index] = f"{type(error).__name__}: {error}"
    inputs = {index: {"controlnet": controlnet, "control_image": image} for index, image in control.items()}
    done, pending, failed = scan_outputs(items, requests, options.out_dir, hashes, inputs)
    failed.update(unreadable)
    pending = [index for index in pending if index not in unreadable]
    return {"models": models, "controlnet": controlnet, "control": {str(k): v for k, v in control.items()},
            "done": done, "pending": pending, "failed": {str(k): v for k, v in failed.items()}}


def _finish(options: BatchOptions, items: list[Item], world: World, plan: Mapping[str, Any],
            results: list[tuple[int, str | None]], progress: Progress, log: Callable[[str], None], total_failed: int) -> None:
    """Rank 0, once every rank has finished: the index of every item, and the summary."""
    outcomes = dict(results) if world.size == 1 else {
        int(k): v for rank in range(world.size) for k, v in world.fetch(f"results/{rank}")}
    outcomes.update({index: None for index in plan["done"]})
    outcomes.update({int(k): v for k, v in plan["failed"].items()})
    _write_index(options.out_dir, items, options.defaults.seed, outcomes)
    generated = world.add("generated")
    seconds = time.perf_counter() - progress.started
    log(f"done {generated}, skipped {len(plan['done'])} (already there), failed {total_failed}; "
        f"{generated} images in {seconds:.1f} s: {generated / max(seconds, 1e-9):.2f} images/s on {world.size} "
        f"process(es); index: {options.out_dir / INDEX_NAME}")


def _generate_share(options: BatchOptions, items: list[Item], parts: Parts, plan: Mapping[str, Any],
                    requests: Mapping[int, Any], batches: list[list[int]], world: World,
                    progress: Progress) -> list[tuple[int, str | None]]:
    """This rank's batches; each item's result: None (written) or its error."""
    results: list[tuple[int, str | None]] = []
    callback = (lambda step, total, x0: progress.refresh()) if world.is_main else None
    control = {int(k): v for k, v in plan["control"].items()}
    for batch in batches:
        images = [Path(control[i]["path"]) for i in batch] if parts.controlnet is not None else None
        outcomes = generate_batch(parts, [requests[i] for i in batch], callback=callback,
                                  compile_model=options.compile_model, control_images=images)
        for index, outcome in zip(batch, outcomes):
            if isinstance(outcome, torch.Tensor):
                extra = {"item": {"index": index, "line": items[index].line}}
                if parts.controlnet is not None:
                    image = control[index]
                    extra.update(controlnet=plan["controlnet"], control_image={"path": image["path"], "sha256": image["sha256"]})
                record = make_record(requests[index], plan["models"], extra=extra)
                try:
                    write_image(options.out_dir / output_name(index, len(items)), outcome, record)
                    outcome = None
                except SanaCheckpointError as error:
                    outcome = f"{type(error).__name__}: {error}"
            results.append((index, outcome))
            world.add("generated" if outcome is None else "failed", 1)
        progress.refresh(force=True)
    return results


def _write_index(out_dir: Path, items: list[Item], base_seed: int, outcomes: Mapping[int, str | None]) -> None:
    """`DIR/index.jsonl`, atomically: one line per item, in item order; nothing about ranks or
    timing, so every world size and every resumed run of the same items writes the same file."""
    lines = []
    for item in items:
        error = outcomes.get(item.index, "not run")
        entry = {
            "item": item.index, "line": item.line, "file": output_name(item.index, len(items)) if error is None else None,
            "status": "ok" if error is None else "failed", "prompt": item.prompt,
            "seed": item_seed(item, base_seed),
        }
        if error is not None:
            entry["error"] = error
        if item.meta is not None:
            entry["meta"] = item.meta
        lines.append(json.dumps(entry, ensure_ascii=False))
    write_bytes(out_dir / INDEX_NAME, ("\n".join(lines) + "\n").encode("utf-8"))


__all__ = [
    "BatchOptions",
    "Defaults",
    "INDEX_NAME",
    "ITEM_KEYS",
    "Item",
    "generate_batch",
    "item_seed",
    "load_parts",
    "make_batches",
    "output_name",
    "read_items",
    "resolve_request",
    "run",
    "scan_outputs",
]
