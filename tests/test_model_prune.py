"""`moe-serve prune`: a pruned checkpoint loads in `transformers` with the logits this project computes, pruning to
every expert changes nothing, the plan ranks as documented, and bad arguments are clear errors.

Logit tolerance: 1e-4 absolute, fp32 on both sides, as test_model_reference.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import random_prompts
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moe_serve.cli import main
from moe_serve.model.config import ModelConfig
from moe_serve.model.expert_usage import ExpertUsage, PromptRunner
from moe_serve.model.prune import plan_pruning, prune, random_prompt_set
from moe_serve.replicas.engine import LLMEngine
from moe_serve.replicas.sampling import SamplingParams

LOGIT_ATOL = 1e-4
FAMILY_DIRS = ["mixtral_dir", "qwen2_dir", "qwen3_dir", "olmoe_dir"]
_PER_EXPERT = re.compile(r"(model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts)\.(\d+)\.(.+)")


def small_prompts(config: ModelConfig, seed: int = 0):  # noqa: ANN201 - a PromptSet
    return random_prompt_set(6, 2, 24, config.vocab_size, seed)


def hf_logits(model_dir: Path, prompt: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        return model.eval()(torch.tensor([prompt])).logits[0].float()


def our_logits(model_dir: Path, prompt: list[int]) -> torch.Tensor:
    return PromptRunner(model_dir, torch.float32).logits(prompt)


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(path))
    return out


@pytest.mark.parametrize("per_layer", [False, True], ids=["global", "per-layer"])
@pytest.mark.parametrize("family_dir", FAMILY_DIRS)
def test_pruned_checkpoint_loads_in_transformers_with_our_logits(family_dir: str, per_layer: bool, tmp_path: Path,
                                                                 request: pytest.FixtureRequest) -> None:
    model_dir: Path = request.getfixturevalue(family_dir)
    config = ModelConfig.from_dir(model_dir)
    out = tmp_path / "pruned"
    report = prune(model_dir, out, 6, per_layer, small_prompts(config), torch.float32)

    pruned_config = ModelConfig.from_dir(out)
    assert pruned_config.num_experts == 6 and pruned_config.top_k == config.top_k
    assert pruned_config.moe_layers == config.moe_layers
    kept = {layer["layer"]: [e["expert"] for e in layer["kept"]] for layer in report["layers"]}
    assert sorted(kept) == config.moe_layer_ids and all(len(ids) == 6 for ids in kept.values())
    if not per_layer:
        assert len({tuple(ids) for ids in kept.values()}) == 1
    before, after = tensors(model_dir), tensors(out)
    for name, tensor in after.items():  # every tensor is the source's kept one, renamed densely
        if match := _PER_EXPERT.fullmatch(name):
            source = f"{match[1]}.{kept[int(match[2])][int(match[3])]}.{match[4]}"
            assert torch.equal(tensor, before[source]), name
        elif name.endswith(".gate.weight"):
            layer = int(name.split(".")[2])
            assert torch.equal(tensor, before[name][kept[layer]]), name
        else:
            assert torch.equal(tensor, before[name]), name  # shared experts and their gate included
    if config.shared_expert_intermediate_size:
        assert any("shared_expert_gate" in name for name in after)
    sizes = report["bytes"]
    assert sizes["saved"] > 0 and sizes["experts_after"] == sizes["experts_before"] * 6 // 8

    [prompt] = random_prompts([21], config.vocab_size, seed=5)
    torch.testing.assert_close(our_logits(out, prompt), hf_logits(out, prompt), atol=LOGIT_ATOL, rtol=0)


def test_keeping_every_expert_is_the_identity(qwen2_dir: Path, tmp_path: Path) -> None:
    config = ModelConfig.from_dir(qwen2_dir)
    report = prune(qwen2_dir, tmp_path / "same", config.num_experts, True, small_prompts(config), torch.float32)
    assert report["quality"]["kl_mean"] == pytest.approx(0.0, abs=1e-9)
    assert report["quality"]["greedy_agreement"] == 1.0
    [prompt] = random_prompts([17], config.vocab_size, seed=6)
    assert torch.equal(our_logits(tmp_path / "same", prompt), our_logits(qwen2_dir, prompt))
    before, after = tensors(qwen2_dir), tensors(tmp_path / "same")
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_plan_ranks_by_tokens_then_mass_then_id() -> None:
    usage = ExpertUsage([0, 2], np.array([[5, 9, 5, 0], [1, 0, 7, 7]]),
                        np.array([[1.0, 3.0, 2.0, 0.5], [0.2, 0.1, 3.0, 4.0]]))
    assert plan_pruning(usage, 2, per_layer=True) == {0: [1, 2], 2: [2, 3]}  # layer 0: 2 beats 0 on mass
    # summed: tokens [6, 9, 12, 7] -> 2, 1 kept, in id order
    assert plan_pruning(usage, 2, per_layer=False) == {0: [1, 2], 2: [1, 2]}
    tied = ExpertUsage([0], np.array([[3, 3, 3]]), np.array([[1.0, 1.0, 1.0]]))
    assert plan_pruning(tied, 2, per_layer=True) == {0: [0, 1]}


def test_counts_cover_every_prompt_token(mixtral_dir: Path) -> None:
    runner = PromptRunner(mixtral_dir, torch.float32)
    usage = runner.measure(random_prompts([7, 12], runner.config.vocab_size, seed=3))
    assert (usage.tokens.sum(1) == 19 * runner.config.top_k).all()
    np.testing.assert_allclose(usage.mass.sum(1), 19.0, rtol=1e-6)  # softmax rows sum to 1


def stacked_copy(model_dir: Path, out_dir: Path) -> Path:
    """`model_dir` with every layer's experts stacked (`experts.gate_up_proj` [E, 2I, D], `experts.down_proj`
    [E, D, I]), the layout transformers 5 holds in memory."""
    out_dir.mkdir()
    (out_dir / "config.json").write_text((model_dir / "config.json").read_text())
    source = tensors(model_dir)
    out = {name: t for name, t in source.items() if not _PER_EXPERT.fullmatch(name)}
    prefixes = {m[1] for name in source if (m := _PER_EXPERT.fullmatch(name))}
    num_experts = ModelConfig.from_dir(model_dir).num_experts
    for p in prefixes:
        gate, up, down = ("w1", "w3", "w2") if "block_sparse_moe" in p else ("gate_proj", "up_proj", "down_proj")
        w13 = [torch.cat([source[f"{p}.{e}.{gate}.weight"], source[f"{p}.{e}.{up}.weight"]])
               for e in range(num_experts)]
        out[f"{p}.gate_up_proj"] = torch.stack(w13)
        out[f"{p}.down_proj"] = torch.stack([source[f"{p}.{e}.{down}.weight"] for e in range(num_experts)])
    save_file(out, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def test_stacked_experts_and_sharded_output(mixtral_dir: Path, tmp_path: Path) -> None:
    """A stacked source stays stacked, sliced to the kept rows; a small shard limit writes several files and an
    index; both loaders read the result, with the logits of the same pruning of the per-expert source."""
    config = ModelConfig.from_dir(mixtral_dir)
    stacked = stacked_copy(mixtral_dir, tmp_path / "stacked")
    prompts = small_prompts(config)
    plain = prune(mixtral_dir, tmp_path / "plain", 5, True, prompts, torch.float32)
    report = prune(stacked, tmp_path / "out", 5, True, prompts, torch.float32, max_shard_bytes=200_000)
    assert report["layers"] == plain["layers"]
    out = tmp_path / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files == sorted(p.name for p in out.glob("*.safetensors"))
    with safe_open(str(out / index["weight_map"]["model.layers.0.block_sparse_moe.experts.gate_up_proj"]), "pt") as f:
        assert f.get_slice("model.layers.0.block_sparse_moe.experts.gate_up_proj").get_shape()[0] == 5
    [prompt] = random_prompts([15], config.vocab_size, seed=7)
    ours = our_logits(out, prompt)
    torch.testing.assert_close(ours, our_logits(tmp_path / "plain", prompt), atol=1e-5, rtol=0)
    torch.testing.assert_close(ours, hf_logits(out, prompt), atol=LOGIT_ATOL, rtol=0)


def test_cli_prunes_with_a_calibration_file(tiny_model_dir: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    calibration = tmp_path / "prompts.txt"
    lines = [f"Tell me about topic number {i}, in a few words." for i in range(12)]
    calibration.write_text("\n\n".join(lines) + "\n   \n")  # blank lines are ignored
    out = tmp_path / "pruned"
    main(["prune", str(tiny_model_dir), str(out), "--keep-experts", "4", "--calibration", str(calibration)])
    report = json.loads(capsys.readouterr().out)
    assert report["calibration"]["source"] == "file" and report["calibration"]["prompts"] == 10  # 2 held out
    assert report["quality"]["eval_prompts"] == 2 and 0.0 <= report["quality"]["greedy_agreement"] <= 1.0
    assert report["quality"]["kl_mean"] > 0
    assert json.loads((out / "pruning.json").read_text()) == report
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_model_dir / name).read_bytes()
    engine = LLMEngine.from_pretrained(out)
    assert engine.model_config.num_experts == 4 and engine.tokenizer is not None
    [result] = engine.generate([engine.tokenizer.encode("Tell me")], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(result.token_ids) == 4 and result.text is not None


@pytest.mark.parametrize("args, message", [
    (["--keep-experts", "9", "--prompts", "2"], "more than the model's 8 experts"),
    (["--keep-experts", "1", "--prompts", "2"], "fewer than the 2 experts each token is routed to"),
    (["--keep-experts", "0", "--prompts", "2"], "--keep-experts must be at least 1"),
    (["--keep-experts", "4", "--calibration", "{tmp}/missing.txt"], "missing.txt: not found"),
    (["--keep-experts", "4", "--calibration", "{tmp}/empty.txt"], "is empty"),
    (["--keep-experts", "4", "--calibration", "{tmp}/short.txt"], "held out for the quality report"),
    (["--keep-experts", "4"], "one of the arguments --calibration --prompts is required"),
    (["--keep-experts", "4", "--prompts", "2", "--calibration", "{tmp}/short.txt"], "not allowed with argument"),
    (["--keep-experts", "4", "--prompts", "0"], "must be at least 1"),
    (["--keep-experts", "4", "--prompts", "2", "--prompt-tokens", "9000"], "more than the model's 8192 positions"),
])
def test_cli_errors(args: list[str], message: str, tiny_model_dir: Path, tmp_path: Path,
                    capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "short.txt").write_text("one prompt\nand another\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", str(tiny_model_dir), str(out), *[a.format(tmp=tmp_path) for a in args]])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "moe-serve prune: error:" in err and message in err
    assert not out.exists()


def test_cli_refuses_bad_directories(mixtral_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    cases = [
        ([str(tmp_path / "nowhere"), str(tmp_path / "out")], "no such model directory"),
        ([str(mixtral_dir), str(mixtral_dir)], "is the model directory"),
        ([str(mixtral_dir), str(tmp_path / "full")], "exists and is not an empty directory"),
    ]
    for dirs, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            main(["prune", *dirs, "--keep-experts", "4", "--prompts", "2"])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / "full" / "keep.txt").read_text() == "x"
    with pytest.raises(SystemExit):
        main(["prune", str(mixtral_dir), str(tmp_path / "out"), "--keep-experts", "4", "--calibration",
              str(tmp_path / "full" / "keep.txt")])
    assert "has no tokenizer.json: use --prompts N" in capsys.readouterr().err


def test_short_calibration_file_without_a_report(tiny_model_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "short.txt").write_text("one prompt\nand another\n")
    main(["prune", str(tiny_model_dir), str(tmp_path / "out"), "--keep-experts", "2", "--per-layer",
          "--calibration", str(tmp_path / "short.txt"), "--eval-prompts", "0"])
    report = json.loads(capsys.readouterr().out)
    assert report["quality"] is None and report["calibration"]["prompts"] == 2
    assert all(len(layer["kept"]) == 2 and len(layer["dropped"]) == 6 for layer in report["layers"])
    assert ModelConfig.from_dir(tmp_path / "out").num_experts == 2
