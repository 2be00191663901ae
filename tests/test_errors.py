"""The error family: one base, files vs values, and how the command lines report them."""

from __future__ import annotations

import pytest

import sana
from sana.errors import SanaCheckpointError, SanaError, SanaInputError, SanaNonFiniteError


def test_family_shape():
    for cls in (SanaCheckpointError, SanaInputError, SanaNonFiniteError):
        assert issubclass(cls, SanaError)
    assert issubclass(SanaInputError, ValueError)  # callers guarding with `except ValueError` keep working
    assert not issubclass(SanaCheckpointError, ValueError)
    assert not issubclass(SanaInputError, SanaCheckpointError)
    assert sana.SanaError is SanaError and sana.SanaInputError is SanaInputError


def test_value_errors_are_input_errors():
    with pytest.raises(SanaInputError, match="num_steps"):
        sana.schedules.flow_dpm_schedule(0, 3.0)
    with pytest.raises(SanaInputError, match="unknown SanaDiTConfig fields"):
        sana.SanaDiTConfig.from_dict({"width": 3})


def test_trainer_cli_reports_one_error_line_and_exits_2(tmp_path, capsys):
    from trainer.__main__ import main

    missing = tmp_path / "no-such-model"
    assert main(["evaluate", "--model", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(missing) in err and "Traceback" not in err
