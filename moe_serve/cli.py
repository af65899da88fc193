"""`moe-serve` command line: make a tiny model, generate from a checkpoint.

The CLI sits on top of the rooms and wires them together; no room imports it. Every command prints
machine-readable JSON on stdout; errors go to stderr as one line naming the problem, with exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from moe_serve.cluster.placement import STRATEGIES, PlacementError
from moe_serve.model.checkpoint import CheckpointError
from moe_serve.model.config import ModelConfigError
from moe_serve.model.dtype import DEVICE_NAMES, DTYPE_NAMES, check_device, check_dtype_name, dtype_name
from moe_serve.model.tiny import FAMILIES

PLACEMENTS = [s.lower() for s in STRATEGIES]  # --placement choices of generate and up


def _parse_token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"--token-ids must be comma-separated integers ({exc})") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moe-serve", description="Serve Mixture-of-Experts models on Ray")
    commands = parser.add_subparsers(dest="command", required=True)

    tiny = commands.add_parser("make-tiny-model", help="write a small random checkpoint in Hugging Face layout")
    tiny.add_argument("out_dir")
    tiny.add_argument("--family", choices=FAMILIES, default="mixtral")
    tiny.add_argument("--layers", type=int, default=2)
    tiny.add_argument("--hidden", type=int, default=64)
    tiny.add_argument("--experts", type=int, default=8)
    tiny.add_argument("--top-k", type=int, default=2)
    tiny.add_argument("--vocab", type=int, default=512)
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--sliding-window", type=int, default=None)

    gen = commands.add_parser("generate", help="generate from a prompt and print one JSON object")
    gen.add_argument("model_dir")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="prompt text (needs tokenizer.json in the model directory)")
    source.add_argument("--token-ids", type=_parse_token_ids, help="comma-separated prompt token ids")
    gen.add_argument("--chat", action="store_true", help="wrap --prompt as a user message in the chat template")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--logprobs", type=int, default=None, metavar="N",
                     help="add each generated token's logprob and its N most likely alternatives to the JSON")
    gen.add_argument("--quantize", choices=["none", "int8", "int4"], default="none")
    _add_engine_arguments(gen)
    gen.add_argument("--in-process", action="store_true", help="run experts in this process (the default)")
    gen.add_argument("--shards", type=int, default=0, help="spread experts over N shard actors on Ray")
    gen.add_argument("--placement", choices=PLACEMENTS, default="pack",
                     help="how shard bundles are placed across nodes")
    gen.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    gen.add_argument("--capacity-factor", type=float, default=None,
                     help="cap tokens per expert (overflow goes to the next-best expert); default: dropless")
    gen.add_argument("--cache", default=None, metavar="redis://HOST:PORT/DB",
                     help="tiered prompt-prefix KV cache: hot in memory, warm in this Redis (rediss:// for TLS, "
                          "a cluster node or seed list host:port,host:port; secrets from $MOE_SERVE_REDIS_*)")
    gen.add_argument("--cold-cache", default=None, metavar="URL|DIR", help="cold tier: a second Redis or a directory")
    gen.add_argument("--auto-rebalance", type=int, default=None, metavar="CALLS",
                     help="every CALLS layer calls, copy hot experts to less-loaded shards when load is uneven")
    up = commands.add_parser("up", help="start Ray, the model and the OpenAI-compatible Serve app; Ctrl-C stops")
    up.add_argument("model_dir", nargs="?", default=None, help="default: the embedded tiny model")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=8000)
    up.add_argument("--model-name", default=None, help="name in /v1/models (default: the directory name)")
    up.add_argument("--quantize", choices=["none", "int8", "int4"], default="none")
    _add_engine_arguments(up)
    up.add_argument("--min-replicas", type=int, default=1)
    up.add_argument("--max-replicas", type=int, default=2)
    up.add_argument("--api-key", default=None, help="require this bearer token (default: $MOE_SERVE_API_KEY)")
    up.add_argument("--redis", default=None, metavar="URL|auto|off",
                    help="warm cache tier, as --cache of generate; default: $MOE_SERVE_REDIS_URL, else a child "
                         "redis-server (auto)")
    up.add_argument("--shards", type=int, default=0,
                    help="experts on N shard actors shared by all replicas (one GPU each where there are GPUs)")
    up.add_argument("--placement", choices=PLACEMENTS, default="pack")
    up.add_argument("--colocate", action="store_true",
                    help="each ingress replica holds its engine (fewer hops per streamed token; no prefix affinity)")

    prune = commands.add_parser(
        "prune", help="drop the least used experts of every MoE layer and write the smaller checkpoint",
        description="Run calibration prompts through the model, count the tokens routed to each expert (and the gate "
                    "probability mass it gets) per layer, keep the K most used experts and write a Hugging Face "
                    "checkpoint with K experts. Prints the usage, bytes saved and, on held-out prompts, KL "
                    "divergence and greedy agreement against the full model.")
    prune.add_argument("model_dir")
    prune.add_argument("out_dir", help="new or empty directory for the pruned checkpoint")
    prune.add_argument("--keep-experts", type=int, required=True, metavar="K",
                       help="experts kept per MoE layer (top-k <= K <= experts)")
    prune.add_argument("--per-layer", action="store_true",
                       help="each layer keeps its own K most used experts (default: the same experts in every "
                            "layer, ranked by usage summed over layers)")
    calibration = prune.add_mutually_exclusive_group(required=True)
    calibration.add_argument("--calibration", type=Path, metavar="FILE",
                             help="text file, one prompt per line; every 5th line is held out for the report")
    calibration.add_argument("--prompts", type=_checked(_int_at_least(1)), metavar="N",
                             help="N prompts of random token ids (for models without a tokenizer; a poor "
                                  "calibration set: random ids spread load far more evenly than real text)")
    prune.add_argument("--eval-prompts", type=_checked(_int_at_least(0)), default=16, metavar="M",
                       help="held-out prompts the quality report runs (0: no report)")
    prune.add_argument("--prompt-tokens", type=_checked(_int_at_least(1)), default=128, metavar="L",
                       help="length of random prompts; file prompts are cut to it")
    prune.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    prune.add_argument("--dtype", type=_checked(check_dtype_name), default="auto", metavar="|".join(DTYPE_NAMES),
                       help="dtype the model runs in while measuring (the checkpoint keeps its own)")

    state = commands.add_parser("status", help="replicas, shards, expert load and cache stats of a running app")
    state.add_argument("--address", default=None,
                       help="Ray address; default: the one `moe-serve up` recorded, else auto")
    return parser


def _add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--expert-memory", type=_checked(parse_bytes), default=None, metavar="BYTES",
                        help="keep at most this many bytes of expert weights resident (K, M, G suffixes: powers of "
                             "1024), loading experts from the checkpoint on first use; per shard with --shards; "
                             "default: every expert resident")
    parser.add_argument("--dtype", type=_checked(check_dtype_name), default="auto", metavar="|".join(DTYPE_NAMES),
                        help="serving dtype; auto (default): the checkpoint's where this hardware computes it "
                             "natively (bf16 with AVX512-BF16 or AMX), else float32")
    parser.add_argument("--device", type=_checked(check_device), default="cpu", metavar="|".join(DEVICE_NAMES),
                        help="where the dense part and KV cache live (default cpu)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch and kernel threads of the engine (default: the cores this process may use; "
                             "1 for models with hidden size under 1024)")


def parse_bytes(value: str) -> int:
    """"1073741824", "1024M", "1G", "1.5GiB" -> bytes; ValueError naming the value otherwise."""
    text = value.strip().upper().removesuffix("IB").removesuffix("B")
    scale = 1024 ** ("KMGT".index(text[-1]) + 1) if text and text[-1] in "KMGT" else 1
    try:
        number = float(text[:-1] if scale > 1 else text)
    except ValueError:
        raise ValueError(f"not a byte count: {value!r} (e.g. 2147483648, 2048M, 2G)") from None
    if number <= 0:
        raise ValueError(f"a byte count must be positive, got {value!r}")
    return int(number * scale)


def _checked(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from a check that raises ValueError naming the problem (argparse prints it, exit 2)."""
    def parse(value: str) -> Any:
        try:
            return check(value)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from exc
    return parse


