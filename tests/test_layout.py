"""The package's shape: no import cycle anywhere, dependencies pointing down the stages, short modules,
every CLI of DESIGN.md §3 reachable by its command line, and the public API importable without JAX work."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "gpt2_jax"

# What each stage may import (besides itself and the shared errors / cli modules). The stages
# form a DAG: model and parallel at the bottom, tools at the top.
ALLOWED = {
    "model": set(),
    "parallel": set(),
    "configs": set(),  # presets and shared pieces: a leaf, so a config file imports only ml_collections
    "interop": {"model"},
    "data": {"interop"},
    "infer": {"model", "interop"},
    "train": {"model", "data", "parallel", "interop", "infer", "configs"},
    "tools": {"model", "data", "parallel", "interop", "infer", "train", "configs"},
}
SHARED = {"errors", "cli"}
CLIS = ("train", "prepare", "generate", "export", "evaluate", "bench", "plot", "serve")
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """gpt2_jax modules that `path` imports anywhere (module level or inside functions)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("gpt2_jax")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gpt2_jax"):
            for a in node.names:  # `from gpt2_jax.data import loader` imports the module gpt2_jax.data.loader
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
    return out


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_cycle_finder_finds_a_planted_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package():
    assert cycles(graph()) == []


def test_stages_import_only_downwards():
    bad = []
    for module, deps in graph().items():
        here = stage(module)
        if here not in ALLOWED:
            continue  # the package root, shared modules and the thin CLI modules
        for dep in deps:
            there = stage(dep)
            if there and there != here and there not in SHARED and there not in ALLOWED[here]:
                bad.append(f"{module} -> {dep}")
    assert not bad, "imports against the stage order: " + ", ".join(sorted(bad))


def test_model_imports_nothing_but_itself_and_errors():
    for module, deps in graph().items():
        if stage(module) == "model":
            assert {stage(d) for d in deps} <= {"model", "errors"}, (module, deps)


def test_no_module_is_long():
    long = {name: n for name, p in modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("cli", CLIS)
def test_every_cli_answers_help(cli):
    out = subprocess.run([sys.executable, "-m", f"gpt2_jax.{cli}", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"gpt2_jax.{cli}" in out.stdout


def test_public_api_is_lazy_and_complete():
    code = ("import sys, gpt2_jax; assert 'jax' not in sys.modules; "
            "from gpt2_jax import GPT2Config, GPT2, load_hf, save_hf, get_tokenizer; "
            "print(get_tokenizer().encode('Hello world'), GPT2Config().n_layer)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[15496,", "995]", "12"]
