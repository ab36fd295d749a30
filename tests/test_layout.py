"""The package's layout rules (README, Layout; CONTRIBUTING): imports point down, no cycles, no
function-local imports but optional or deferred ones, small modules; transformers loads only when used."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "muddformer"
CORE = (
    "config",
    "presets",
    "layers",
    "model",
    "errors",
    "options",
    "_utils",
    "telemetry",
    "compat",
    "connections",
    "kernels",
)
# The layers above the core, lowest first: a module may import its own layer and those before it.
LAYERS = ("inference", "adapters", "data", "training", "evaluation", "experiments", "cli")
OPTIONAL = ("triton", "lm_eval", "matplotlib", "yaml", "torch.utils.tensorboard", "muddformer.kernels.depth_mix_triton")
OPTIONAL += ("pyarrow", "zstandard", "compression")  # mudd prepare: .parquet, .zst (compression: Python >= 3.14)
# Deferred rather than optional: transformers takes seconds to import, so the package loads its adapter on first
# use (muddformer.__getattr__, adapters/registration.py).
DEFERRED = ("muddformer.adapters.hf",)
MAX_LINES = 420


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("muddformer", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text())
    return out


def top_level_imports(tree: ast.Module) -> set[str]:
    found = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("muddformer"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("muddformer"))
    return found


def layer_of(module: str) -> int:
    """-1 for the core (and the package itself), else the index in LAYERS."""
    part = module.split(".")[1] if "." in module else ""
    return LAYERS.index(part) if part in LAYERS else -1


MODULES = modules()


def test_there_are_no_relative_imports():
    relative = [
        name for name, tree in MODULES.items() for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level
    ]
    assert not relative


@pytest.mark.parametrize("name", [m for m in MODULES if m not in ("muddformer", "muddformer.__main__")])
def test_imports_point_down(name):
    """The core imports only the core; a layer imports only its own and lower ones; nothing imports cli."""
    own = layer_of(name)
    for target in top_level_imports(MODULES[name]):
        if target == "muddformer":  # `from muddformer import __version__`
            continue
        assert layer_of(target) <= own, f"{name} imports {target}, a layer above it"
        assert not target.startswith("muddformer.cli") or name.startswith("muddformer.cli"), name


def test_no_import_cycles():
    graph = {name: {t for t in top_level_imports(tree) if t in MODULES} for name, tree in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node]:
            assert state.get(nxt) != 1, "import cycle: " + " -> ".join([*path, node, nxt])
            if nxt not in state:
                visit(nxt, [*path, node])
        state[node] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


@pytest.mark.parametrize("name", list(MODULES))
def test_function_local_imports_are_of_optional_dependencies_only(name):
    for fn in ast.walk(MODULES[name]):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                target = node.module if isinstance(node, ast.ImportFrom) else node.names[0].name
                assert any(target == o or target.startswith(o + ".") for o in OPTIONAL + DEFERRED), (
                    f"{name}.{fn.name} imports {target} inside the function"
                )


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
    assert len(path.read_text().splitlines()) <= MAX_LINES


IMPORT_CHECK = """
import importlib.util
import sys
import muddformer
from muddformer.cli import main
from muddformer.training import trainer
assert "transformers" not in sys.modules, "transformers loaded by the package, the CLI or the trainer"
assert importlib.util.find_spec("transformers") is not None  # a probe, as accelerate and lm-eval make first
from transformers import AutoConfig
assert type(AutoConfig.for_model("muddformer")).__name__ == "MuddHFConfig"
assert muddformer.MuddForCausalLM.__module__ == "muddformer.adapters.hf"
"""


def test_transformers_loads_only_when_used_and_then_knows_our_model_types():
    done = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_with_transformers_loaded_registration_is_immediate():
    import transformers

    from muddformer.adapters import registration

    finders = len(sys.meta_path)
    registration.register_with_transformers()
    assert len(sys.meta_path) == finders and "muddformer.adapters.hf" in sys.modules
    assert type(transformers.AutoConfig.for_model("muddpythia")).__name__ == "MuddPythiaHFConfig"
