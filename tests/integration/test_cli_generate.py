"""`calm-dist`'s command line: generate's sampling options (any of them asks for sampling; bad values are one
line, exit 2), and what answers without loading torch."""
import subprocess
import sys
from types import SimpleNamespace

import pytest

from calm_dist.cli import sampling_arguments
from calm_dist.config import ConfigError


def options(temperature=None, top_k=None, top_p=None):
    return SimpleNamespace(temperature=temperature, top_k=top_k, top_p=top_p)


@pytest.mark.parametrize("given, expected", [
    (options(), {"do_sample": False, "temperature": 1.0, "top_k": None, "top_p": None}),
    (options(temperature=0.0), {"do_sample": False, "temperature": 1.0, "top_k": None, "top_p": None}),
    (options(top_k=5), {"do_sample": True, "temperature": 1.0, "top_k": 5, "top_p": None}),
    (options(top_p=0.9), {"do_sample": True, "temperature": 1.0, "top_k": None, "top_p": 0.9}),
    (options(temperature=0.7, top_k=3), {"do_sample": True, "temperature": 0.7, "top_k": 3, "top_p": None}),
])
def test_top_k_or_top_p_alone_samples(given, expected):
    assert sampling_arguments(given) == expected


@pytest.mark.parametrize("given, message", [
    (options(temperature=-1.0), "--temperature must be >= 0"),
    (options(top_k=0), "--top-k must be >= 1"),
    (options(top_p=0.0), "--top-p must be in (0, 1]"),
    (options(top_p=1.5), "--top-p must be in (0, 1]"),
    (options(temperature=0.0, top_k=4), "--temperature 0 is greedy"),
])
def test_out_of_range_sampling_is_refused(given, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        sampling_arguments(given)


def test_the_command_refuses_before_loading_anything(tmp_path):
    """The composition directory does not exist: the sampling check comes first, one line, exit 2."""
    proc = subprocess.run([sys.executable, "-m", "calm_dist.cli", "generate", str(tmp_path / "none"),
                           "--tokenizer", str(tmp_path / "none.model"), "--prompt", "1 +", "--top-k", "0"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["calm-dist: error: --top-k must be >= 1, got 0"]


LIGHT_CHECK = """
import contextlib, io, sys
from calm_dist import cli

def run(*argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            return cli.main(list(argv)), out.getvalue()
        except SystemExit as e:
            return e.code, out.getvalue()

assert run("--help")[0] == 0
assert run("eval", "--help")[0] == 0
code, text = run("compare", "--help")
assert code == 0 and "calm-dist compare" in text, text
code, text = run("plan", "--help")
assert code == 0 and "calm-dist plan" in text, text
assert run("train", "--config", "/nonexistent/recipe.yaml")[0] == 2
assert run("eval", "--config", "/nonexistent/recipe.yaml", "--set", "x=/nonexistent")[0] == 2
assert run("generate", "x", "--tokenizer", "t", "--prompt", "p", "--top-k", "0")[0] == 2
assert "torch" not in sys.modules, "the command line imported torch"
"""


def test_help_delegated_commands_and_input_errors_do_not_import_torch():
    """`calm-dist --help`, `compare` / `plan` (their own parsers) and refused configs or options answer
    without loading torch."""
    proc = subprocess.run([sys.executable, "-c", LIGHT_CHECK], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
