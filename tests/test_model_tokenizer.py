"""Tokenizer and tiny-checkpoint tests: `moe_serve.model.tokenizer` must agree with transformers on the same files."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, MixtralForCausalLM, PreTrainedTokenizerBase, Qwen2MoeForCausalLM

from moe_serve.model.tiny import make_tiny_model, train_tokenizer
from moe_serve.model.tokenizer import IncrementalDetokenizer, Tokenizer, TokenizerError

TEXTS = [
    "Hello, world!",
    "The router sends each token to 2 of 8 experts; the cache keeps 4,096 tokens.",
    "3.14159 + 2.71828 = 5.85987\n\tindented line",
    "naïve café — 東京",
    "emoji 🎉🚀 and Ωμέγα, Москва, ½ ∑ ∞",
    "",
]
CHAT = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "What is 17 times 23?"},
    {"role": "assistant", "content": "391."},
    {"role": "user", "content": "naïve café — 東京?"},
]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "mixtral", show_progress=False)


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_dir(model_dir)
    assert tokenizer is not None
    return tokenizer


@pytest.fixture(scope="module")
def ref(model_dir: Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(model_dir)


def copy_tokenizer_dir(src: Path, dst: Path) -> Path:
    """A directory holding only the tokenizer files of `src`, to be edited by a test."""
    dst.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, dst / name)
    return dst


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip_and_ids_match_transformers(tok: Tokenizer, ref: PreTrainedTokenizerBase, text: str) -> None:
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id
    assert tok.decode(ids) == text
    assert ids == ref.encode(text)
    assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(
    tok: Tokenizer, ref: PreTrainedTokenizerBase, add_generation_prompt: bool
) -> None:
    text = tok.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt)
    expected = ref.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == expected
    assert text.startswith("<s>") and text.endswith("<|assistant|>\n") == add_generation_prompt
    ids = tok.encode_chat(CHAT, add_generation_prompt=add_generation_prompt)
    expected_ids = ref.apply_chat_template(
        CHAT, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    assert ids == list(expected_ids)
    assert ids.count(tok.bos_token_id) == 1


def test_unknown_role_raises(tok: Tokenizer) -> None:
    with pytest.raises(ValueError, match="unknown role 'tool'"):
        tok.apply_chat_template([{"role": "tool", "content": "42"}])


@pytest.mark.parametrize(
    ("message", "problem"),
    [({"content": "hi"}, "'role'"), ({"role": "user"}, "'content'"), ({"role": "user", "content": None}, "'content'")],
)
def test_message_without_role_or_content_raises(tok: Tokenizer, message: dict[str, str | None], problem: str) -> None:
    with pytest.raises(ValueError, match=f"message 1 has no string {problem}"):
        tok.apply_chat_template([{"role": "user", "content": "ok"}, message])


def test_special_ids_and_vocab(tok: Tokenizer, model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert tok.vocab_size == config["vocab_size"] == 512
    assert tok.bos_token_id == config["bos_token_id"] == 1
    assert tok.eos_token_ids == (config["eos_token_id"],) == (2,)
    assert tok.has_chat_template


def test_eos_ids_include_generation_config_list(model_dir: Path, tmp_path: Path) -> None:
    copy = copy_tokenizer_dir(model_dir, tmp_path / "tok")
    (copy / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    tokenizer = Tokenizer.from_dir(copy)
    assert tokenizer is not None and tokenizer.eos_token_ids == (2, 5)


def test_from_dir_without_tokenizer_json_is_none(tmp_path: Path) -> None:
    assert Tokenizer.from_dir(tmp_path) is None


def test_corrupted_tokenizer_json_raises(model_dir: Path, tmp_path: Path) -> None:
    copy = copy_tokenizer_dir(model_dir, tmp_path / "tok")
    (copy / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": ')
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(copy)


def test_chat_template_jinja_file_wins_and_bad_template_raises(model_dir: Path, tmp_path: Path) -> None:
    copy = copy_tokenizer_dir(model_dir, tmp_path / "tok")
    (copy / "chat_template.jinja").write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    tokenizer = Tokenizer.from_dir(copy)
    assert tokenizer is not None
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}]) == "[hi]"
    (copy / "chat_template.jinja").write_text("{% for m in messages %}")
    with pytest.raises(TokenizerError, match="chat_template.jinja"):
        Tokenizer.from_dir(copy)


def test_fingerprint_follows_tokenizer_and_template(tok: Tokenizer, model_dir: Path, tmp_path: Path) -> None:
    copy = copy_tokenizer_dir(model_dir, tmp_path / "tok")
    same = Tokenizer.from_dir(copy)
    assert same is not None and same.fingerprint == tok.fingerprint
    assert len(tok.fingerprint) == 64
    (copy / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    changed = Tokenizer.from_dir(copy)
    assert changed is not None and changed.fingerprint != tok.fingerprint


@pytest.mark.parametrize("text", TEXTS[3:5])
def test_incremental_detokenizer_matches_decode(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    stream = IncrementalDetokenizer(tok)
    deltas = [stream.add(token_id) for token_id in ids]
    assert "".join(deltas) + stream.finish() == tok.decode(ids)
    assert not any("\ufffd" in delta for delta in deltas)
    assert "" in deltas  # multi-byte characters span tokens and are held back


def test_incremental_detokenizer_with_prompt_context(tok: Tokenizer) -> None:
    prompt = tok.encode("Bonjour from")
    generated = tok.encode(" 東京, naïve!", add_special_tokens=False)
    stream = IncrementalDetokenizer(tok, context=prompt)
    text = "".join(stream.add(token_id) for token_id in generated) + stream.finish()
    assert text == " 東京, naïve!"


def test_same_seed_same_bytes_other_seed_differs(model_dir: Path, tmp_path: Path) -> None:
    again = make_tiny_model(tmp_path / "again", seed=0, show_progress=False)
    other = make_tiny_model(tmp_path / "other", seed=1, show_progress=False)
    weights = (model_dir / "model.safetensors").read_bytes()
    assert (again / "model.safetensors").read_bytes() == weights
    assert (again / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != weights


def test_greedy_decoding_does_not_collapse(model_dir: Path, tok: Tokenizer) -> None:
    model = MixtralForCausalLM.from_pretrained(model_dir).eval()
    prompt = torch.tensor([tok.encode("The router sends each token")])
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=32, do_sample=False)
    assert len(set(out[0, prompt.shape[1] :].tolist())) >= 8


def test_qwen2_moe_loads_in_transformers(tmp_path: Path) -> None:
    path = make_tiny_model(tmp_path / "qwen", family="qwen2_moe", sliding_window=16, show_progress=False)
    model = Qwen2MoeForCausalLM.from_pretrained(path)
    assert model.config.num_experts == 8 and model.config.num_experts_per_tok == 2
    assert model.config.use_sliding_window and model.config.sliding_window == 16
    assert model.config.mlp_only_layers == [] and model.config.decoder_sparse_step == 1
    tokenizer = Tokenizer.from_dir(path)
    assert tokenizer is not None and tokenizer.vocab_size == model.config.vocab_size


def test_olmoe_tiny_model_matches_transformers_greedy(tmp_path: Path) -> None:
    from transformers import OlmoeForCausalLM

    from moe_serve.replicas.engine import LLMEngine
    from moe_serve.replicas.sampling import SamplingParams

    path = make_tiny_model(tmp_path / "olmoe", family="olmoe", show_progress=False)
    model = OlmoeForCausalLM.from_pretrained(path).eval()
    assert model.config.num_experts == 8 and model.config.num_experts_per_tok == 2
    prompt = Tokenizer.from_dir(path).encode("The router sends each token")
    with torch.no_grad():
        expected = model.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12, do_sample=False)
    [ours] = LLMEngine.from_pretrained(path).generate([prompt], SamplingParams(max_tokens=12, temperature=0,
                                                                               ignore_eos=True))
    assert ours.token_ids == expected[0, len(prompt):].tolist()
    with pytest.raises(ValueError, match="sliding-window"):
        make_tiny_model(tmp_path / "windowed", family="olmoe", sliding_window=16, show_progress=False)


def test_large_vocab_is_padded_to_exact_size() -> None:
    tokenizer = train_tokenizer(8192)
    assert tokenizer.get_vocab_size() == 8192
    assert tokenizer.decode(tokenizer.encode("cache hit").ids) == "cache hit"


@pytest.mark.parametrize(
    ("kwargs", "bad"),
    [
        ({"top_k": 9}, "top_k"),
        ({"hidden": 66}, "hidden"),
        ({"kv_heads": 3}, "heads"),
        ({"vocab": 100}, "vocab"),
        ({"family": "llama"}, "family"),
        ({"layers": 0}, "layers"),
    ],
)
def test_bad_arguments_raise(tmp_path: Path, kwargs: dict[str, object], bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        make_tiny_model(tmp_path / "bad", show_progress=False, **kwargs)
    assert not (tmp_path / "bad").exists()
