"""Layers import downward only: read every module's imports (AST) and check them.

Order, bottom first: the foundation (dependency-free helpers: the package version,
the error base, the launcher/trainer contract, utils), config, model, data, parallel,
checkpoint, training, launch, and the commands on top. A module may import its own
layer and those below.
Every import counts, also those inside functions and under TYPE_CHECKING: a lazy
import that dodges a cycle is still a cycle in the design.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        # "megagpt" is the package root alone (its __version__), not everything under it
        ("megagpt", "megagpt.errors", "megagpt.contract", "megagpt.utils", "megagpt.testing"),
    ),
    ("config", ("megagpt.config",)),
    ("model", ("megagpt.model",)),
    ("data", ("megagpt.data", "megagpt.tokenizer", "megagpt.demo_corpus")),
    ("parallel", ("megagpt.parallel",)),
    ("checkpoint", ("megagpt.checkpoint",)),
    ("planning", ("megagpt.planning",)),
    (
        "training",
        (
            "megagpt.training",
            "megagpt.evaluate",
            "megagpt.generate",
            "megagpt.chat",
            "megagpt.classify",
            "megagpt.harness",
        ),
    ),
    ("launch", ("megagpt.launch",)),
    (
        "cli",
        (
            "megagpt.cli",
            "megagpt.classify_cli",
            "megagpt.plan_cli",
            "megagpt.demo",
            "megagpt.__main__",
        ),
    ),
]
"""Each layer and the module prefixes it holds (the longest matching prefix wins)."""

ONLY: dict[str, tuple[str, ...]] = {
    # The bottom layer proper: nothing from megagpt but the error base it derives from.
    "config": ("megagpt.config", "megagpt.errors"),
    # The offline corpus tools share the file format and the tokenizer, nothing more.
    "data_tools": (
        "data_tools",
        "megagpt.errors",
        "megagpt.utils",
        "megagpt.config",
        "megagpt.data",
        "megagpt.tokenizer",
    ),
}
"""Packages held to a narrower rule than their layer's: what they may import."""


def matches(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer_of(module: str) -> int | None:
    """Index of the layer holding `module`, or None outside megagpt."""
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module.startswith(prefix + ".") and prefix != "megagpt"
            if (module == prefix or inside) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str) -> list[tuple[int, str]]:
    """(line, module) of every absolute import in `source`; `from a import b` yields
    a.b, which is the module itself when b is one and a harmless longer name if not."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.extend((node.lineno, f"{node.module}.{alias.name}") for alias in node.names)
    return found


def violations(module: str, source: str) -> list[str]:
    """What `module` (whose text is `source`) imports from a layer it may not use."""
    own = None if module.startswith("data_tools") else layer_of(module)
    rule = "data_tools" if own is None else LAYERS[own][0]

    def ok(target: str) -> bool:
        if rule in ONLY:
            return matches(target, ONLY[rule])
        return layer_of(target) <= own

    return [
        f"{module}:{line} imports {target}"
        for line, target in imported_modules(source)
        if matches(target, ("megagpt",)) and not ok(target)
    ]


def all_modules() -> list[Path]:
    return sorted([*(ROOT / "megagpt").rglob("*.py"), *(ROOT / "data_tools").rglob("*.py")])


def test_every_module_belongs_to_a_layer():
    homeless = [module_name(p) for p in all_modules() if module_name(p).startswith("megagpt")]
    homeless = [m for m in homeless if layer_of(m) is None]
    assert homeless == []


def test_layers_import_downward_only():
    problems = []
    for path in all_modules():
        problems += violations(module_name(path), path.read_text(encoding="utf-8"))
    assert problems == []


@pytest.mark.parametrize(
    "module, source",
    [
        # the circles this layering removed, as they were written
        ("megagpt.config.validate", "def f():\n    from megagpt.model.gpt import GPT\n"),
        ("megagpt.config.validate", "from megagpt.data.settings import parse_split\n"),
        ("megagpt.training.trainer", "from megagpt.launch.environment import x\n"),
        ("megagpt.checkpoint.state", "from megagpt.training.optimizer import Optimizers\n"),
        ("megagpt.launch.sweep_run", "from megagpt.cli import main\n"),
        ("megagpt.data.dataset", "from megagpt.parallel.dims import ParallelDims\n"),
        ("data_tools.merge", "from megagpt.training.trainer import train\n"),
        ("data_tools.merge", "import megagpt.checkpoint\n"),
    ],
)
def test_an_upward_import_is_reported(module, source):
    (problem,) = violations(module, source)
    assert problem.startswith(f"{module}:")


def test_downward_and_sideways_imports_pass():
    assert violations("megagpt.training.trainer", "from megagpt.parallel import x\n") == []
    assert violations("megagpt.parallel.dims", "from megagpt.parallel.env import y\n") == []
    assert violations("megagpt.config.loader", "from megagpt.errors import MegagptError\n") == []
    assert violations("data_tools.inspect", "from megagpt.tokenizer import Tokenizer\n") == []
