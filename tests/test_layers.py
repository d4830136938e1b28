"""Import direction: every module imports only its own layer's package or layers below it.

Each module's imports are read with `ast` (every `import` and `from ... import`, wherever it stands,
lazy ones inside functions included), so a layer cannot be skipped by importing late.
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Lowest first. Packages on the same rank are siblings and must not import each other. The records
# sit above models because a record holds a model's weights (keys normalized by models/).
LAYERS = {
    "utils.core": 0,
    "models": 1,
    "utils.data": 2,
    "utils.training": 3,
    "utils.analysis": 4,
    "utils.attacks": 5,
    "utils.defenses": 5,
    "attack": 6,
    "defense": 6,
    "bench": 7,
}
# `python -m utils.report` and friends: documented commands that only run their analysis module.
ENTRY_POINTS = {"utils.report", "utils.plots", "utils.per_class", "utils.sweep_tools",
                "utils.diagnose"}
SOURCE_FOLDERS = ("utils", "models", "attack", "defense", "bench")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(module: str) -> str | None:
    """The package in LAYERS that holds `module` (longest match), None for outside modules."""
    matches = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return max(matches, key=len) if matches else None


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file, relative ones resolved."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from utils import x` names a module x; `from models import f` a function in models
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def source_files() -> list[Path]:
    """Every module of the project, less utils/__init__.py (empty: utils only groups the layers)."""
    return sorted(p for folder in SOURCE_FOLDERS for p in (ROOT / folder).rglob("*.py")
                  if p != ROOT / "utils" / "__init__.py")


def upward_imports(path: Path) -> list[str]:
    module = module_name(path)
    if module in ENTRY_POINTS:
        return []
    own = layer_of(module)
    assert own is not None, f"{module} is in no layer: add its package to LAYERS"
    problems = []
    for line, target in imported_modules(path):
        if target.split(".")[0] not in ("utils", "models", "attack", "defense", "bench"):
            continue  # the standard library and third-party packages
        theirs = layer_of(target)
        if theirs == own:
            continue
        if theirs is None or LAYERS[theirs] >= LAYERS[own]:
            problems.append(f"{path.relative_to(ROOT)}:{line} ({own}, rank {LAYERS[own]}) imports "
                            f"{target} ({theirs}, rank {LAYERS.get(theirs)})")
    return problems


def test_every_source_module_is_in_a_layer():
    loose = [module_name(p) for p in source_files()
             if layer_of(module_name(p)) is None and module_name(p) not in ENTRY_POINTS]
    assert loose == []


@pytest.mark.parametrize("path", source_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path):
    assert upward_imports(path) == []


def test_the_check_catches_an_upward_import(tmp_path, monkeypatch):
    """A models/ file importing the record loader, and a data module importing the training loop,
    are both refused; a sibling kit importing the other kit is refused too."""
    fake = tmp_path / "models"
    fake.mkdir()
    (fake / "bad.py").write_text("def f():\n    from utils.data.record import load_attack_record\n")
    (tmp_path / "utils" / "attacks").mkdir(parents=True)
    (tmp_path / "utils" / "attacks" / "kit.py").write_text("import utils.defenses.run\n")
    (tmp_path / "utils" / "data").mkdir(parents=True)
    (tmp_path / "utils" / "data" / "x.py").write_text("from ..training import train\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert "utils.data.record" in upward_imports(fake / "bad.py")[0]
    assert "utils.defenses.run" in upward_imports(tmp_path / "utils" / "attacks" / "kit.py")[0]
    assert "utils.training.train" in upward_imports(tmp_path / "utils" / "data" / "x.py")[0]


@pytest.mark.parametrize("path", [p for p in source_files()
                                  if p.parent.name in ("attack", "defense")],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_scripts_are_not_libraries(path):
    """An attack or defense script uses the kits, never another script: what two scripts share
    (RNP's and ULRL's unlearning, say) belongs in a kit."""
    assert [target for _, target in imported_modules(path)
            if target.split(".")[0] in ("attack", "defense")] == []


# BackdoorBench's dataset-state keys: the record format's internals, which only the data layer
# (utils/data/split.py, utils/data/record.py) may name. Everything above it gets typed splits.
STATE_KEYS = ("original_index_array", "poison_indicator", "bd_data_container", "data_dict")


def state_key_uses(path: Path) -> list[str]:
    """Lines of `path` that name a dataset-state key, in code or prose alike."""
    return [f"{path.relative_to(ROOT)}:{i}" for i, line in enumerate(path.read_text().splitlines(), 1)
            if any(key in line for key in STATE_KEYS)]


def test_only_the_data_layer_reads_backdoorbench_dataset_states():
    outside = [p for p in source_files() if (ROOT / "utils" / "data") not in p.parents]
    assert [use for p in outside for use in state_key_uses(p)] == []


def test_the_state_key_check_catches_a_leak(tmp_path, monkeypatch):
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    leak = tmp_path / "utils" / "defenses" / "x.py"
    leak.parent.mkdir(parents=True)
    leak.write_text("order = state['original_index_array']\n")
    assert state_key_uses(leak) == ["utils/defenses/x.py:1"]
