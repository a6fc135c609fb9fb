"""The `tramontane` command: what it prints is exactly what the engine generates, prompts come
from mistral-common, and every failure is one `tramontane: error:` line with a non-zero exit."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mistral_common.protocol.fim.request import FIMRequest
from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage
from PIL import Image

import engine
from engine import cli
from engine.checkpoints import hub
from engine.checkpoints.tiny import NOTICE
from tests.conftest import CheckpointFactory
from tests.engine.vision_util import noise_image

PREFIX = "def fibonacci(n):\n    "
SUFFIX = "\n    return a\n"
REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny_path(make_checkpoint: CheckpointFactory) -> Path:
    return make_checkpoint("native", tokenizer="v3")


@pytest.fixture(scope="module")
def model(tiny_path: Path) -> engine.Model:
    return engine.load(tiny_path)


def decode(model: engine.Model, tokens: list[int]) -> str:
    """The text of generated tokens, as the engine's streams spell it."""
    text = engine.TextStream(model.tokenizer)
    return "".join(text.push(t) for t in tokens) + text.flush()


def run_module(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "engine", *args], capture_output=True,
                          text=True, timeout=120, cwd=REPO_ROOT, env={**os.environ, **(env or {})})


# ---------------------------------------------------------------------------------------------
# make-tiny


@pytest.mark.parametrize("layout, weights, config", [
    ("native", "consolidated.safetensors", "params.json"),
    ("hf", "model.safetensors", "config.json"),
])
def test_make_tiny_writes_a_loadable_folder_and_says_it_is_noise(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str, weights: str,
        config: str) -> None:
    folder = tmp_path / "tiny"
    code = cli.main(["make-tiny", str(folder), "--layout", layout, "--dim", "32", "--layers", "1",
                     "--heads", "2", "--kv-heads", "1", "--hidden-dim", "64"])
    out, err = capsys.readouterr()
    assert code == 0
    assert out == f"{folder}\n"
    assert "random" in err and "noise" in err
    assert {p.name for p in folder.iterdir()} == {weights, config, "tokenizer.model.v3",
                                                  "README.txt"}
    assert (folder / "README.txt").read_text() == NOTICE
    assert "noise" in NOTICE
    loaded = engine.load(folder)
    assert (loaded.config.dim, loaded.config.n_layers, loaded.config.n_heads,
            loaded.config.n_kv_heads, loaded.config.hidden_dim) == (32, 1, 2, 1, 64)


def test_make_tiny_refuses_a_folder_with_files_in_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    assert cli.main(["make-tiny", str(tmp_path)]) == 1
    assert capsys.readouterr().err == (
        f"tramontane: error: {tmp_path}: exists and holds something else than a tiny dense "
        "transformer checkpoint (native layout, v3 tokenizer); choose a new folder\n")
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_make_tiny_leaves_a_folder_that_holds_the_same_checkpoint_as_it_is(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """As after `make demo`: the README's first example asks for the folder it wrote."""
    folder = tmp_path / "models" / "tiny"
    assert cli.main(["make-tiny", str(folder)]) == 0
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    capsys.readouterr()
    assert cli.main(["make-tiny", str(folder)]) == 0
    out, err = capsys.readouterr()
    assert out == f"{folder}\n"
    assert err.splitlines()[0] == (f"{folder} already holds a tiny dense transformer checkpoint "
                                   "(native layout, v3 tokenizer): left as it is")
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    # Other options would write something else: refused, nothing touched.
    assert cli.main(["make-tiny", str(folder), "--seed", "1"]) == 1
    assert "exists and holds something else" in capsys.readouterr().err
    assert cli.main(["make-tiny", str(folder), "--layout", "hf"]) == 1
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps


def test_make_tiny_reports_an_impossible_shape_as_a_usage_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["make-tiny", str(tmp_path / "t"), "--heads", "3", "--kv-heads", "2"]) == 2
    assert "tramontane: error: invalid shape: n_heads (3) must be a multiple of n_kv_heads (2)" \
        in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# complete, generate, chat