def _int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise ValueError(f"not an integer: {value!r}") from None
        if number < minimum:
            raise ValueError(f"must be at least {minimum}, got {number}")
        return number
    return parse


def cmd_up(args: argparse.Namespace) -> dict:
    from moe_serve.up import run_up

    settings = {
        "model_dir": args.model_dir, "model_name": args.model_name, "quantize": args.quantize,
        "dtype": args.dtype, "device": args.device, "threads": args.threads,
        "api_key": args.api_key, "shards": args.shards, "placement": args.placement, "colocated": args.colocate,
        "expert_memory_bytes": args.expert_memory,
        "autoscaling": {"min_replicas": args.min_replicas, "max_replicas": args.max_replicas},
    }
    run_up(settings, args.host, args.port, args.redis or os.environ.get("MOE_SERVE_REDIS_URL") or "auto")
    return {"stopped": True}


def cmd_status(args: argparse.Namespace) -> dict:
    from moe_serve.up import status

    return status(args.address)


def cmd_make_tiny_model(args: argparse.Namespace) -> dict:
    from moe_serve.model.tiny import make_tiny_model

    out = make_tiny_model(
        args.out_dir, family=args.family, layers=args.layers, hidden=args.hidden, experts=args.experts,
        top_k=args.top_k, vocab=args.vocab, seed=args.seed, sliding_window=args.sliding_window,
    )
    return {"model_dir": str(out), "family": args.family}


