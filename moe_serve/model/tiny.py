"""Small, randomly initialised Mixture-of-Experts checkpoints in Hugging Face layout, for tests and benchmarks.

Owns: training a byte-level BPE tokenizer on the bundled corpus (`moe_serve/data/corpus.txt`), building a seeded
random Mixtral or Qwen2-MoE model with `transformers`, and writing config.json, model.safetensors,
generation_config.json, tokenizer.json and tokenizer_config.json. The same arguments give byte-identical files.
Does not own: loading checkpoints for serving. `transformers` is a test/reference dependency, so it is imported
only when a model is made.
"""

import itertools
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import tokenizers
import torch
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

Family = Literal["mixtral", "qwen2_moe", "olmoe"]
FAMILIES: tuple[Family, ...] = ("mixtral", "qwen2_moe", "olmoe")

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
CHAT_ROLES = ("system", "user", "assistant")
# Ids 0, 1, 2, ... in this order: unk 0, bos 1, eos 2, then one marker per chat role.
SPECIAL_TOKENS = (UNK, BOS, EOS, *(f"<|{role}|>" for role in CHAT_ROLES))
BYTE_ALPHABET = tuple(sorted(pre_tokenizers.ByteLevel.alphabet()))
MIN_VOCAB = len(SPECIAL_TOKENS) + len(BYTE_ALPHABET)

# Weights are drawn from N(0, (INIT_GAIN / sqrt(hidden))^2): 0.2 at hidden=64, ten times transformers' 0.02,
# which leaves a narrow model with near-tied logits, so greedy decoding repeats one token. With this gain the
# logits have std ~1.6 at any width, greedy continuations vary, and each step has a clear winner.
INIT_GAIN = 1.6

# Rendered with trim_blocks/lstrip_blocks, like every Hugging Face template:
# "<s><|system|>\nS\n<|user|>\nU\n<|assistant|>\nA</s>\n" and, with add_generation_prompt, "<|assistant|>\n".
CHAT_TEMPLATE = """{{ bos_token }}{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception("unknown role '" + message['role'] + "': expected system, user or assistant") }}
    {% endif %}
<|{{ message['role'] }}|>
{{ message['content'] }}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}

{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% endif %}
"""


@dataclass(frozen=True)
class TinySpec:
    """Everything that determines a tiny checkpoint; validated on construction."""

    family: Family
    layers: int
    hidden: int
    experts: int
    top_k: int
    vocab: int
    seed: int
    intermediate: int
    heads: int
    kv_heads: int
    sliding_window: int | None
    max_position_embeddings: int

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        for name in ("layers", "hidden", "experts", "top_k", "intermediate", "heads", "kv_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.top_k > self.experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= experts ({self.experts})")
        if self.hidden % self.heads:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by heads ({self.heads})")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be divisible by kv_heads ({self.kv_heads})")
        if self.vocab < MIN_VOCAB:
            raise ValueError(f"vocab must be >= {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} specials)")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"sliding_window must be >= 1 or None, got {self.sliding_window}")
        if self.max_position_embeddings < 1:
            raise ValueError(f"max_position_embeddings must be >= 1, got {self.max_position_embeddings}")


def make_tiny_model(
    out_dir: str | Path,
    family: Family = "mixtral",
    layers: int = 2,
    hidden: int = 64,
    experts: int = 8,
    top_k: int = 2,
    vocab: int = 512,
    seed: int = 0,
    intermediate: int | None = None,
    heads: int = 4,
    kv_heads: int = 2,
    sliding_window: int | None = None,
    max_position_embeddings: int = 8192,
    show_progress: bool = True,
) -> Path:
    """Write a random checkpoint with its tokenizer to `out_dir` and return it.

    `intermediate` is each expert's FFN width (default 2 * hidden); Qwen2-MoE's shared expert is twice that.
    """
    spec = TinySpec(
        family=family,
        layers=layers,
        hidden=hidden,
        experts=experts,
        top_k=top_k,
        vocab=vocab,
        seed=seed,
        intermediate=intermediate if intermediate is not None else 2 * hidden,
        heads=heads,
        kv_heads=kv_heads,
        sliding_window=sliding_window,
        max_position_embeddings=max_position_embeddings,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=3, desc=f"tiny {family}", disable=not show_progress) as bar:
        bar.set_postfix_str("training tokenizer")
        tokenizer = train_tokenizer(spec.vocab)
        bar.update()
        bar.set_postfix_str("initialising model")
        model = _init_model(spec)
        bar.update()
        bar.set_postfix_str("saving")
        _save(out, spec, model, tokenizer)
        bar.update()
    return out


