"""What a deployment's parameters look like to Prefect, which validates them before a run
is created: a YAML path or URL, and {dotted key: value} overrides, every key checked, so
`-p overrides='{"teacher.epochz": 3}'` is refused naming the key. From Python, `config`
may also be a validated PipelineConfig.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import WithJsonSchema

from noisy_student.config import PipelineConfig

# Deployments name list items by index in their overrides (`students.0.epochs`); the
# schema spells out this many, and `students` itself replaces the whole list.
LISTED_ITEMS = 5


def overrides_json_schema() -> dict[str, Any]:
    """JSON schema of a {dotted key: value} mapping of overrides, one property per key of
    the config, nothing else allowed."""
    root = PipelineConfig.model_json_schema()
    defs = root.get("$defs", {})

    def inline(node: Any) -> Any:
        # no $ref (a parameter schema has its own definitions) and no defaults: an override
        # has none, and a form filled with defaults would override the YAML
        if isinstance(node, list):
            return [inline(v) for v in node]
        if not isinstance(node, dict):
            return node
        if "$ref" in node:
            target = inline(defs[node["$ref"].rsplit("/", 1)[1]])
            return {**target, **{k: inline(v) for k, v in node.items() if k != "$ref"}}
        return {k: inline(v) for k, v in node.items() if k not in ("default", "title")}

    def section(schema: dict[str, Any]) -> dict[str, Any] | None:
        for option in [schema, *schema.get("anyOf", [])]:
            if "properties" in option:
                return option
        return None

    properties: dict[str, Any] = {}

    def walk(schema: dict[str, Any], prefix: str) -> None:
        for name, sub in schema["properties"].items():
            key = f"{prefix}{name}"
            properties[key] = sub
            if (inner := section(sub)) is not None:
                walk(inner, f"{key}.")
            elif sub.get("type") == "array" and "properties" in sub.get("items", {}):
                for i in range(LISTED_ITEMS):
                    properties[f"{key}.{i}"] = sub["items"]
                    walk(sub["items"], f"{key}.{i}.")

    walk(inline(root), "")
    return {
        "type": "object",
        "description": "Config values to change, by dotted key as with `--set`, e.g. "
        '{"teacher.epochs": 3, "students.0.model": "resnet18"}',
        "properties": properties,
        "additionalProperties": False,
    }


def _optional_string(description: str) -> dict[str, Any]:
    return {"anyOf": [{"type": "string"}, {"type": "null"}], "description": description}


ConfigSource = Annotated[
    str | PipelineConfig,
    WithJsonSchema(
        {
            "type": "string",
            "description": "The pipeline config: a YAML path (relative to the working "
            "folder) or URL, e.g. pipeline_config/fashion_mnist.yaml or s3://bucket/ns.yaml",
        }
    ),
]
Overrides = Annotated[dict[str, Any] | None, WithJsonSchema(overrides_json_schema())]
TeacherRef = Annotated[
    str | None,
    WithJsonSchema(
        _optional_string(
            'Start from this model instead of training a teacher: "champion" (the '
            "registered model's champion, when there is one), models:/NAME@ALIAS, an MLflow run "
            "id or a checkpoint URL. None trains one."
        )
    ),
]
RunName = Annotated[
    str | None,
    WithJsonSchema(
        _optional_string(
            "Name of this run. The default is derived from the config and the data, "
            "so running the same command again after a crash resumes the run: finished stages and "
            "shards are reused, training continues from its last saved state."
        )
    ),
]
TrainingPool = Annotated[
    str | None,
    WithJsonSchema(
        _optional_string(
            "Run the training stages on this work pool (e.g. gpu), as runs of the deployment "
            "noisy-student-train/<pool>, which a worker of that pool runs. None: in this run's "
            "own process."
        )
    ),
]
