"""One command-line vocabulary (support/cli.py): no prefix matching, every default in --help, list options taking
spaces and commas, and error lines that say what is wrong and what to type instead; the hub check honours
HF_ENDPOINT."""
import pathlib
import runpy
import socket
import sys

import pytest
from huggingface_hub import constants

import sample
from support import cli

ROOT = pathlib.Path(__file__).resolve().parent.parent
COMMANDS = ["sample.py", "train.py", "metrics.py", "data.py synthetic", "data.py prepare", "support/cache.py",
            "scripts/reproduce.py", "scripts/fig2.py", "scripts/benchmark.py", "scripts/check_synthetic.py",
            "scripts/demo_figure.py", "scripts/flicker_probe.py", "scripts/gamma_mismatch.py"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_shows_defaults_and_refuses_prefixes(command, monkeypatch, capsys):
    path, *sub = command.split()
    monkeypatch.setattr(sys, "argv", [path, *sub, "--help"])
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    with pytest.raises(SystemExit) as e:
        runpy.run_path(str(ROOT / path), run_name="__main__")
    out = capsys.readouterr().out
    assert e.value.code == 0 and "(default: " in out
    assert "--dtype" not in out and "--num " not in out and "--train-clips" not in out
    p = cli.Parser(prog=command)
    p.add_argument("--num-clips", type=int, default=3)
    with pytest.raises(SystemExit):  # --num is no abbreviation of --num-clips
        p.parse_args(["--num", "4"])


def test_defaults_in_help_and_list_options(capsys):
    with pytest.raises(SystemExit):
        sample.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--guidance-video GUIDANCE_VIDEO (default: 7.5)" in text and "--out OUT folder for the clips" in text
    assert "seed + k (default: 0)" in text  # a zero default is shown too
    p = cli.Parser()
    p.add_argument("--gamma", action=cli.Listing, item=cli.number(float, 0, lo_open=True), default=[1.5])
    p.add_argument("--metrics", action=cli.Listing, default=["fvd"])
    a = p.parse_args(["--gamma", "1,1.5", "2", "--metrics", "av_align,", "fvd"])
    assert a.gamma == [1.0, 1.5, 2.0] and a.metrics == ["av_align", "fvd"]
    with pytest.raises(SystemExit):
        p.parse_args(["--gamma", "1,x"])
    assert "'x' is not a number" in capsys.readouterr().err


def error_line(main, argv, capsys):
    """main(argv) in this process (bad input fails before any model is built): its one stderr line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert e.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_error_lines_say_what_to_type(tmp_path, capsys, monkeypatch):
    import train
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "file").write_text("x")
    (tmp_path / "run" / "joint").mkdir(parents=True)
    (tmp_path / "run" / "joint" / "COMPLETE").write_text("")
    argv = ["--prompt", "x", "--size", "tiny", "--out", tmp_path / "o"]
    line = error_line(sample.main, argv + ["--ckpt", tmp_path / "run" / "joint"], capsys)
    assert "one stage's checkpoint" in line and f"--ckpt {tmp_path / 'run'}" in line
    assert "is a file; give a folder" in error_line(sample.main, argv + ["--ckpt", tmp_path / "file"], capsys)
    line = error_line(sample.main, ["--prompt", "x", "--size", "tiny", "--out", tmp_path / "file"], capsys)
    assert "is a file, not a folder" in line and "File exists" not in line
    line = error_line(train.main, ["--data", "greatesthits", "--size", "tiny", "--out", tmp_path / "t"], capsys)
    assert "--root" in line and "required" in line and "None" not in line
    assert "outside [0, 9223372036854775807]" in error_line(sample.main, argv + ["--seed", 2 ** 63], capsys)
    assert "shorter than one video frame" in error_line(sample.main, argv + ["--seconds", "0.01"], capsys)
    assert "--num" in error_line(sample.main, argv + ["--num", "2"], capsys)  # no prefix of --num-per-prompt
    assert not (tmp_path / "o").exists()  # all before any work


def test_hub_check_uses_the_configured_endpoint(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
        assert cli.hub_reachable(timeout=2)
    assert not cli.hub_reachable(timeout=2)  # the same endpoint, closed now: not the default huggingface.co