def test_complete_prints_exactly_the_text_of_engine_generate_for_the_fim_prompt(
        tiny_path: Path, model: engine.Model, capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["complete", str(tiny_path), "--prefix", PREFIX, "--suffix", SUFFIX,
                     "--max-tokens", "12", "--stats"])
    out, err = capsys.readouterr()
    prompt = model.tokenizer.encode_fim(FIMRequest(prompt=PREFIX, suffix=SUFFIX)).tokens
    tokens, _ = engine.generate([prompt], model, max_tokens=12, temperature=0.0)
    assert code == 0
    assert len(tokens[0]) == 12
    assert out == decode(model, tokens[0])
    assert out.strip()  # a real comparison, not "" == ""
    assert re.fullmatch(rf"prefill {len(prompt)} tokens in [0-9.]+ s \([0-9.]+ tok/s\), "
                        r"decode 12 tokens in [0-9.]+ s \([0-9.]+ tok/s\), finish: length\n",
                        err)


def test_the_fim_prompt_is_mistral_commons_suffix_then_prefix(model: engine.Model) -> None:
    # v3 ids: BOS 1, [SUFFIX] 13, [PREFIX] 11 (FACTS.md)
    prompt = cli.fim_prompt(model, "a = ", "\nprint(a)")
    assert prompt == model.tokenizer.encode_fim(FIMRequest(prompt="a = ",
                                                           suffix="\nprint(a)")).tokens
    assert prompt[:2] == [1, 13]
    middle = prompt.index(11)
    assert model.tokenizer.decode(prompt[2:middle]) == "\nprint(a)"
    assert model.tokenizer.decode(prompt[middle + 1:]) == "a = "


