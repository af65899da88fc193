"""The `moe-serve` command line, run as users run it: a subprocess printing JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


def moe_serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "moe_serve.cli", *args], capture_output=True, text=True, timeout=300, check=False
    )


@pytest.fixture(scope="module")
def cli_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "tiny"
    result = moe_serve("make-tiny-model", str(out), "--family", "qwen2_moe", "--layers", "2", "--experts", "4",
                       "--top-k", "2", "--vocab", "400", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["model_dir"] == str(out)
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "generation_config.json"):
        assert (out / name).is_file(), name
    return out


def test_generate_from_text_prompt(cli_model: Path) -> None:
    result = moe_serve("generate", str(cli_model), "--prompt", "Experts route tokens", "--max-tokens", "8",
                       "--ignore-eos")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert len(out["token_ids"]) == 8
    assert isinstance(out["text"], str) and out["text"]
    assert out["prompt_tokens"] > 0 and out["ttft_s"] > 0 and out["tokens_per_s"] > 0


def test_generate_from_token_ids_is_deterministic(cli_model: Path) -> None:
    args = ("generate", str(cli_model), "--token-ids", "5,6,7,8", "--max-tokens", "6", "--ignore-eos", "--in-process")
    first, second = moe_serve(*args), moe_serve(*args, "--logprobs", "2")
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["token_ids"] == json.loads(second.stdout)["token_ids"]
    assert json.loads(first.stdout)["prompt_tokens"] == 4 and "logprobs" not in json.loads(first.stdout)
    logprobs = json.loads(second.stdout)["logprobs"]
    assert [lp["token_id"] for lp in logprobs] == json.loads(second.stdout)["token_ids"]
    assert all(lp["top"][0][0] == lp["token_id"] and len(lp["top"]) == 2 for lp in logprobs)  # greedy: the top


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--token-ids", "1,2,x"), "--token-ids must be comma-separated integers"),
        (("--token-ids", "1,2,100000"), "unknown token id"),
        (("--token-ids", "1,2", "--max-tokens", "-3"), "max_tokens must be a positive integer"),
        (("--prompt", ""), "prompt is empty"),
    ],
)
def test_generate_bad_input_exits_with_message(cli_model: Path, args: tuple[str, ...], message: str) -> None:
    result = moe_serve("generate", str(cli_model), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_generate_missing_model_dir(tmp_path: Path) -> None:
    result = moe_serve("generate", str(tmp_path / "nope"), "--token-ids", "1,2")
    assert result.returncode == 2
    assert "config.json: missing" in result.stderr


def test_make_tiny_model_rejects_bad_sizes(tmp_path: Path) -> None:
    result = moe_serve("make-tiny-model", str(tmp_path / "m"), "--experts", "2", "--top-k", "3")
    assert result.returncode == 2
    assert "top_k" in result.stderr
