"""`expertmesh generate` as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from expertmesh.cli import main


def test_generate_with_the_builtin_model_prints_completions(capsys):
    assert main(["generate", "--prompt", "Hello", "--prompt", "The experts", "--max-tokens", "5", "--ignore-eos"]) == 0
    out = capsys.readouterr().out
    assert out.count("output[0]:") == 2
    assert "2 requests, 10 tokens" in out


def test_generate_with_a_checkpoint_and_chat_template(mixtral_dir, capsys):
    argv = ["generate", "--model", str(mixtral_dir), "--chat", "--prompt", "hi", "--max-tokens", "3", "--ignore-eos"]
    assert main(argv) == 0
    assert "1 requests, 3 tokens" in capsys.readouterr().out


def test_bad_arguments_exit_2_with_the_reason(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "nope")]) == 2
    assert "not a directory" in capsys.readouterr().err
    assert main(["generate", "--temperature", "-1"]) == 2
    err = capsys.readouterr().err
    assert "temperature" in err and "-1" in err


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "expertmesh"
    proc = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "generate" in proc.stdout
