"""One command-line vocabulary (support/cli.py): every command shows its defaults, refuses abbreviations and says what
is wrong in one line with exit code 2; offline, missing base models are named with the command that gets them."""
import pathlib
import runpy
import sys

import pytest
from huggingface_hub import constants

from support import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMANDS = ["sample.py", "train.py", "metrics.py", "data.py synthetic", "data.py prepare", "scripts.reproduce",
            "scripts.fig2", "scripts.benchmark", "scripts.check_synthetic", "scripts.demo_figure",
            "scripts.gamma_mismatch"]


def run(command, argv, monkeypatch):
    """A command in this process, as `python <file> ...` / `python -m <module> ...` runs it."""
    name, *sub = command.split()
    monkeypatch.setattr(sys, "argv", [name, *sub, *argv])
    with pytest.raises(SystemExit) as e:
        if name.endswith(".py"):
            runpy.run_path(str(ROOT / name), run_name="__main__")
        else:
            runpy.run_module(name, run_name="__main__", alter_sys=True)
    return e.value.code


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_shows_defaults_and_refuses_abbreviations(command, monkeypatch, capsys):
    assert run(command, ["--help"], monkeypatch) == 0
    assert "(default: " in capsys.readouterr().out
    assert run(command, ["--hel"], monkeypatch) == 2  # no prefix matching: --hel is not --help
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err  # "--hel" unknown, or a required argument missing


def test_numbers_are_range_checked_in_one_line(capsys):
    p = cli.Parser()
    p.add_argument("--gamma", type=cli.number(float, 0, 100, open_lo=True), nargs="+", default=[1.5])
    assert p.parse_args(["--gamma", "1", "1.5"]).gamma == [1.0, 1.5]
    for bad, why in (("0", "0 is outside (0, 100]"), ("nan", "nan is outside"), ("x", "'x' is not a number")):
        with pytest.raises(SystemExit) as e:
            p.parse_args(["--gamma", bad])
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and why in err[0], err


def test_offline_missing_weights_name_the_download(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(SystemExit) as e:
        cli.check_weights(str(tmp_path), "some/adapter", "cvssp/audioldm-m-full")
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert "`hf download some/adapter`, `hf download cvssp/audioldm-m-full`" in err[0]  # a local folder is fine
