"""Writes the key-by-key table of docs/configuration.md from the config schema.

    uv run python docs/generate_config_reference.py

rewrites the part between the page's `config-reference` markers; tests/test_config.py
fails when the page and noisy_student/config.py disagree.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from noisy_student.config import PipelineConfig

PAGE = Path(__file__).resolve().parent / "configuration.md"
START, END = "<!-- config-reference:start -->\n", "<!-- config-reference:end -->"


def _type_name(annotation: Any) -> str:
    if getattr(annotation, "__origin__", None) is Literal:
        return " or ".join(repr(a) for a in annotation.__args__)
    text = str(annotation) if getattr(annotation, "__args__", None) else annotation.__name__
    return text.replace("typing.", "").replace(" | ", " or ")


def reference_markdown() -> str:
    """One table row per key of the schema, sections first, then their keys."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, f in model.model_fields.items():
            key = f"{prefix}{name}"
            ann = f.annotation
            sub = next(
                (
                    a
                    for a in getattr(ann, "__args__", (ann,))
                    if isinstance(a, type) and issubclass(a, BaseModel)
                ),
                None,
            )
            is_list = getattr(ann, "__origin__", None) is list
            if sub is not None and not is_list:
                lines.append(f"| `{key}` | section | | {f.description or ''} |")
                walk(sub, f"{key}.")
                continue
            if is_list and sub is not None:
                lines.append(f"| `{key}` | list | | {f.description or ''} |")
                walk(sub, f"{key}[].")
                continue
            default = (
                "required"
                if f.is_required()
                else (repr(f.default_factory()) if f.default_factory else repr(f.default))
            )
            lines.append(f"| `{key}` | {_type_name(ann)} | `{default}` | {f.description or ''} |")

    walk(PipelineConfig, "")
    return "\n".join(lines)


def current_table(page: str) -> str:
    """The table between the markers of a page's text."""
    return page.split(START, 1)[1].split(END, 1)[0]


def main() -> None:
    text = PAGE.read_text()
    head, rest = text.split(START, 1)
    PAGE.write_text(head + START + reference_markdown() + "\n" + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    main()
