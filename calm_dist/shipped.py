"""The DeepSpeed JSONs and recipes that ship with calm_dist, found by name (`zero3`, `tiny`) or by path.

A checkout keeps them at the top of the repository (`ds_configs/`, `recipes/`), where the README's commands
name them; a wheel carries the same files as `calm_dist/ds_configs/` and `calm_dist/recipes/` (pyproject.toml
maps the two folders into the package), so an installed calm_dist finds them from any working directory.
"""
from __future__ import annotations

from pathlib import Path

from calm_dist import SOURCE_TREE

PACKAGE = Path(__file__).resolve().parent
SUFFIX = {"ds_configs": ".json", "recipes": ".yaml"}


def shipped_dir(kind: str) -> Path:
    """The folder of one kind of shipped file: inside the installed package (a wheel), else the checkout's."""
    inside = PACKAGE / kind
    return inside if inside.is_dir() else SOURCE_TREE / kind


def shipped_names(kind: str) -> list[str]:
    """The names the shipped files of `kind` answer to (`zero3`, `zero3_offload`, ...)."""
    return sorted(p.stem for p in shipped_dir(kind).glob(f"*{SUFFIX[kind]}"))


def find_shipped(value: str | Path, kind: str) -> Path:
    """`value` itself when it is a file (absolute, or relative to the working directory); else the shipped file
    it names: a bare name (`zero3`, `zero3.json`) or its path in the repository (`ds_configs/zero3.json`), so a
    recipe's paths work from any directory and in a wheel. Anything else comes back unchanged, for the caller
    to report as missing (naming shipped_names)."""
    path = Path(value)
    if path.is_absolute() or path.is_file() or not path.parts:
        return path
    if len(path.parts) == 1:
        candidate = shipped_dir(kind) / (path.name if path.suffix else path.name + SUFFIX[kind])
    elif path.parts[0] == kind:
        candidate = shipped_dir(kind).joinpath(*path.parts[1:])
    else:
        return path
    return candidate if candidate.is_file() else path


def missing_hint(kind: str) -> str:
    """The end of a "does not exist" message: the names that would have been found."""
    return f" (shipped {kind.replace('_', ' ')}: {', '.join(shipped_names(kind)) or 'none'})"
