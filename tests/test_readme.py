"""README.md's commands stay true: its first-hour block runs as printed, in order, in a scratch folder;
every other `python -m gpt2_jax.*` command names a real CLI, real files, and flags that CLI accepts."""

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MARKER = "<!-- first-hour: tests/test_readme.py runs the next block as printed -->"
CLIS = {"train", "prepare", "generate", "export", "evaluate", "bench", "plot", "serve"}


def fenced_blocks(text: str) -> list[str]:
    """Code blocks that hold commands: ```bash ones, and untagged ones with `$ ` prompts (the
    others show output or Python)."""
    blocks = re.findall(r"^```([a-z]*)\n(.*?)^```", text, flags=re.S | re.M)
    return [body for lang, body in blocks if lang in ("bash", "sh") or (not lang and re.search(r"^\$ ", body, re.M))]


def commands(block: str) -> list[str]:
    """Shell command lines of a block: `$ ` prompts dropped, backslash continuations joined,
    output lines (in blocks with prompts) and comments left out."""
    prompted = any(line.startswith("$ ") for line in block.splitlines())
    out, current = [], ""
    for line in block.splitlines():
        if prompted and not current:
            if not line.startswith("$ "):
                continue
            line = line[2:]
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            text = current.split(" #")[0].strip()
            current = ""
            if text and not text.startswith("#"):
                out.append(text)
    return out


def gpt2_jax_commands() -> list[list[str]]:
    found = []
    for block in fenced_blocks(README):
        for line in commands(block):
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
            lexer.whitespace_split = True
            words: list[str] = []
            for token in [*lexer, ";"]:
                if token.strip(";&|"):
                    words.append(token)
                    continue
                if len(words) >= 3 and words[:2] == ["python", "-m"] and words[2].startswith("gpt2_jax."):
                    found.append(words[2:])
                words = []
    return found


@functools.lru_cache(maxsize=None)
def help_text(cli: str) -> str:
    out = subprocess.run([sys.executable, "-m", f"gpt2_jax.{cli}", "--help"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)  # fmt: skip
    assert out.returncode == 0, f"{cli} --help: {out.stderr}"
    return out.stdout


def test_the_readme_parser_finds_commands():
    cmds = gpt2_jax_commands()
    assert ["gpt2_jax.train", "--config", "configs/shakespeare.py", "--workdir", "runs/shakespeare"] in cmds
    assert len(cmds) > 20
    assert commands("$ a \\\n  b\nout\n$ c  # note\n") == ["a b", "c"]


@pytest.mark.parametrize("words", gpt2_jax_commands(), ids=lambda w: " ".join(w)[:80])
def test_every_readme_command_names_a_real_cli_files_and_flags(words):
    cli = words[0].removeprefix("gpt2_jax.")
    assert cli in CLIS, f"no CLI gpt2_jax.{cli}"
    accepted = help_text(cli)
    for i, word in enumerate(words[1:], 1):
        if not word.startswith("--") or word.startswith("--config."):
            continue
        flag = word.split("=", 1)[0]
        assert re.search(rf"{re.escape(flag)}\b", accepted), f"{cli} --help does not mention {flag}"
        if flag == "--config":
            value = word.split("=", 1)[1] if "=" in word else words[i + 1]
            path = value.split(":", 1)[0]
            if path.endswith(".py"):
                assert (ROOT / path).is_file(), f"config file {path} does not exist"


def test_every_readme_script_exists():
    for block in fenced_blocks(README):
        for line in commands(block):
            for script in re.findall(r"(?:python|bash)\s+((?:scripts|launch)/\S+)", line):
                assert (ROOT / script).is_file(), script


@pytest.mark.readme
def test_the_first_hour_block_runs_as_printed(tmp_path):
    """The walkthrough, exactly as printed, in a scratch folder that sees the repository's
    configs/ and gpt2_jax/ (so runs/ lands there, not in the checkout)."""
    block = README.split(MARKER, 1)[1]
    block = fenced_blocks(block)[0]
    for name in ("configs", "gpt2_jax"):
        os.symlink(ROOT / name, tmp_path / name)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
           "GPT2_JAX_CACHE": str(tmp_path / "cache")}  # fmt: skip
    env.pop("JAX_NUM_CPU_DEVICES", None)
    for cmd in commands(block):
        out = subprocess.run(["bash", "-ec", cmd], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, f"{cmd}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    assert (tmp_path / "runs" / "tiny_hf" / "model.safetensors").is_file()
