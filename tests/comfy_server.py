"""A headless ComfyUI server with this extension, for the tests that need a real ComfyUI.

Set `COMFYUI_DIR` to a ComfyUI checkout (and `COMFYUI_PYTHON` to its interpreter); the tests
that use this module are skipped otherwise. The server runs on the CPU on 127.0.0.1 at a free
port, with model folders from an extra_model_paths.yaml and temporary input/output/user folders.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
import zlib
from pathlib import Path

import pytest

from node_fixtures import ROOT

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")
COMFYUI_PYTHON = os.environ.get("COMFYUI_PYTHON", sys.executable)
STARTUP_TIMEOUT_S = 240
PROMPT_TIMEOUT_S = 900  # generous: a shared 2-core CPU can be 5x slower than an idle one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_png(path: Path, width: int, height: int) -> None:
    """A small RGB gradient PNG, written without an imaging library."""
    rows = b"".join(b"\x00" + b"".join(bytes((x * 255 // width, y * 255 // height, 128)) for x in range(width)) for y in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def extension_already_installed(comfy_dir: Path) -> bool:
    custom = comfy_dir / "custom_nodes"
    return custom.is_dir() and any(p.resolve() == ROOT for p in custom.iterdir() if p.is_dir())


class ComfyServer:
    def __init__(self, base: Path, model_root: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output, self.input = base / "output", base / "input"
        for folder in (self.output, self.input, base / "temp", base / "user"):
            folder.mkdir(parents=True, exist_ok=True)
        lines = ["sana_test:", f"    base_path: {model_root}", "    diffusion_models: diffusion_models", "    vae: vae",
                 "    text_encoders: text_encoders", "    controlnet: controlnet"]
        if not extension_already_installed(Path(COMFYUI_DIR)):
            (base / "custom_nodes").mkdir()
            (base / "custom_nodes" / "sana-comfy").symlink_to(ROOT, target_is_directory=True)
            lines.append(f"    custom_nodes: {base / 'custom_nodes'}")
        (base / "extra_model_paths.yaml").write_text("\n".join(lines) + "\n")
        self.log_path = base / "server.log"
        command = [
            COMFYUI_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
            "--extra-model-paths-config", str(base / "extra_model_paths.yaml"), "--output-directory", str(self.output),
            "--input-directory", str(self.input), "--temp-directory", str(base / "temp"), "--user-directory", str(base / "user"),
            "--database-url", "sqlite:///:memory:", "--preview-method", "auto",
        ]
        self.log = open(self.log_path, "w")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.process = subprocess.Popen(command, cwd=COMFYUI_DIR, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as response:
            return response.read()

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"ComfyUI exited with {self.process.returncode}:\n{self.log_path.read_text()[-4000:]}")
            try:
                if json.loads(self.get("/object_info/SanaKSampler")):
                    return
                pytest.fail(f"SanaKSampler is not registered:\n{self.log_path.read_text()[-4000:]}")
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(1)
        pytest.fail(f"ComfyUI did not start within {STARTUP_TIMEOUT_S} s:\n{self.log_path.read_text()[-4000:]}")

    def post_prompt(self, prompt: dict, workflow: dict) -> tuple[int, dict]:
        """POST /prompt; returns the HTTP status and the answer, refusals included."""
        body = json.dumps({"prompt": prompt, "client_id": str(uuid.uuid4()), "extra_data": {"extra_pnginfo": {"workflow": workflow}}})
        request = urllib.request.Request(self.url + "/prompt", data=body.encode(), headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read())

    def queue(self, prompt: dict, workflow: dict) -> dict:
        status, answer = self.post_prompt(prompt, workflow)
        if status != 200:
            pytest.fail(f"/prompt refused the workflow: {answer}")
        return answer

    def wait_history(self, prompt_id: str) -> dict:
        deadline = time.monotonic() + PROMPT_TIMEOUT_S
        while time.monotonic() < deadline:
            history = json.loads(self.get(f"/history/{prompt_id}"))
            if history:
                return history[prompt_id]
            if self.process.poll() is not None:
                pytest.fail(f"ComfyUI died:\n{self.log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        pytest.fail(f"prompt {prompt_id} did not finish within {PROMPT_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=20)
        self.log.close()


MODEL_FOLDERS = ("diffusion_models", "controlnet", "vae", "text_encoders")


@contextlib.contextmanager
def model_folders_moved_away(model_root: Path):
    """The tiny models' folders renamed for the duration (the configured folders then do not exist)."""
    for name in MODEL_FOLDERS:
        (model_root / name).rename(model_root / f"{name}.away")
    try:
        yield
    finally:
        for name in MODEL_FOLDERS:
            (model_root / f"{name}.away").rename(model_root / name)
