"""The dependency rules of docs/architecture.md, read from the source: which package may import which, and no
private name imported across modules. Every import counts, also those inside functions."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "calm_dist"
LEAVES = {"config", "config_checks", "credentials", "files", "console", "rank_zero", "faults", "shipped"}
TORCH_FREE_MODEL = {"calm_dist.model.shapes", "calm_dist.model.layer_pairs"}
# what each package may import of calm_dist, besides itself
ALLOWED = {
    "model": {"leaves"},
    "data": {"leaves", "model"},
    "tracking": {"leaves"},
    "planning": {"leaves", *TORCH_FREE_MODEL},
    "training": {"leaves", "model", "data", "tracking", "planning"},
}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        yield ".".join(p for p in parts if p != "__init__"), path


def calm_dist_imports(path: Path):
    """(imported module, imported names) for every import of calm_dist in the file, relative ones resolved."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("calm_dist"):
                    yield alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("calm_dist"):
            assert node.level == 0, f"{path}: a relative import"
            yield node.module, [alias.name for alias in node.names]


def target_of(module: str, names: list[str]) -> list[str]:
    """`from calm_dist.model import shapes` imports the module calm_dist.model.shapes."""
    subpackage = PACKAGE.joinpath(*module.split(".")[1:])
    if subpackage.is_dir():
        return [f"{module}.{n}" for n in names if (subpackage / f"{n}.py").exists()] or [module]
    return [module]


def package_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return "calm_dist"  # the package's own __init__ (its lazy exports)
    if len(parts) == 2:
        return "leaves" if parts[1] in LEAVES else parts[1]
    return parts[1]


def allowed(importer: str, imported: str) -> bool:
    source, target = package_of(importer), package_of(imported)
    if source == target or imported == "calm_dist":
        return True
    if source == "leaves":
        return False  # a leaf imports other leaves only, no package
    if source not in ALLOWED:  # the entry points (cli, train, task_eval, tiny_setup) may import anything
        return True
    rule = ALLOWED[source]
    return target in rule or imported in rule


def test_packages_import_only_what_the_architecture_allows():
    broken = []
    for module, path in modules():
        for imported, names in calm_dist_imports(path):
            for target in target_of(imported, names):
                if not allowed(module, target):
                    broken.append(f"{module} imports {target}")
    assert broken == []


def test_no_private_name_is_imported_across_modules():
    private = [f"{module} imports {imported}.{name}" for module, path in modules()
               for imported, names in calm_dist_imports(path) for name in names
               if name.startswith("_") and not name.startswith("__")]
    assert private == []


@pytest.mark.parametrize("importer, imported, ok", [
    ("calm_dist.model.composition", "calm_dist.training.checkpoint", False),
    ("calm_dist.model.composition", "calm_dist.files", True),
    ("calm_dist.planning.costs", "calm_dist.model.layer_pairs", True),
    ("calm_dist.planning.costs", "calm_dist.model.composition", False),
    ("calm_dist.data.prepare", "calm_dist.training.rank_zero", False),
    ("calm_dist.rank_zero", "calm_dist.training.agreement", False),
    ("calm_dist.tracking.store", "calm_dist.planning.costs", False),
    ("calm_dist.training.trainer", "calm_dist.tracking.tracker", True),
    ("calm_dist.rank_zero", "calm_dist.faults", True),
])
def test_the_rule_itself(importer, imported, ok):
    """The checker refuses what the architecture forbids (a checker that allows everything would pass above)."""
    assert allowed(importer, imported) is ok


def test_the_python_inside_shell_scripts_imports_names_that_exist():
    """demo.sh and the Slurm scripts run snippets of Python (`python -c '... from calm_dist.x import y'`) that no
    other test imports: a module or function moved without them would fail only at the end of `make demo`."""
    import importlib
    import importlib.util
    import re

    repo = PACKAGE.parent
    missing = []
    for script in sorted(p for p in repo.rglob("*.sh") if ".venv" not in p.parts):
        for module, names in re.findall(r"from (calm_dist[\w.]*) import ([\w, ]+)", script.read_text()):
            imported = importlib.import_module(module)
            missing += [f"{script.relative_to(repo)}: {module}.{n.strip()}" for n in names.split(",")
                        if not hasattr(imported, n.strip()) and not (
                            hasattr(imported, "__path__") and importlib.util.find_spec(f"{module}.{n.strip()}"))]
        for module in re.findall(r"-m (calm_dist[\w.]*|examples[\w.]*)", script.read_text()):
            if importlib.util.find_spec(module) is None:
                missing.append(f"{script.relative_to(repo)}: -m {module}")
    assert missing == []


def test_the_tokenizing_workers_import_no_torch():
    """prepare's worker processes are spawned and import calm_dist.data.prepare: torch would cost each of them
    seconds of start-up, which a prepare of a few million tokens does not otherwise last."""
    import subprocess
    import sys

    probe = "import calm_dist.data.prepare, sys; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
