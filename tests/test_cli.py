"""The command line reports bad input with one clear line and exit status 2, never a traceback."""

import subprocess
import sys

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "adaspec.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("args,message", [
    (["generate", "hi", "--max-tokens", "0"], "max_tokens must be a positive integer"),
    (["generate", "hi", "--temperature", "-1"], "temperature must be 0 or at least"),
    (["generate", "hi", "--top-p", "2"], "top_p must be in (0, 1]"),
    (["generate", "hi", "--model", "/definitely/not/here"], "does not exist"),
    (["generate", "hi", "--max-tokens", "ten"], "invalid int value"),
    (["generate", "hi", "--mode", "telepathy"], "invalid choice"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_arguments_exit_2_with_a_message(args, message):
    r = run_cli(*args)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_a_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    r = run_cli("generate", "hi", "--model", str(tmp_path))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "config.json" in r.stderr


def test_a_file_that_is_not_a_model(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\x00" * 64)
    r = run_cli("generate", "hi", "--model", str(f))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "gguf" in r.stderr.lower()


def test_python_dash_m_adaspec_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "adaspec", "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "generate" in r.stdout


def test_demo_table_keeps_every_figure_at_80_columns():
    import io

    from rich.console import Console

    from adaspec.demo import PROMPTS, results_table

    table = results_table("adaspec demo")
    for i, text in enumerate(PROMPTS, 1):
        table.add_row(str(i), text, "128", "123.4", "256.7", "2.08x", "3.21", "yes")
    out = io.StringIO()
    Console(file=out, width=80).print(table)
    assert "…" not in out.getvalue()
    assert out.getvalue().count("2.08x") == len(PROMPTS) and "Fibonacci" in out.getvalue()