def train_tokenizer(vocab: int) -> tokenizers.Tokenizer:
    """A byte-level BPE tokenizer with exactly `vocab` ids, trained on the bundled corpus; deterministic."""
    tokenizer = tokenizers.Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=list(BYTE_ALPHABET),
        show_progress=False,
    )
    corpus = files("moe_serve").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    tokenizer.train_from_iterator(corpus.splitlines(keepends=True), trainer)
    tokenizer = _pad_vocab(tokenizer, vocab)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS}:0 $A:0", pair=f"{BOS}:0 $A:0 {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer


def _pad_vocab(tokenizer: tokenizers.Tokenizer, vocab: int) -> tokenizers.Tokenizer:
    """Fill the ids the corpus cannot teach (a few thousand merges at most) with unreachable byte strings.

    They decode to their bytes like any other token, but no merge ever produces them.
    """
    missing = vocab - tokenizer.get_vocab_size()
    if missing <= 0:
        return tokenizer
    data = json.loads(tokenizer.to_str())
    table: dict[str, int] = data["model"]["vocab"]
    candidates = ("".join(chars) for n in (2, 3) for chars in itertools.product(BYTE_ALPHABET, repeat=n))
    fillers = itertools.islice((token for token in candidates if token not in table), missing)
    table.update((token, len(table)) for token in list(fillers))
    return tokenizers.Tokenizer.from_str(json.dumps(data))


def _init_model(spec: TinySpec) -> "PreTrainedModel":
    """The random model; seeded from `spec.seed` without touching the caller's RNG state."""
    from transformers import MixtralForCausalLM, OlmoeForCausalLM, Qwen2MoeForCausalLM

    make_config, model_cls = {
        "mixtral": (_mixtral_config, MixtralForCausalLM),
        "qwen2_moe": (_qwen2_moe_config, Qwen2MoeForCausalLM),
        "olmoe": (_olmoe_config, OlmoeForCausalLM),
    }[spec.family]
    config = make_config(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = model_cls(config)
    return model.eval()


def _common_config(spec: TinySpec) -> dict[str, object]:
    return dict(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        num_experts_per_tok=spec.top_k,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=INIT_GAIN / math.sqrt(spec.hidden),
        bos_token_id=SPECIAL_TOKENS.index(BOS),
        eos_token_id=SPECIAL_TOKENS.index(EOS),
        pad_token_id=SPECIAL_TOKENS.index(EOS),
        tie_word_embeddings=False,
    )


def _mixtral_config(spec: TinySpec) -> "PreTrainedConfig":
    from transformers import MixtralConfig

    return MixtralConfig(
        **_common_config(spec),
        intermediate_size=spec.intermediate,
        num_local_experts=spec.experts,
        sliding_window=spec.sliding_window,
    )


def _qwen2_moe_config(spec: TinySpec) -> "PreTrainedConfig":
    from transformers import Qwen2MoeConfig

    window = {"use_sliding_window": True, "sliding_window": spec.sliding_window} if spec.sliding_window else {}
    return Qwen2MoeConfig(
        **_common_config(spec),
        **window,
        intermediate_size=2 * spec.intermediate,  # dense MLP of mlp_only_layers (none here)
        moe_intermediate_size=spec.intermediate,
        shared_expert_intermediate_size=2 * spec.intermediate,
        num_experts=spec.experts,
        decoder_sparse_step=1,
        mlp_only_layers=[],
    )


def _olmoe_config(spec: TinySpec) -> "PreTrainedConfig":
    from transformers import OlmoeConfig

    if spec.sliding_window:
        raise ValueError("olmoe has no sliding-window attention")
    return OlmoeConfig(**_common_config(spec), intermediate_size=spec.intermediate, num_experts=spec.experts)


def _save(out: Path, spec: TinySpec, model: "PreTrainedModel", tokenizer: tokenizers.Tokenizer) -> None:
    with _without_transformers_progress():
        model.save_pretrained(out, safe_serialization=True)
    tokenizer.save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "unk_token": UNK,
        "pad_token": EOS,
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_position_embeddings,
        "chat_template": CHAT_TEMPLATE,
    }
    generation_config = {
        "bos_token_id": SPECIAL_TOKENS.index(BOS),
        "eos_token_id": SPECIAL_TOKENS.index(EOS),
        "pad_token_id": SPECIAL_TOKENS.index(EOS),
        "do_sample": False,
    }
    _write_json(out / "tokenizer_config.json", tokenizer_config)
    _write_json(out / "generation_config.json", generation_config)


@contextmanager
def _without_transformers_progress() -> Iterator[None]:
    """Hide transformers' own shard bar (ours already shows the save step), then restore its setting."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()


def _write_json(path: Path, data: dict[str, object]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
