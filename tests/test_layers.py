"""The floors of the code and the arrows between them, read from the imports of every module (ast): lib and utils
(generic helpers) < datasets and nets < engine (the pipeline) < the scripts (train.py, test.py, demo.py, tools/,
bench/, setup.py). A module may import from its own floor or a lower one, never from a higher one."""
import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLOORS = {"lib": 0, "utils": 0, "datasets": 1, "nets": 1, "engine": 2,
          "train": 3, "test": 3, "demo": 3, "tools": 3, "bench": 3, "setup": 3, "conftest": 3}
NOT_CODE = {"tests", "data", "docs", "build"}  # tests may import anything; the others hold no modules of ours


def top_level(path: Path) -> str:
    """The top-level package of a repository file (`engine/detector.py` -> engine, `train.py` -> train)."""
    return path.relative_to(REPO).parts[0].removesuffix(".py")


def first_party_imports(source: str, package: str) -> set[str]:
    """The top-level names of ours that `source` imports, at module level or inside functions; relative imports
    stay in `package`."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names.add(package if node.level else node.module.split(".")[0])
    return names & FLOORS.keys()


def upward_imports(source: str, package: str) -> list[str]:
    """The imports of `source` (a module of `package`) that climb to a higher floor."""
    return sorted(name for name in first_party_imports(source, package) if FLOORS[name] > FLOORS[package])


def modules() -> list[Path]:
    return sorted(p for p in REPO.rglob("*.py") if not p.relative_to(REPO).parts[0].startswith(".")
                  and p.relative_to(REPO).parts[0] not in NOT_CODE)


def test_every_module_has_a_floor():
    assert {top_level(p) for p in modules()} <= FLOORS.keys()
    assert {"lib", "utils", "datasets", "nets", "engine", "train", "test", "demo"} <= {top_level(p) for p in modules()}


def test_no_import_climbs_to_a_higher_floor():
    climbing = {str(p.relative_to(REPO)): upward_imports(p.read_text(), top_level(p)) for p in modules()}
    assert {path: names for path, names in climbing.items() if names} == {}


def test_the_check_sees_an_upward_import():
    """What the test above would catch: an import of a higher floor, also inside a function or relative."""
    assert upward_imports("from engine.inference import detect\n", "utils") == ["engine"]
    assert upward_imports("def f():\n    import nets.hourglass\n", "datasets") == []  # same floor
    assert upward_imports("def f():\n    import train\n", "engine") == ["train"]
    assert upward_imports("from datasets import coco\nimport torch\n", "lib") == ["datasets"]
    assert upward_imports("from . import layers\nfrom utils.files import atomic_write\n", "nets") == []