def test_complete_reads_the_prefix_from_a_file_or_stdin(
        tiny_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    cli.main(["complete", str(tiny_path), "--prefix", PREFIX, "--suffix", SUFFIX,
              "--max-tokens", "5"])
    expected = capsys.readouterr().out
    (tmp_path / "suffix.py").write_text(SUFFIX)
    monkeypatch.setattr(sys, "stdin", io.StringIO(PREFIX))
    code = cli.main(["complete", str(tiny_path), "--prefix-file", "-", "--suffix-file",
                     str(tmp_path / "suffix.py"), "--max-tokens", "5"])
    assert code == 0
    assert capsys.readouterr().out == expected


def test_write_stream_flushes_after_every_text_delta() -> None:
    class Recorder(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[str] = []

        def write(self, s: str) -> int:
            self.calls.append(s)
            return super().write(s)

        def flush(self) -> None:
            self.calls.append("<flush>")

    events: list[engine.TokenEvent | engine.EndEvent] = [
        engine.TokenEvent(5, -0.1, "de"), engine.TokenEvent(6, -0.2, ""),
        engine.TokenEvent(7, -0.3, "f"), engine.EndEvent("length", 4, 3, 0.1, 0.2, "\ufffd")]
    out = Recorder()
    tokens, end = cli.write_stream(iter(events), out)
    assert out.calls == ["de", "<flush>", "f", "<flush>", "\ufffd", "<flush>"]
    assert [t.token for t in tokens] == [5, 6, 7]
    assert end == events[-1]


def test_generate_json_gives_the_tokens_and_logprobs_of_engine_generate(
        tiny_path: Path, model: engine.Model, capsys: pytest.CaptureFixture[str]) -> None:
    text = "The quick brown fox"
    code = cli.main(["generate", str(tiny_path), "--prompt", text, "--max-tokens", "10",
                     "--json"])
    result = json.loads(capsys.readouterr().out)
    prompt = model.tokenizer.instruct_tokenizer.tokenizer.encode(text, bos=True, eos=False)
    tokens, logprobs = engine.generate([prompt], model, max_tokens=10, temperature=0.0)
    assert code == 0
    assert result["prompt_tokens"] == prompt
    assert result["tokens"] == tokens[0]
    assert result["logprobs"] == pytest.approx(logprobs[0], abs=1e-5)
    assert result["text"] == decode(model, tokens[0])
    assert result["finish_reason"] == "length"


def test_quantize_flag_generates_what_the_quantized_engine_does_and_saves_its_sidecar(
        tiny_path: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    code = cli.main(["generate", str(tiny_path), "--prompt", "fox", "--max-tokens", "6",
                     "--json", "--quantize", "int4"])
    result = json.loads(capsys.readouterr().out)
    model = engine.load(tiny_path, quantize="int4", quantized_dir=tmp_path / "elsewhere")
    tokens, _ = engine.generate([result["prompt_tokens"]], model, max_tokens=6)
    assert code == 0
    assert result["tokens"] == tokens[0]
    (sidecar,) = (tmp_path / "tramontane" / "quantized").iterdir()
    assert sidecar.name.startswith(f"{tiny_path.name}-int4-")


def test_generate_with_a_seed_samples_the_same_tokens_as_engine_generate(
        tiny_path: Path, model: engine.Model, capsys: pytest.CaptureFixture[str]) -> None:
    flags = dict(max_tokens=8, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    cli.main(["generate", str(tiny_path), "--prompt", "x", "--json", "--max-tokens", "8",
              "--temperature", "1.0", "--top-p", "0.9", "--top-k", "50", "--seed", "7"])
    result = json.loads(capsys.readouterr().out)
    prompt = model.tokenizer.instruct_tokenizer.tokenizer.encode("x", bos=True, eos=False)
    tokens, _ = engine.generate([prompt], model, **flags)  # type: ignore[arg-type]
    assert result["tokens"] == tokens[0]


def test_model_comes_from_TRAMONTANE_MODEL_when_omitted(
        tiny_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    cli.main(["generate", str(tiny_path), "--prompt", "x", "--max-tokens", "4"])
    expected = capsys.readouterr().out
    monkeypatch.setenv("TRAMONTANE_MODEL", str(tiny_path))
    assert cli.main(["generate", "--prompt", "x", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out == expected
    monkeypatch.delenv("TRAMONTANE_MODEL")
    assert cli.main(["generate", "--prompt", "x"]) == 2
    assert capsys.readouterr().err == ("tramontane: error: no model given: pass MODEL or set "
                                       "TRAMONTANE_MODEL\n")


def greedy_reply(model: engine.Model, messages: list[UserMessage | AssistantMessage],
                 max_tokens: int) -> list[int]:
    tokens, _ = engine.generate([cli.chat_prompt(model, messages)], model,
                                max_tokens=max_tokens, temperature=0.0)
    return tokens[0]


def test_chat_answers_each_piped_line_with_the_conversation_so_far(
        tiny_path: Path, model: engine.Model, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello there\nTell me more\n"))
    code = cli.main(["chat", str(tiny_path), "--max-tokens", "8", "--temperature", "0"])
    out = capsys.readouterr().out

    first = greedy_reply(model, [UserMessage(content="Hello there")], 8)
    history: list[UserMessage | AssistantMessage] = [
        UserMessage(content="Hello there"),
        AssistantMessage(content=model.tokenizer.decode(first)),
        UserMessage(content="Tell me more")]
    second = greedy_reply(model, history, 8)
    assert code == 0
    assert out == decode(model, first) + "\n" + decode(model, second) + "\n"
    # The history matters: without it the second reply would be different.
    assert second != greedy_reply(model, [UserMessage(content="Tell me more")], 8)


def test_chat_stops_at_exit_and_skips_blank_lines(
        tiny_path: Path, model: engine.Model, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("\nHello there\n/exit\nnever read\n"))
    assert cli.main(["chat", str(tiny_path), "--max-tokens", "4", "--temperature", "0"]) == 0
    first = greedy_reply(model, [UserMessage(content="Hello there")], 4)
    assert capsys.readouterr().out == decode(model, first) + "\n"


# ---------------------------------------------------------------------------------------------
# Errors


def test_a_missing_model_folder_is_one_error_line_naming_it_without_traceback(
        tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    result = run_module("complete", str(missing), "--prefix", "x")
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr == f"tramontane: error: {missing}: model folder not found\n"


def test_an_out_of_range_sampling_flag_is_a_usage_error_before_loading(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The folder does not exist: the flag is checked first.
    code = cli.main(["complete", str(tmp_path / "absent"), "--prefix", "x",
                     "--temperature", "-1"])
    assert code == 2
    assert capsys.readouterr().err == ("tramontane: error: --temperature must be a finite "
                                       "number >= 0, got -1.0\n")


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--max-tokens", "0", "--max-tokens must be at least 1, got 0"),
    ("--max-tokens", "-3", "--max-tokens must be at least 1, got -3"),
    ("--top-p", "0", "--top-p must be in (0, 1], got 0.0"),
    ("--top-p", "1.5", "--top-p must be in (0, 1], got 1.5"),
    ("--top-k", "-1", "--top-k must be an integer >= 0 (0 = no limit), got -1"),
    ("--seed", "-2", "--seed must be a non-negative integer or None, got -2"),
    ("--temperature", "nan", "--temperature must be a finite number >= 0, got nan"),
])
@pytest.mark.parametrize("command", [["complete", "--prefix", "x"], ["generate", "--prompt", "x"],
                                     ["chat"]])
def test_sampling_errors_name_the_flag_as_typed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], flag: str,
        value: str, message: str) -> None:
    code = cli.main([command[0], str(tmp_path / "absent"), *command[1:], f"{flag}={value}"])
    assert code == 2
    assert capsys.readouterr().err == f"tramontane: error: {message}\n"


@pytest.mark.parametrize("tokenizer", ["v1", "v2"])
def test_complete_on_a_tokenizer_without_fim_says_so(
        make_checkpoint: CheckpointFactory, capsys: pytest.CaptureFixture[str],
        tokenizer: str) -> None:
    folder = make_checkpoint("native", tokenizer=tokenizer)
    assert cli.main(["complete", str(folder), "--prefix", "x", "--suffix", "y"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"tramontane: error: {folder}: this model's tokenizer ({tokenizer}) "
                          "has no fill-in-the-middle")
    assert "Codestral" in err


def test_download_offline_fails_fast_with_one_line(tmp_path: Path) -> None:
    target = tmp_path / "model"
    start = time.monotonic()
    run_module("--version")  # the same interpreter and imports, no request: the reference
    startup = time.monotonic() - start
    start = time.monotonic()
    result = run_module("download", "mistralai/Codestral-22B-v0.1", "--dir", str(target),
                        env={"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HOME": str(tmp_path / "hf"),
                             "HF_HUB_OFFLINE": "0"})
    elapsed = time.monotonic() - start
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.startswith("tramontane: error: cannot download "
                                    "mistralai/Codestral-22B-v0.1: the Hugging Face Hub is "
                                    "unreachable")
    assert result.stderr.count("\n") == 1
    assert not target.exists()
    # The refused connection fails at once: no retry loop or network timeout (10 s at least)
    # on top of the start-up measured just before, on the same (possibly busy) machine.
    assert elapsed < 2 * startup + 5


# ---------------------------------------------------------------------------------------------
# hub: which files, where


SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
          "model.safetensors.index.json"]


def test_download_picks_the_native_weights_when_a_repo_has_both_layouts() -> None:
    files = ["README.md", "params.json", "consolidated.safetensors", "config.json", *SHARDS,
             "tokenizer.model.v3", "tokenizer.json", "tokenizer_config.json", "pytorch_model.bin",
             "original/consolidated.00.pth"]
    assert hub.choose_files("r", files) == ["consolidated.safetensors", "params.json",
                                            "tokenizer.model.v3"]
    assert hub.choose_files("r", files, "hf") == sorted(["config.json", *SHARDS,
                                                         "tokenizer.model.v3"])


def test_download_takes_the_hf_layout_when_it_is_the_only_one() -> None:
    files = ["config.json", *SHARDS, "tekken.json", "generation_config.json"]
    assert hub.choose_files("r", files) == sorted(["config.json", *SHARDS, "tekken.json"])
    with pytest.raises(hub.DownloadError, match="r has no native checkpoint"):
        hub.choose_files("r", files, "native")


def test_download_refuses_a_repo_with_pickle_weights_only() -> None:
    with pytest.raises(hub.DownloadError, match="only pickle weights"):
        hub.choose_files("r", ["config.json", "pytorch_model.bin", "tokenizer.model"])


def test_models_go_to_the_user_data_dir_and_are_found_by_name(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import platformdirs

    assert hub.default_target("mistralai/Codestral-22B-v0.1") == Path(
        platformdirs.user_data_dir("tramontane")) / "models" / "Codestral-22B-v0.1"
    monkeypatch.setattr(hub, "models_dir", lambda: tmp_path)
    (tmp_path / "Codestral-22B-v0.1").mkdir()
    assert hub.resolve_model("mistralai/Codestral-22B-v0.1") == tmp_path / "Codestral-22B-v0.1"
    assert hub.resolve_model("Codestral-22B-v0.1") == tmp_path / "Codestral-22B-v0.1"
    assert hub.resolve_model("Other-Model") == Path("Other-Model")


# ---------------------------------------------------------------------------------------------
# Vision: make-tiny --arch pixtral, chat --image


@pytest.mark.parametrize("layout, weights, config", [
    ("native", "consolidated.safetensors", "params.json"),
    ("hf", "model.safetensors", "config.json"),
])
@pytest.mark.parametrize("merge", [False, True])
def test_make_tiny_pixtral_writes_a_vision_checkpoint_with_tekken(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], layout: str, weights: str,
        config: str, merge: bool) -> None:
    folder = tmp_path / "vision"
    code = cli.main(["make-tiny", str(folder), "--arch", "pixtral", "--layout", layout,
                     *(["--patch-merge"] if merge else [])])
    out, err = capsys.readouterr()
    assert code == 0 and out == f"{folder}\n"
    assert (f"wrote a tiny Pixtral (vision) checkpoint ({layout} layout, tekken tokenizer) to "
            f"{folder}") in err
    assert {p.name for p in folder.iterdir()} == {weights, config, "tekken.json", "README.txt"}
    loaded = engine.load(folder)
    assert loaded.config.vision is not None
    assert loaded.config.vision.spatial_merge_size == (2 if merge else 1)


@pytest.mark.parametrize("args, message", [
    (["--patch-merge"], "--patch-merge needs --arch pixtral"),
    (["--arch", "pixtral", "--tokenizer", "v3"],
     "--arch pixtral needs the tekken tokenizer (its [IMG] tokens)"),
])
def test_make_tiny_pixtral_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                        args: list[str], message: str) -> None:
    assert cli.main(["make-tiny", str(tmp_path / "t"), *args]) == 2
    assert capsys.readouterr().err == f"tramontane: error: {message}\n"


def test_chat_with_an_image_answers_as_engine_generate_with_it(
        make_pixtral: CheckpointFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_pixtral("native")
    model = engine.load(folder)
    shot = tmp_path / "shot.png"
    noise_image(120, 90).save(shot)
    image = Image.open(shot)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is this?\nAnd?\n"))
    code = cli.main(["chat", str(folder), "--image", str(shot), "--max-tokens", "6",
                     "--temperature", "0"])
    out = capsys.readouterr().out
    first_message = cli.user_message("What is this?", [image])
    first, _ = engine.generate([cli.chat_prompt(model, [first_message])], model, max_tokens=6,
                               images=[[image]])
    history = [first_message, AssistantMessage(content=model.tokenizer.decode(first[0])),
               UserMessage(content="And?")]
    second, _ = engine.generate([cli.chat_prompt(model, history)], model, max_tokens=6,
                                images=[[image]])
    assert code == 0
    assert out == decode(model, first[0]) + "\n" + decode(model, second[0]) + "\n"
    without, _ = engine.generate([cli.chat_prompt(model, [UserMessage(content="What is this?")])],
                                 model, max_tokens=6)
    assert first[0] != without[0]  # the image reached the model


def test_chat_image_errors_are_one_line(
        make_pixtral: CheckpointFactory, tiny_path: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    shot = tmp_path / "shot.png"
    noise_image(40, 40).save(shot)
    bmp = tmp_path / "shot.bmp"
    noise_image(40, 40).save(bmp)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    cases = [
        ([str(tiny_path), "--image", str(shot)],
         f"{tiny_path}: this model has no vision encoder; --image needs a vision model "
         "(Pixtral 12B, Mistral Small 3.1)"),
        ([str(make_pixtral("native")), "--image", str(bmp)],
         f"{bmp}: BMP images are not supported; use PNG, JPEG, WEBP or GIF"),
        ([str(make_pixtral("native")), *["--image", str(shot)] * 9],
         "message 1 has 9 images; at most 8 per message"),
    ]
    for args, message in cases:
        assert cli.main(["chat", *args]) == 1
        assert capsys.readouterr().err == f"tramontane: error: {message}\n"
