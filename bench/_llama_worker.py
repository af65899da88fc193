"""Time llama.cpp (llama-cpp-python's bindings, built for this CPU) on one batch of token-id prompts; run by
bench/engine.py inside bench/.venv-llama.

Contract: reads a JSON job file (model_dir, prompts, max_tokens, dtype, quant, threads, gguf_dir, warmup_tokens,
repeats, extra_bufts), writes the checkpoint's GGUF once into gguf_dir (bench/gguf_export.py; Q8_0 and Q4_0 by
llama.cpp's quantizer from the bf16 file), loads it, warms up with a short run and times `repeats` greedy runs of
all prompts as parallel sequences of one llama.cpp context (every prompt prefilled in one batch, then one token per
sequence per step, greedy argmax over each sequence's logits, EOS ignored), and prints the median run as
`BENCH_RESULT <json>` on stdout. llama.cpp's logs go to stderr. It imports nothing from moe_serve.
extra_bufts: llama.cpp's repacked weight buffers (its CPU_REPACK / AMX layouts), off unless asked for: on the
AMX machine they crashed `llama_decode` on the quantized MoE.
"""

from __future__ import annotations

import ctypes
import json
import sys
import time
from pathlib import Path
from typing import Any

import llama_cpp as ll
import numpy as np

from gguf_export import export

RESULT_PREFIX = "BENCH_RESULT "
QUANT_FTYPES = {"q8_0": ll.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": ll.LLAMA_FTYPE_MOSTLY_Q4_0}


def ensure_gguf(model_dir: Path, gguf_dir: Path, dtype: str, quant: str, threads: int) -> Path:
    """The checkpoint's GGUF in `dtype`, or quantized to `quant` from the bf16 one; made once."""
    gguf_dir.mkdir(parents=True, exist_ok=True)
    base = gguf_dir / f"{model_dir.name}-{'bf16' if quant != 'none' else dtype}.gguf"
    if not base.is_file():
        export(model_dir, base, "bfloat16" if quant != "none" else dtype)
    if quant == "none":
        return base
    out = gguf_dir / f"{model_dir.name}-{quant}.gguf"
    if not out.is_file():
        params = ll.llama_model_quantize_default_params()
        params.ftype, params.nthread = QUANT_FTYPES[quant], threads
        tmp = out.with_suffix(".tmp")
        if ll.llama_model_quantize(str(base).encode(), str(tmp).encode(), ctypes.byref(params)) != 0:
            raise RuntimeError(f"llama_model_quantize to {quant} failed")
        tmp.replace(out)
    return out


class Session:
    """One llama.cpp model and context with a sequence slot per prompt."""

    def __init__(self, path: Path, n_seqs: int, max_len: int, threads: int, extra_bufts: bool) -> None:
        ll.llama_backend_init()
        mparams = ll.llama_model_default_params()
        mparams.use_extra_bufts = extra_bufts
        self.model = ll.llama_model_load_from_file(str(path).encode(), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = n_seqs * max_len
        cparams.n_batch = max(512, n_seqs * max_len)
        cparams.n_seq_max = n_seqs
        cparams.n_threads = cparams.n_threads_batch = threads
        self.ctx = ll.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise RuntimeError("llama.cpp could not create a context")
        self.n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(self.model))
        self.batch = ll.llama_batch_init(cparams.n_batch, 0, 1)

    def _decode(self, items: list[tuple[int, int, int, bool]]) -> None:
        """items: (token, position, sequence, wants logits)."""
        b = self.batch
        b.n_tokens = len(items)
        for i, (token, pos, seq, logits) in enumerate(items):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
            b.seq_id[i][0] = seq
        if ll.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")

    def _argmax(self, i: int) -> int:
        return int(np.ctypeslib.as_array(ll.llama_get_logits_ith(self.ctx, i), shape=(self.n_vocab,)).argmax())

    def generate(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, list[list[int]], list[float]]:
        """Greedy run of every prompt: wall seconds, generated ids and TTFT per prompt."""
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        start = time.perf_counter()
        prefill = [(tok, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, tok in enumerate(p)]
        self._decode(prefill)
        last = np.cumsum([len(p) for p in prompts]) - 1
        out = [[self._argmax(int(i))] for i in last]
        ttft = [time.perf_counter() - start] * len(prompts)
        for step in range(1, max_tokens):
            self._decode([(ids[-1], len(p) + step - 1, s, True) for s, (p, ids) in enumerate(zip(prompts, out))])
            for s, ids in enumerate(out):
                ids.append(self._argmax(s))
        return time.perf_counter() - start, out, ttft


def main(job_path: str) -> None:
    job: dict[str, Any] = json.loads(Path(job_path).read_text())
    prompts: list[list[int]] = job["prompts"]
    max_tokens: int = job["max_tokens"]
    threads: int = job["threads"]
    gguf = ensure_gguf(Path(job["model_dir"]), Path(job["gguf_dir"]), job["dtype"], job["quant"], threads)
    t0 = time.perf_counter()
    session = Session(gguf, len(prompts), max(map(len, prompts)) + max_tokens, threads, job.get("extra_bufts", False))
    load_s = time.perf_counter() - t0
    session.generate(prompts, job["warmup_tokens"])
    runs = [session.generate(prompts, max_tokens) for _ in range(job.get("repeats", 1))]
    wall_s, token_ids, ttft_s = sorted(runs, key=lambda run: run[0])[len(runs) // 2]
    result = {
        "llama_cpp_python_version": ll.__version__,
        "system_info": ll.llama_print_system_info().decode(errors="replace"),
        "gguf": gguf.name,
        "quant": job["quant"],
        "dtype": job["dtype"],
        "extra_bufts": job.get("extra_bufts", False),
        "threads": threads,
        "load_s": load_s,
        "wall_s": wall_s,
        "wall_s_all": [run[0] for run in runs],
        "ttft_s": ttft_s,
        "token_ids": token_ids,
    }
    sys.stdout.flush()
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
