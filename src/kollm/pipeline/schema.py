"""JSON Schema of kollm.yaml, with each step kind's `config` schema, for editor completion."""

from __future__ import annotations

from typing import Any

from kollm.config import ProjectConfig
from kollm.pipeline.kinds import KINDS, load_kind


def json_schema() -> dict[str, Any]:
    schema = ProjectConfig.model_json_schema()
    defs = schema.setdefault("$defs", {})
    step = defs["StepSpec"]
    step["properties"]["kind"]["enum"] = list(KINDS)
    rules = []
    for kind in KINDS:
        cfg_schema = load_kind(kind).Config.model_json_schema()
        for name, d in cfg_schema.pop("$defs", {}).items():
            defs.setdefault(name, d)
        name = f"{kind.capitalize()}StepConfig"
        defs[name] = cfg_schema
        rules.append(
            {
                "if": {"properties": {"kind": {"const": kind}}},
                "then": {"properties": {"config": {"$ref": f"#/$defs/{name}"}}},
            }
        )
    step["allOf"] = rules
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
