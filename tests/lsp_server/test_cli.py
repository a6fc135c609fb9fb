"""`lsp_server`'s flags accept what the settings of the same name accept, as the README's
settings table lists them."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lsp_server.cli import parse_args

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_devices() -> list[str]:
    row = re.search(r"^\| `device` \| [^|]+ \| ([^|]+) \|$", README.read_text(), re.MULTILINE)
    assert row is not None
    return re.findall(r'`"([^"]+)"`', row.group(1))


def test_the_readme_lists_the_devices() -> None:
    assert readme_devices() == ["cpu", "cuda", "cuda:N", "mps"]


@pytest.mark.parametrize("device", [d.replace(":N", ":1") for d in readme_devices()])
def test_every_device_of_the_settings_table_is_accepted(device: str) -> None:
    assert parse_args(["--device", device]).device == device


def test_help_names_every_device_of_the_settings_table(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--help"])
    assert exit_info.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--device DEVICE where the model runs: cpu, cuda, cuda:N or mps (default cpu;" \
        in help_text
    for device in readme_devices():
        assert device in help_text


@pytest.mark.parametrize("device", ["tpu", "cuda:", "cuda:x", "CPU", ""])
def test_another_device_is_a_usage_error_naming_the_flag(
        capsys: pytest.CaptureFixture[str], device: str) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--device", device])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f'lsp_server: error: argument --device: {device!r}: expected "cpu", "cuda", "cuda:N" '
        'or "mps"')
