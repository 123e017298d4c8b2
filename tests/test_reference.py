"""docs/reference.md is generated from the spec models (like crds/): stale means a failing test."""
from pathlib import Path

from kubelora_trainer.crd import spec_schema
from kubelora_trainer.reference import render

REPO = Path(__file__).resolve().parents[1]


def test_committed_reference_matches_generated():
    assert (REPO / "docs" / "reference.md").read_text() == render(), "docs/reference.md is stale: run `make reference`"


def test_every_field_is_documented_with_its_default_and_allowed_values():
    text = render()
    def walk(node, prefix):
        for name, prop in node.get("properties", {}).items():
            assert f"| `{name}` |" in text, f"{prefix}.{name}"
            assert prop.get("description"), f"{prefix}.{name} has no description in spec.py"
            if "properties" in prop:
                assert f"## `{prefix}.{name}`" in text
                walk(prop, f"{prefix}.{name}")
    walk(spec_schema(), "spec")
    assert '| `lrScheduler` | string | `"constant"` | one of `"constant"`, `"linear"`, `"cosine"` |' in text
    assert "| `rank` | integer | `16` | ≥ 1; ≤ 1024 |" in text
