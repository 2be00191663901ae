"""The dispatcher's timing choices on disk, so that later runs start with them.

One JSON file per device identity — device name, compute capability (or GPU architecture),
runtime (CUDA / HIP / XPU) and driver versions, torch and triton versions, interpreter or not —
named after a digest of that identity and holding it too: a change in any part gives another
file, and a file whose stored identity differs is ignored. A file that cannot be parsed is
ignored with a warning and rewritten with the next choice; a folder that cannot be written
costs one warning, and the choices then stay in memory.

The folder: `SANA_CACHE_DIR` if set; else the one the host application set with
`set_cache_dir` (ComfyUI's user directory: `nodes/` sets it at startup); else
`$XDG_CACHE_HOME/sana-comfy` (`~/.cache/sana-comfy`; `%LOCALAPPDATA%\\sana-comfy` on Windows).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import write_json
from ..errors import SanaCheckpointError
from .launch import interpreting

CACHE_ENV = "SANA_CACHE_DIR"
FORMAT = 1
CHOICES = ("kernel", "reference")

_log = logging.getLogger("sana")
_configured_dir: Path | None = None


def set_cache_dir(path: str | os.PathLike | None) -> None:
    """The folder for the kernel-choice files when `SANA_CACHE_DIR` is not set (None: the default)."""
    global _configured_dir
    _configured_dir = Path(path) if path is not None else None


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    if _configured_dir is not None:
        return _configured_dir
    if os.name == "nt":
        base = Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local")
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "sana-comfy"


def triton_version() -> str:
    try:
        import triton
    except Exception:  # ImportError, or a broken install failing at import
        return "none"
    return str(getattr(triton, "__version__", "unknown"))


def _first_line(path: str) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().strip()
    except OSError:
        return ""


def _nvidia_driver() -> str:
    line = _first_line("/proc/driver/nvidia/version")  # "NVRM version: NVIDIA UNIX x86_64 Kernel Module  550.54.14  ..."
    if "Kernel Module" in line:
        return line.split("Kernel Module")[1].split()[0]
    try:  # Windows, or a container without /proc/driver
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else str(version)
    except Exception:
        return "unknown"


def device_identity(device: torch.device) -> dict[str, str]:
    """What the timing choices depend on besides the kernels themselves."""
    identity = {"type": device.type, "torch": torch.__version__, "triton": triton_version(), "interpreter": str(interpreting())}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        identity["name"] = props.name
        identity["capability"] = f"{props.major}.{props.minor}"
        if torch.version.hip:
            identity["arch"] = str(getattr(props, "gcnArchName", ""))
            identity["runtime"] = f"hip {torch.version.hip}"
            identity["driver"] = _first_line("/sys/module/amdgpu/version") or "unknown"
        else:
            identity["runtime"] = f"cuda {torch.version.cuda}"
            identity["driver"] = _nvidia_driver()
    elif device.type == "xpu":
        props = torch.xpu.get_device_properties(device)
        identity["name"] = str(props.name)
        identity["runtime"] = f"xpu {getattr(torch.version, 'xpu', '')}"
        identity["driver"] = str(getattr(props, "driver_version", "unknown"))
    else:
        identity["name"] = platform.processor() or platform.machine()
    return identity


def _valid_record(record: Any) -> bool:
    return isinstance(record, dict) and record.get("choice") in CHOICES


class ChoiceFile:
    """The timing choices of one device identity: `get` / `put` by choice key, `put` writes through."""

    def __init__(self, identity: dict[str, str], folder: Path | None = None):
        self.identity = identity
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        self.path = (folder if folder is not None else cache_dir()) / f"kernel-choices-{digest}.json"
        self.entries: dict[str, dict[str, Any]] = self._read()
        self.writable = True  # until a write fails: then one warning, and memory only

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return {}
        except OSError as error:
            _log.warning("sana: cannot read the kernel-choice cache %s (%s); timing again", self.path, error)
            return {}
        try:
            data = json.loads(raw.decode("utf-8"))  # a decode error is a ValueError too
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"not a format-{FORMAT} kernel-choice file")
            if data.get("identity") != self.identity:
                return {}  # another device or other versions: not ours to use
            entries = data["choices"]
            if not isinstance(entries, dict) or not all(_valid_record(r) for r in entries.values()):
                raise ValueError("malformed choices")
        except (ValueError, KeyError) as error:
            _log.warning("sana: ignoring the unreadable kernel-choice cache %s (%s); it will be rewritten", self.path, error)
            return {}
        return dict(entries)

    def get(self, key: str) -> dict[str, Any] | None:
        return self.entries.get(key)

    def put(self, key: str, record: dict[str, Any]) -> None:
        self.entries[key] = record
        if not self.writable:
            return
        try:
            write_json(self.path, {"format": FORMAT, "identity": self.identity, "choices": self.entries})
        except (OSError, SanaCheckpointError) as error:  # the atomic writer names the file in the latter
            self.writable = False
            _log.warning("sana: cannot write the kernel-choice cache %s (%s); choices stay in memory", self.path, error)
