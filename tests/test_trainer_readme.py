"""The README's training section: every `python -m trainer` / `torchrun -m trainer` command in it
parses with the trainer's own command line, and its DiT options pass the trainer's value checks.
(Running them is the walkthrough itself: minutes, not a unit test.)"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from trainer.__main__ import build_parser
from trainer.controlnet_config import ControlNetTrainConfig
from trainer.controlnet_config import check_values as check_controlnet_values
from trainer.dit_config import DiTTrainConfig, check_values
from trainer.options import build_config

README = Path(__file__).resolve().parents[1] / "README.md"


def training_commands() -> list[str]:
    """The trainer commands of the README's "Training" section's bash blocks, continuation lines joined."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Training (`python -m trainer`)"):]
    section = section[: section.index("\n## ", 1)]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for command in block.replace("\\\n", " ").splitlines():
            if "-m trainer " in command and not command.lstrip().startswith("#"):
                commands.append(command.strip())
    return commands


def test_the_section_has_the_walkthrough_commands():
    commands = " ".join(training_commands())
    for step in ("trainer cache", "trainer dit", "--lora-rank", "torchrun", "trainer demo --lora", "--control-dir",
                 "trainer controlnet ", "trainer controlnet-demo"):
        assert step in commands, step


@pytest.mark.parametrize("command", training_commands())
def test_readme_command_parses_and_its_values_pass(command):
    argv = shlex.split(command)
    argv = argv[argv.index("trainer") + 1 :]
    args = build_parser().parse_args(argv)  # an unknown option or a bad value exits here
    if args.command == "dit":
        check_values(build_config(DiTTrainConfig, args))
    if args.command == "controlnet":
        check_controlnet_values(build_config(ControlNetTrainConfig, args))
