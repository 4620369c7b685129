"""`--set key.path=value` overrides, applied to a config tree before it is validated.

They come as command-line strings (values in YAML, `evaluation.severities=[2, 4]`) or as
a {dotted key: value} mapping, the shape of a deployment's `overrides` parameter. List
items are named by index (`students.0.epochs`). Nothing here knows the schema: a
misspelt key is caught when the tree is validated, with its dotted path.
"""

from __future__ import annotations

from typing import Any

import yaml

from noisy_student.errors import UserError

Overrides = list[str] | dict[str, Any] | None


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        out.append((key.strip(), yaml.safe_load(raw)))
    return out


def override_pairs(overrides: Overrides) -> list[tuple[str, Any]]:
    """(dotted key, value) pairs from `--set` strings or from a {dotted key: value} mapping."""
    if not overrides:
        return []
    if isinstance(overrides, dict):
        return list(overrides.items())
    return parse_overrides(list(overrides))


def set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = tree
    for i, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise UserError(f"--set {dotted}: no list item {'.'.join(keys[: i + 1])}")
            node = node[int(key)]
        else:
            node = node.setdefault(key, {})
        if not isinstance(node, dict | list):  # e.g. name.x=1: indexing a str would raise
            raise UserError(f"--set {dotted}: {'.'.join(keys[: i + 1])} is a value, not a section")
    last = keys[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise UserError(f"--set {dotted}: no list item {dotted}")
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(tree: dict[str, Any], pairs: list[tuple[str, Any]]) -> None:
    for key, value in pairs:
        set_path(tree, key, value)
