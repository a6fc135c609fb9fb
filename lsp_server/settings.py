"""initializationOptions / workspace/didChangeConfiguration -> one frozen, typed settings tree.

The wire names are camelCase and fixed (editors and users depend on them):

    {"model": path, "device": "cpu"|"cuda"|..., "dtype": "float32"|"bfloat16"|...,
     "completion": {"maxTokens", "prefixTokens", "suffixTokens", "timeBudgetMs", "debounceMs",
                    "temperature", "enabledLanguages"}}

Unknown keys are ignored. An invalid value leaves that one setting at its previous value (the
default at first) and produces a warning that names the key, the value and what is expected; the
server shows it with window/showMessage.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class CompletionSettings:
    max_tokens: int = 128
    prefix_tokens: int = 1536
    suffix_tokens: int = 512
    time_budget_ms: int = 5000
    debounce_ms: int = 0
    temperature: float = 0.0
    # Language ids (as the editor names them) to complete in; "*" means all.
    enabled_languages: tuple[str, ...] = ("*",)

    def enabled_for(self, language_id: str) -> bool:
        return "*" in self.enabled_languages or language_id in self.enabled_languages


@dataclass(frozen=True)
class Settings:
    model: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    completion: CompletionSettings = field(default_factory=CompletionSettings)


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


Check = Callable[[Any], Any]  # returns the converted value or raises ValueError(expected)


def _int_range(lo: int, hi: int) -> Check:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"an integer from {lo} to {hi}")
        return value

    return check


def _float_range(lo: float, hi: float) -> Check:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                not math.isfinite(value) or not lo <= value <= hi:
            raise ValueError(f"a number from {lo:g} to {hi:g}")
        return float(value)

    return check


def _optional_str(value: Any) -> str | None:
    if value is None or (isinstance(value, str) and value.strip()):
        return value
    raise ValueError("a non-empty string or null")


def _device(value: Any) -> str:
    if isinstance(value, str) and (value in ("cpu", "cuda", "mps") or
                                   (value.startswith("cuda:") and value[5:].isdigit())):
        return value
    raise ValueError('"cpu", "cuda", "cuda:N" or "mps"')


def _dtype(value: Any) -> str | None:
    if value is None or value in DTYPES:
        return value
    raise ValueError(f"null (the checkpoint's) or one of {', '.join(DTYPES)}")


def _languages(value: Any) -> tuple[str, ...]:
    if isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        return tuple(value)
    raise ValueError('a list of language ids, e.g. ["python", "rust"], or ["*"] for all')


COMPLETION_CHECKS: dict[str, Check] = {
    "max_tokens": _int_range(1, 4096),
    "prefix_tokens": _int_range(16, 1_000_000),
    "suffix_tokens": _int_range(0, 1_000_000),
    "time_budget_ms": _int_range(10, 600_000),
    "debounce_ms": _int_range(0, 10_000),
    "temperature": _float_range(0.0, 5.0),
    "enabled_languages": _languages,
}
TOP_CHECKS: dict[str, Check] = {"model": _optional_str, "device": _device, "dtype": _dtype}


def _merge(current: Any, raw: Mapping[str, Any], checks: dict[str, Check], where: str,
           warnings: list[str]) -> Any:
    changes = {}
    for f in fields(current):
        key = _camel(f.name)
        if f.name not in checks or key not in raw:
            continue
        try:
            changes[f.name] = checks[f.name](raw[key])
        except ValueError as expected:
            warnings.append(f"setting {where}{key} = {raw[key]!r} is invalid (expected "
                            f"{expected}); keeping {getattr(current, f.name)!r}")
    return replace(current, **changes)


def merge_settings(current: Settings, raw: Any) -> tuple[Settings, list[str]]:
    """Apply the keys present in `raw` on top of `current`; returns warnings for bad values."""
    warnings: list[str] = []
    if raw is None:
        return current, warnings
    if not isinstance(raw, Mapping):
        return current, [f"settings must be a JSON object, got {type(raw).__name__}; ignored"]
    settings = _merge(current, raw, TOP_CHECKS, "", warnings)
    completion = raw.get("completion")
    if completion is not None:
        if isinstance(completion, Mapping):
            settings = replace(settings, completion=_merge(
                settings.completion, completion, COMPLETION_CHECKS, "completion.", warnings))
        else:
            warnings.append("setting completion must be a JSON object; ignored")
    return settings, warnings


def settings_payload(params: Any) -> Any:
    """The settings object inside a didChangeConfiguration's `settings`: clients send either our
    object itself or `{"tramontane": {...}}` (VS Code's section layout)."""
    if isinstance(params, Mapping) and isinstance(params.get("tramontane"), Mapping):
        return params["tramontane"]
    return params
