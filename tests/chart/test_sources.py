"""The chart's copies and generated files cannot drift from their sources.

* ``charts/tsnet2/files/crds/*.yaml`` equal ``operator/tsnet2_operator/crds/*.yaml`` byte for
  byte, and ``files/kopf/clusterkopfpeerings.yaml`` equals ``app.peering_crd()``;
* ``values.yaml`` validates against ``values.schema.json``, which is closed and names exactly
  the keys values.yaml has;
* ``README.md`` is what ``tests/chart/gen_readme.py`` generates, and documents every leaf.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from tsnet2_operator.app import peering_crd

from tests.chart import gen_readme
from tests.chart.conftest import CHART, REPO

PACKAGE_CRDS = REPO / "operator" / "tsnet2_operator" / "crds"


def test_crd_copies_equal_the_package() -> None:
    """Same file names, same bytes: `cp operator/tsnet2_operator/crds/*.yaml
    charts/tsnet2/files/crds/` after changing a CRD."""
    package = {p.name: p.read_bytes() for p in PACKAGE_CRDS.glob("*.yaml")}
    chart = {p.name: p.read_bytes() for p in (CHART / "files" / "crds").glob("*.yaml")}
    assert package, "no CRDs in the package"
    assert sorted(chart) == sorted(package)
    for name, data in package.items():
        assert chart[name] == data, f"charts/tsnet2/files/crds/{name} differs from the package"


def test_peering_crd_equals_the_operators() -> None:
    """The kopf peering CRD the chart installs is the one the operator would install."""
    text = (CHART / "files" / "kopf" / "clusterkopfpeerings.yaml").read_text(encoding="utf-8")
    assert yaml.safe_load(text) == peering_crd()


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((CHART / "values.schema.json").read_text("utf-8"))
    return schema


def _values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text("utf-8"))
    return values


def test_values_validate_against_schema() -> None:
    """The defaults are valid (Draft 7, as helm uses)."""
    jsonschema.Draft7Validator.check_schema(_schema())
    jsonschema.Draft7Validator(_schema()).validate(_values())


def _closed_paths(schema: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted paths of every property under closed objects (additionalProperties false)."""
    paths: set[str] = set()
    if schema.get("type") == "object" and schema.get("additionalProperties") is False:
        for key, sub in schema.get("properties", {}).items():
            paths.add(prefix + key)
            paths |= _closed_paths(sub, f"{prefix}{key}.")
    return paths


def _value_paths(schema: dict[str, Any], values: dict[str, Any], prefix: str = "") -> set[str]:
    """Dotted paths of values.yaml, descending only where the schema is closed."""
    paths: set[str] = set()
    for key, value in values.items():
        paths.add(prefix + key)
        sub = schema.get("properties", {}).get(key, {})
        if isinstance(value, dict) and sub.get("additionalProperties") is False:
            paths |= _value_paths(sub, value, f"{prefix}{key}.")
    return paths


def test_schema_is_closed_and_matches_values() -> None:
    """Every object the schema describes is closed, and its keys are exactly values.yaml's."""
    schema = _schema()
    assert schema["additionalProperties"] is False
    assert _closed_paths(schema) == _value_paths(schema, _values())


@pytest.mark.parametrize("typo", [{"sidecar": {"imag": {}}}, {"crd": {"install": True}}])
def test_schema_rejects_unknown_keys(typo: dict[str, Any]) -> None:
    """The closed schema refuses a misspelt key (helm applies the same schema)."""
    with pytest.raises(jsonschema.ValidationError, match="Additional properties"):
        jsonschema.Draft7Validator(_schema()).validate({**_values(), **typo})


@pytest.mark.parametrize("lifetime", [0, 0.5, -1, "90d"])
def test_schema_rejects_a_bad_cert_lifetime(lifetime: Any) -> None:
    """control.certLifetime is seconds, at least 1 (the control server's minimum)."""
    values = _values()
    bad = {**values, "control": {**values["control"], "certLifetime": lifetime}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.Draft7Validator(_schema()).validate(bad)


def test_readme_is_generated() -> None:
    """charts/tsnet2/README.md is current: run `python -m tests.chart.gen_readme`."""
    assert (CHART / "README.md").read_text(encoding="utf-8") == gen_readme.render()
    assert gen_readme.main(["--check"]) == 0


def test_readme_documents_every_leaf() -> None:
    """Every leaf value (scalar, list, or a map the schema leaves open) has a `# --` doc,
    itself or on an ancestor."""
    documented = {row.path for row in gen_readme.parse_values(
        (CHART / "values.yaml").read_text(encoding="utf-8"))}

    def leaves(values: dict[str, Any], prefix: str = "") -> set[str]:
        out: set[str] = set()
        for key, value in values.items():
            path = prefix + key
            if isinstance(value, dict) and value:
                out |= leaves(value, path + ".")
            else:
                out.add(path)
        return out

    missing = [leaf for leaf in sorted(leaves(_values()))
               if not any(leaf == d or leaf.startswith(d + ".") for d in documented)]
    assert missing == []


def test_readme_generator_refuses_orphans(tmp_path: Path) -> None:
    """A documented key outside any section is an error, not a silently dropped row."""
    with pytest.raises(gen_readme.ReadmeError, match="before any section"):
        gen_readme.parse_values("# -- doc\nkey: 1\n")
