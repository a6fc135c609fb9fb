"""The VS Code extension declares the server's settings once, in editors/vscode/package.json
(`contributes.configuration`): same keys, same defaults, same bounds as lsp_server/settings.py,
so the two sides cannot drift. The extension's own settings are listed here by name."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any

import pytest

from lsp_server.settings import DTYPES, QUANTIZE, Settings, _camel, merge_settings

PACKAGE = Path(__file__).resolve().parents[2] / "editors" / "vscode" / "package.json"
SECTION = "tramontane"
CLIENT_ONLY = {"tramontane.serverCommand", "tramontane.serverArgs", "tramontane.enable"}
JSON_TYPES = {bool: "boolean", int: "integer", float: "number", str: "string", tuple: "array",
              dict: "object"}


def declared() -> dict[str, dict[str, Any]]:
    properties: dict[str, dict[str, Any]] = json.loads(PACKAGE.read_text())[
        "contributes"]["configuration"]["properties"]
    return properties


def server_defaults(obj: Any = None, prefix: str = SECTION) -> dict[str, Any]:
    """Every leaf of `Settings()` under its wire name (`_camel` is the server's own mapping)."""
    obj = Settings() if obj is None else obj
    leaves: dict[str, Any] = {}
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        key = f"{prefix}.{_camel(field.name)}"
        if dataclasses.is_dataclass(value):
            leaves.update(server_defaults(value, key))
        else:
            leaves[key] = value
    return leaves


def as_json(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def nested(key: str, value: Any) -> dict[str, Any]:
    """`tramontane.completion.maxTokens`, 5 -> {"completion": {"maxTokens": 5}}."""
    *parents, leaf = key.split(".")[1:]
    tree: dict[str, Any] = {leaf: value}
    for parent in reversed(parents):
        tree = {parent: tree}
    return tree


def test_package_json_declares_exactly_the_server_settings_plus_the_client_ones() -> None:
    assert set(declared()) - CLIENT_ONLY == set(server_defaults())
    assert set(declared()) >= CLIENT_ONLY


@pytest.mark.parametrize("key", sorted(server_defaults()))
def test_defaults_agree(key: str) -> None:
    assert declared()[key]["default"] == as_json(server_defaults()[key])


@pytest.mark.parametrize("key", sorted(server_defaults()))
def test_declared_type_fits_the_default(key: str) -> None:
    default = server_defaults()[key]
    declared_type = declared()[key]["type"]
    types = declared_type if isinstance(declared_type, list) else [declared_type]
    if default is None:
        assert "null" in types
    else:
        assert JSON_TYPES[type(default)] in types


@pytest.mark.parametrize("key", sorted(k for k, p in declared().items()
                                       if "minimum" in p or "maximum" in p))
def test_declared_bounds_are_the_servers(key: str) -> None:
    prop = declared()[key]
    step = 1 if "integer" in prop["type"] else 0.5
    for bound, outside in (("minimum", -step), ("maximum", step)):
        edge = prop[bound]
        _, warnings = merge_settings(Settings(), nested(key, edge))
        assert warnings == [], f"{key} = {edge} (the declared {bound}) is refused"
        _, warnings = merge_settings(Settings(), nested(key, edge + outside))
        assert len(warnings) == 1 and "is invalid" in warnings[0], \
            f"{key} = {edge + outside} (past the declared {bound}) is accepted"


def test_dtype_and_quantize_choices_are_the_servers() -> None:
    assert declared()["tramontane.dtype"]["enum"] == [None, *DTYPES]
    assert declared()["tramontane.quantize"]["enum"] == [None, *QUANTIZE]


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:0", "cuda:12", "mps", "tpu", "cuda:",
                                    "cuda:x", "CPU"])
def test_device_pattern_accepts_what_the_server_accepts(device: str) -> None:
    pattern = declared()["tramontane.device"]["pattern"]
    _, warnings = merge_settings(Settings(), {"device": device})
    assert bool(re.fullmatch(pattern, device)) == (warnings == [])
