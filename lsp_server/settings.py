"""initializationOptions / workspace/didChangeConfiguration -> one frozen, typed settings tree.

The wire names are camelCase and fixed (editors and users depend on them):

    {"model": path, "device": "cpu"|"cuda"|..., "dtype": "float32"|"bfloat16"|...,
     "quantize": null|"int8"|"int4", "compile": bool, "adapters": {name: path},
     "completion": {"maxTokens", "prefixTokens", "suffixTokens", "timeBudgetMs", "debounceMs",
                    "temperature", "enabledLanguages", "adapter", "lookup"},
     "cache": {"enabled", "budgetMiB"},
     "chat": {"maxTokens", "temperature", "maxToolSteps", "toolTimeoutMs", "toolOutputChars",
              "deniedPaths", "maxImageMiB"},
     "backend": {"kind": "local"|"openai"|"mistral", "url", "model", "tokenizer", "apiKeyEnv",
                 "maxRequestsPerSecond", "caBundle"}}

Unknown keys are ignored. An invalid value leaves that one setting at its previous value (the
default at first) and produces a warning that names the key, the value and what is expected; the
server shows it with window/showMessage.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal
from urllib.parse import urlsplit

DTYPES = ("float32", "bfloat16", "float16")
QUANTIZE = ("int8", "int4")
BackendKind = Literal["local", "openai", "mistral"]
BACKEND_KINDS: tuple[BackendKind, ...] = ("local", "openai", "mistral")


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
    # The LoRA adapter (a name of `Settings.adapters`) completions run with; None = the base.
    adapter: str | None = None
    # Speculative decoding by lookup (local engine, temperature 0): up to this many tokens
    # drafted from the prompt and the document's earlier completions are checked in one pass
    # over the weights, as long as the engine measures that it pays; the completion is the same,
    # bit for bit. 0 = off.
    lookup: int = 8

    def enabled_for(self, language_id: str) -> bool:
        return "*" in self.enabled_languages or language_id in self.enabled_languages


@dataclass(frozen=True)
class CacheSettings:
    """The per-document prefix KV cache."""

    enabled: bool = True
    # Memory for all documents' caches; None = a share of the machine's memory
    # (`default_cache_budget_mib`).
    budget_mib: int | None = None


@dataclass(frozen=True)
class ChatSettings:
    """`tramontane/chat`: the answer's sampling, the tool loop's bounds, what tools may not read,
    how large a pasted image may be."""

    max_tokens: int = 1024
    temperature: float = 0.3
    max_tool_steps: int = 8
    tool_timeout_ms: int = 5000
    tool_output_chars: int = 20000
    # Globs (gitignore-like, relative to a workspace folder) added to the built-in secrets list.
    denied_paths: tuple[str, ...] = ()
    max_image_mib: int = 20


@dataclass(frozen=True)
class BackendSettings:
    """What runs the model: the in-process engine ("local"), an OpenAI-compatible server such as
    vLLM ("openai"), or Mistral's API ("mistral"). The remote fields are unused by "local".

    The API key is never a setting: `api_key_env` names the environment variable holding it."""

    kind: BackendKind = "local"
    url: str = "http://127.0.0.1:8000/v1"  # the API's base, ending in /v1
    model: str | None = None  # the served model name (vLLM's --served-model-name)
    # The served model's tokenizer file, or a folder holding it: prompts are built locally.
    # None: the one mistral-common ships, when `model` names a known Mistral model.
    tokenizer: str | None = None
    api_key_env: str | None = None
    max_requests_per_second: float | None = None  # None: no client-side rate limit
    ca_bundle: str | None = None  # a PEM file of a private CA (replaces the system's store)


@dataclass(frozen=True)
class Settings:
    model: str | None = None
    device: str = "cpu"
    dtype: str | None = None
    # Weight-only quantization of the local model's linear layers (None: the checkpoint's
    # weights as they are); quantized on the first load, read from a cache file afterwards.
    quantize: str | None = None
    # Compile the one-token decode step when the model loads (faster decoding; the first
    # compile takes a few tens of seconds, later launches reuse inductor's disk cache).
    compile: bool = True
    # LoRA adapters to load beside the model, by name: {"python": "/path/to/lora"}. Which one a
    # completion uses is `completion.adapter` (per workspace: each sends its own settings).
    adapters: Mapping[str, str] = field(default_factory=dict)
    completion: CompletionSettings = field(default_factory=CompletionSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    chat: ChatSettings = field(default_factory=ChatSettings)
    backend: BackendSettings = field(default_factory=BackendSettings)


def default_cache_budget_mib() -> int:
    """An eighth of the machine's memory, between 256 MiB and 4 GiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not a POSIX system
        total = 8 * 2**30
    return int(min(4096, max(256, total // 8 // 2**20)))


_WIRE_NAMES = {"budget_mib": "budgetMiB", "max_image_mib": "maxImageMiB"}


def _camel(name: str) -> str:
    if name in _WIRE_NAMES:
        return _WIRE_NAMES[name]
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


def _quantize(value: Any) -> str | None:
    if value is None or value in QUANTIZE:
        return value
    raise ValueError(f"null (no quantization) or one of {', '.join(QUANTIZE)}")


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
    "adapter": _optional_str,
    "lookup": _int_range(0, 16),
}
def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ValueError("true or false")


def _adapters(value: Any) -> dict[str, str]:
    if isinstance(value, Mapping) and all(isinstance(k, str) and k and isinstance(v, str) and v
                                          for k, v in value.items()):
        return dict(value)
    raise ValueError('an object of adapter names to paths, e.g. {"python": "/loras/python"}')


def _optional_budget(value: Any) -> int | None:
    if value is None:
        return None
    return int(_int_range(0, 1_048_576)(value))


def _globs(value: Any) -> tuple[str, ...]:
    if isinstance(value, list) and all(isinstance(v, str) and v.strip() for v in value):
        return tuple(value)
    raise ValueError('a list of glob patterns, e.g. ["secrets/**", "*.sqlite"]')


def _kind(value: Any) -> BackendKind:
    for kind in BACKEND_KINDS:
        if value == kind:
            return kind
    raise ValueError(" or ".join(f'"{k}"' for k in BACKEND_KINDS))


def _url(value: Any) -> str:
    if isinstance(value, str):
        try:
            parts = urlsplit(value.strip())
            port_ok = parts.port is None or parts.port > 0
        except ValueError:  # a bad port or IPv6 literal
            port_ok = False
        else:
            if parts.scheme in ("http", "https") and parts.hostname and port_ok and \
                    not parts.query and not parts.fragment:
                return value.strip()
    raise ValueError('an http:// or https:// URL of the API\'s base, e.g. '
                     '"http://127.0.0.1:8000/v1"')


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def _env_name(value: Any) -> str | None:
    """The name of an environment variable (never the key itself: a value that does not look
    like a name is refused, and the warning does not repeat it)."""
    if value is None or (isinstance(value, str) and _ENV_NAME.fullmatch(value)):
        return value
    raise ValueError("the name of an environment variable holding the key, e.g. "
                     '"MISTRAL_API_KEY", or null; never the key itself')


def _optional_rate(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(_float_range(0.1, 1000.0)(value))
    except ValueError:
        raise ValueError("a number of requests per second from 0.1 to 1000, or null for no "
                         "limit") from None


# Settings whose invalid values are not repeated in warnings (a key pasted in by mistake).
_HIDDEN = {"api_key_env"}

BACKEND_CHECKS: dict[str, Check] = {
    "kind": _kind,
    "url": _url,
    "model": _optional_str,
    "tokenizer": _optional_str,
    "api_key_env": _env_name,
    "max_requests_per_second": _optional_rate,
    "ca_bundle": _optional_str,
}
CHAT_CHECKS: dict[str, Check] = {
    "max_tokens": _int_range(1, 32768),
    "temperature": _float_range(0.0, 5.0),
    "max_tool_steps": _int_range(0, 64),
    "tool_timeout_ms": _int_range(100, 600_000),
    "tool_output_chars": _int_range(100, 10_000_000),
    "denied_paths": _globs,
    "max_image_mib": _int_range(1, 1024),
}
TOP_CHECKS: dict[str, Check] = {"model": _optional_str, "device": _device, "dtype": _dtype,
                                "quantize": _quantize, "compile": _bool, "adapters": _adapters}
CACHE_CHECKS: dict[str, Check] = {"enabled": _bool, "budget_mib": _optional_budget}


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
            shown = "(the value is not repeated here)" if f.name in _HIDDEN else repr(raw[key])
            warnings.append(f"setting {where}{key} = {shown} is invalid (expected "
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
    for part, checks in (("completion", COMPLETION_CHECKS), ("cache", CACHE_CHECKS),
                         ("chat", CHAT_CHECKS), ("backend", BACKEND_CHECKS)):
        section = raw.get(part)
        if section is None:
            continue
        if isinstance(section, Mapping):
            settings = replace(settings, **{part: _merge(
                getattr(settings, part), section, checks, f"{part}.", warnings)})
        else:
            warnings.append(f"setting {part} must be a JSON object; ignored")
    return settings, warnings


def settings_payload(params: Any) -> Any:
    """The settings object inside a didChangeConfiguration's `settings`: clients send either our
    object itself or `{"tramontane": {...}}` (VS Code's section layout)."""
    if isinstance(params, Mapping) and isinstance(params.get("tramontane"), Mapping):
        return params["tramontane"]
    return params
