"""One base class for user mistakes: every command prints its message and exits 2; any
other exception is a bug and keeps its traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from data_tools.shards import BadRecordError
from data_tools.sources import InputError
from data_tools.state import StateError
from megagpt.checkpoint import CheckpointError
from megagpt.config import ConfigError
from megagpt.data import IndexedDatasetError
from megagpt.errors import USER_ERROR_EXIT_CODE, MegagptError, MissingFileError, report_user_errors
from megagpt.launch.errors import LaunchError
from megagpt.launch.rendezvous import HostlistError
from megagpt.training.trainer import NonFiniteLossError


@pytest.mark.parametrize(
    "error",
    [
        BadRecordError,
        CheckpointError,
        ConfigError,
        HostlistError,
        IndexedDatasetError,
        InputError,
        LaunchError,
        MissingFileError,
        NonFiniteLossError,
        StateError,
    ],
)
def test_every_user_error_derives_from_the_one_base(error):
    assert issubclass(error, MegagptError)


def test_a_user_error_is_one_line_and_exit_2(capsys):
    def body():
        raise ConfigError("optim.lr = -1: must be positive")

    assert report_user_errors("megagpt train", body) == USER_ERROR_EXIT_CODE == 2
    assert capsys.readouterr().err == "megagpt train: error: optim.lr = -1: must be positive\n"


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    def body():
        raise KeyboardInterrupt

    assert report_user_errors("megagpt-preprocess", body, "; rerun to resume") == 130
    assert capsys.readouterr().err == "megagpt-preprocess: interrupted; rerun to resume\n"


def test_a_bug_is_not_reported_as_a_user_error():
    def body():
        raise ValueError("an internal mistake")

    with pytest.raises(ValueError, match="an internal mistake"):
        report_user_errors("megagpt train", body)


def test_a_bug_in_a_command_keeps_its_traceback():
    script = (
        "import sys, megagpt.cli as cli\n"
        "def broken(args):\n"
        "    raise ValueError('an internal mistake')\n"
        "cli._config = broken\n"
        "sys.exit(cli.main(['config', 'show']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "ValueError: an internal mistake" in done.stderr