def cmd_generate(args: argparse.Namespace) -> dict:
    from moe_serve.replicas.engine import EngineConfig, LLMEngine
    from moe_serve.replicas.sampling import SamplingParams

    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, stop=tuple(args.stop), ignore_eos=args.ignore_eos, logprobs=args.logprobs,
    )
    if args.shards and args.in_process:
        raise ValueError("--in-process and --shards exclude each other")
    expert_parallel = _start_expert_parallel(args) if args.shards else None
    cache = None
    if args.cache or args.cold_cache:
        from moe_serve.cache import CacheConfig

        cache = CacheConfig(warm_url=args.cache, cold_url=args.cold_cache)
    engine_config = EngineConfig(quantize=args.quantize, dtype=args.dtype, device=args.device,
                                 num_threads=args.threads, cache=cache, expert_memory_bytes=args.expert_memory)
    engine = LLMEngine.from_pretrained(args.model_dir, engine_config, moe=expert_parallel)
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("prompt is empty: give some text or --token-ids")
    if args.token_ids is not None:
        prompt_ids = args.token_ids
    elif engine.tokenizer is None:
        raise ValueError(f"{args.model_dir} has no tokenizer.json: pass --token-ids instead of --prompt")
    elif args.chat:
        prompt_ids = engine.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    else:
        prompt_ids = engine.tokenizer.encode(args.prompt)
    start = time.perf_counter()
    [out] = engine.generate([prompt_ids], params)
    elapsed = time.perf_counter() - start
    if engine.prefix_cache is not None:
        engine.prefix_cache.close()  # finish the writes behind the request before the process ends
    result: dict = {
        "token_ids": out.token_ids,
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": len(out.token_ids),
        "cached_tokens": out.cached_tokens,
        "cached_tokens_by_tier": out.cached_tokens_by_tier,
        "finish_reason": out.finish_reason,
        "ttft_s": round(out.ttft_s or 0.0, 6),
        "tokens_per_s": round(len(out.token_ids) / elapsed, 2),
        "mode": "distributed" if expert_parallel else "in-process",
        "quantize": args.quantize,
        "dtype": dtype_name(engine.model.dtype),
    }
    if expert_parallel is not None:
        result["placement"] = expert_parallel.describe()
        expert_parallel.shutdown()
    if out.text is not None:
        result["text"] = out.text
    if out.logprobs is not None:
        result["logprobs"] = [{"token_id": token, "logprob": lp.logprob, "top": [list(t) for t in lp.top]}
                              for token, lp in zip(out.token_ids, out.logprobs, strict=True)]
    return result


def cmd_prune(args: argparse.Namespace) -> dict:
    from moe_serve.model.config import ModelConfig
    from moe_serve.model.dtype import resolve_dtype
    from moe_serve.model.prune import check_dirs, check_keep, prompts_from_file, prune, random_prompt_set
    from moe_serve.model.tokenizer import Tokenizer

    model_dir, out_dir = Path(args.model_dir), Path(args.out_dir)
    check_dirs(model_dir, out_dir)
    config = ModelConfig.from_dir(model_dir)
    check_keep(config, args.keep_experts)
    if args.prompt_tokens > config.max_position_embeddings:
        raise ValueError(f"--prompt-tokens {args.prompt_tokens} is more than the model's "
                         f"{config.max_position_embeddings} positions")
    if args.calibration is not None:
        prompts = prompts_from_file(args.calibration, Tokenizer.from_dir(model_dir), args.prompt_tokens,
                                    args.eval_prompts)
    else:
        prompts = random_prompt_set(args.prompts, args.eval_prompts, args.prompt_tokens, config.vocab_size, args.seed)
    return prune(model_dir, out_dir, args.keep_experts, args.per_layer, prompts,
                 resolve_dtype(args.dtype, model_dir))


def _start_expert_parallel(args: argparse.Namespace):  # noqa: ANN202 - returns router.deploy.ExpertParallel
    from moe_serve.cluster.bringup import connect_ray
    from moe_serve.router.deploy import start_expert_parallel
    from moe_serve.router.router import RouterConfig

    connect_ray(args.address)
    return start_expert_parallel(
        args.model_dir, args.shards, strategy=args.placement, quantize=args.quantize,
        expert_memory_bytes=args.expert_memory,
        router_config=RouterConfig(capacity_factor=args.capacity_factor, auto_rebalance_every=args.auto_rebalance),
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    handler = {"make-tiny-model": cmd_make_tiny_model, "generate": cmd_generate, "up": cmd_up,
               "status": cmd_status, "prune": cmd_prune}[args.command]
    try:
        result = handler(args)
    except (ValueError, ModelConfigError, CheckpointError, PlacementError, FileNotFoundError, ConnectionError) as exc:
        print(f"moe-serve {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
