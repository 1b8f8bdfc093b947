"""TGI's OpenAPI document as JSON Schema, for tests that validate real answers against it."""

from __future__ import annotations

import copy
import json
from typing import Any

from referencing import Registry
from referencing.jsonschema import DRAFT202012

from tests.conftest import REFERENCE_DIR

SPEC_URI = "urn:tgi-openapi"
SPEC: dict[str, Any] = json.loads((REFERENCE_DIR / "tgi_openapi.json").read_text())


def as_json_schema(node: Any) -> Any:
    """OpenAPI 3.0 -> JSON Schema: ``nullable: true`` admits null; ``discriminator`` is documentation only."""
    if isinstance(node, list):
        return [as_json_schema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: as_json_schema(v) for k, v in node.items() if k not in ("nullable", "discriminator")}
    if node.get("nullable") is True:
        if "type" in out:
            out["type"] = [out["type"], "null"]
        else:
            return {"anyOf": [out, {"type": "null"}]}
    return out


def registry() -> Registry:
    """The whole converted document under ``SPEC_URI``, so ``$ref``s into it resolve."""
    return Registry().with_resource(SPEC_URI, DRAFT202012.create_resource(as_json_schema(copy.deepcopy(SPEC))))
