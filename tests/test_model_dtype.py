"""Serving dtypes: what `auto` resolves to, engines in bf16/fp16 against transformers in that dtype, loading memory,
run-to-run determinism, and bad dtype/device names.

bf16 tolerance: bf16 rounds every activation to 8 bits of mantissa, and two correct bf16 implementations (ours keeps
router logits, the expert FFN and projections' accumulation in fp32; transformers rounds after every op) differ by a
few bf16 ulps of the logits, and by more where bf16 noise flips a near-tie of the gate. So the comparison is teacher
forced (transformers scores the tokens we generated, so one divergent token does not derail the rest) and checks
that at least 90% of positions agree within BF16_LOGIT_ATOL (measured: typical max |diff| 0.01-0.07 on logits of
magnitude ~2.5, flips up to ~0.3).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import random_prompts, save_hf_model

from moe_serve.model.dtype import checkpoint_dtype, native, resolve_dtype
from moe_serve.replicas.engine import EngineConfig, LLMEngine
from moe_serve.replicas.sampling import SamplingParams

BF16_LOGIT_ATOL = 0.1
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, return_logits=True)


def _teacher_forced_diffs(model_dir: Path, dtype: torch.dtype, engine: LLMEngine, seed: int) -> list[float]:
    """Max |logit difference| per generated position, ours vs transformers in `dtype` scoring our tokens."""
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    prompts = random_prompts([9, 23, 40], engine.model_config.vocab_size, seed=seed)
    diffs = []
    for prompt, out in zip(prompts, engine.generate(prompts, GREEDY), strict=True):
        ids = torch.tensor([prompt + out.token_ids[:-1]])
        with torch.no_grad():
            ref = hf(ids).logits[0, len(prompt) - 1 :].float()
        diffs += [(ours - theirs).abs().max().item() for ours, theirs in zip(out.logits, ref, strict=True)]
    return diffs


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe"])
def test_bf16_matches_transformers_bf16(tmp_path: Path, family: str, kernels: str) -> None:
    model_dir = save_hf_model(tmp_path, family, num_hidden_layers=2)
    engine = LLMEngine.from_pretrained(model_dir, EngineConfig(dtype="bfloat16"))
    assert engine.model.dtype == torch.bfloat16 and engine.kv.spec.dtype == torch.bfloat16
    diffs = _teacher_forced_diffs(model_dir, torch.bfloat16, engine, seed=4)
    within = sum(d <= BF16_LOGIT_ATOL for d in diffs) / len(diffs)
    assert within >= 0.9, f"only {within:.0%} of positions within {BF16_LOGIT_ATOL}: {sorted(diffs)[-5:]}"


def test_float16_engine_tracks_float32(mixtral_dir: Path) -> None:
    """fp16 weights and KV (no transformers reference needed: fp16 keeps 11 bits, so it stays close to fp32)."""
    prompts = random_prompts([17], 256, seed=5)
    half = LLMEngine.from_pretrained(mixtral_dir, EngineConfig(dtype="float16")).generate(prompts, GREEDY)[0]
    full = LLMEngine.from_pretrained(mixtral_dir, EngineConfig(dtype="float32")).generate(prompts, GREEDY)[0]
    torch.testing.assert_close(half.logits[0], full.logits[0], atol=0.02, rtol=0)


def test_auto_dtype(tmp_path: Path, mixtral_dir: Path) -> None:
    """auto keeps a bf16 checkpoint in bf16 only where the CPU computes bf16 natively; fp32 stays fp32."""
    assert checkpoint_dtype(mixtral_dir) == torch.float32
    assert resolve_dtype("auto", mixtral_dir) == torch.float32
    bf16_dir = tmp_path / "bf16"
    bf16_dir.mkdir()
    config = json.loads((mixtral_dir / "config.json").read_text())
    (bf16_dir / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))
    assert checkpoint_dtype(bf16_dir) == torch.bfloat16
    expected = torch.bfloat16 if native(torch.bfloat16) else torch.float32
    assert resolve_dtype("auto", bf16_dir) == expected
    assert resolve_dtype("float32", bf16_dir) == torch.float32
    assert resolve_dtype("bfloat16", mixtral_dir) == torch.bfloat16


def test_bad_dtype_and_device_are_rejected(mixtral_dir: Path) -> None:
    with pytest.raises(ValueError, match="unknown dtype 'fp8'"):
        EngineConfig(dtype="fp8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        EngineConfig(device="tpu")  # type: ignore[arg-type]
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            EngineConfig(device="cuda")
    with pytest.raises(ValueError, match="num_threads"):
        EngineConfig(num_threads=0)
    for flag, value, message in [("--dtype", "fp8", "unknown dtype 'fp8'"), ("--device", "tpu", "unknown device")]:
        proc = subprocess.run([sys.executable, "-m", "moe_serve.cli", "generate", str(mixtral_dir), "--token-ids",
                               "5,6", flag, value], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_fresh_engines_are_bit_identical(mixtral_dir: Path) -> None:
    """30 engines built one after another in one process, with other thread counts and runs in between, give
    bit-identical logits: nothing an engine computes depends on what ran in the process before it."""
    [prompt] = random_prompts([23], 256)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, return_logits=True)
    first = None
    for i in range(30):
        torch.set_num_threads(1 + i % 2)  # what a test or another engine may leave behind
        engine = LLMEngine.from_pretrained(mixtral_dir)
        logits = torch.stack(engine.generate([prompt], params)[0].logits)
        if first is None:
            first = logits
        assert torch.equal(logits, first), f"engine {i} differs by {(logits - first).abs().max().item():.3g}"
    torch.set_num_threads(2)


LOAD_SCRIPT = """
import json, sys, torch
from moe_serve.model.loader import load_local_model
from moe_serve.model.config import ModelConfig
ModelConfig.from_dir(sys.argv[1])

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

base = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # peak RSS starts again from here
model = load_local_model(sys.argv[1], dtype=torch.bfloat16)
print(json.dumps({"base": base, "peak": rss("VmHWM:")}))
"""


def test_bf16_load_peak_rss(tmp_path: Path) -> None:
    """Loading a bf16 checkpoint converts one tensor (one expert) at a time: peak RSS stays within 1.2x the
    weights' bytes in bf16 above the process baseline."""
    model_dir = save_hf_model(tmp_path, "mixtral", dtype=torch.bfloat16, hidden_size=512, intermediate_size=1024,
                              num_hidden_layers=6, vocab_size=4096, max_position_embeddings=2048)
    weights = _checkpoint_numel(model_dir) * 2  # bytes in bf16
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(LOAD_SCRIPT), str(model_dir)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    sizes = json.loads(proc.stdout.strip().splitlines()[-1])
    grown = sizes["peak"] - sizes["base"]
    assert grown <= 1.2 * weights, f"loading grew RSS by {grown / 2**20:.1f} MiB for {weights / 2**20:.1f} MiB"
    print(f"loading grew RSS by {grown / 2**20:.1f} MiB for {weights / 2**20:.1f} MiB")


def _checkpoint_numel(model_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in model_dir.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                total += torch.Size(f.get_slice(key).get_shape()).numel()
    return total


ROPE_SCRIPT = """
import json, math, random, torch
torch.set_num_threads(2)  # a fresh process, several threads: where MKL VML's first call could race
from moe_serve.model.attention import Rotary
rotary = Rotary(128, 1e6, 32768)
rng = random.Random(0)
worst = 0
for _ in range(4000):
    p, i = rng.randrange(32768), rng.randrange(128)
    inv_freq = (1.0 / 1e6 ** (torch.arange(0, 128, 2, dtype=torch.int64).float() / 128))[i % 64]
    angle = float(torch.tensor(float(p)) * inv_freq)  # the float32 angle
    for table, fn in ((rotary.cos, math.cos), (rotary.sin, math.sin)):
        exact = torch.tensor(fn(angle), dtype=torch.float32)
        worst = max(worst, abs(float(table[p, i]) - float(exact)) / max(float(torch.finfo().eps * abs(exact)), 1e-45))
print(json.dumps({"worst_ulp": worst}))
"""


def test_rope_tables_are_exact_in_a_fresh_process() -> None:
    """The first RoPE tables of a process, built on two threads, are cos/sin of the float32 angles rounded once."""
    proc = subprocess.run([sys.executable, "-c", ROPE_SCRIPT], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["worst_ulp"] <= 0.5
