"""Text <-> token ids for one model directory, in Hugging Face layout.

Owns: loading `tokenizer.json` (through the `tokenizers` library), the special tokens and chat template from
`tokenizer_config.json` / `chat_template.jinja`, the eos ids from `generation_config.json`, rendering chats the way
`transformers.apply_chat_template` does, and streaming detokenization.
Does not own: model weights, sampling, or deciding when a sequence stops (it only reports the eos ids).
Never imports `transformers`: serving must not depend on it; the tests compare against it.
"""

import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
GENERATION_CONFIG_FILE = "generation_config.json"

# The named special tokens transformers passes to chat templates (`special_tokens_map`).
SPECIAL_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Decoding a token that ends inside a UTF-8 character yields this; the streamer waits for the rest.
REPLACEMENT_CHAR = "\ufffd"
# Tokens of the prompt the streamer decodes with the first new token, so that decoders which strip a leading
# space at the start of a text (SentencePiece's Metaspace) see it mid-text.
STREAM_CONTEXT_TOKENS = 5


class TokenizerError(ValueError):
    """A tokenizer file or chat template that cannot be used; the message names the file."""


class Tokenizer:
    """Encode, decode and render chats for one model; build it with `Tokenizer.from_dir`."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        chat_template: str | None,
        template_source: str,
        special_tokens: Mapping[str, str],
        bos_token_id: int | None,
        eos_token_ids: tuple[int, ...],
        fingerprint: str,
    ) -> None:
        self._backend = backend
        self._template_source = template_source
        self._compiled = _compile_template(chat_template, template_source) if chat_template else None
        self._special_tokens = dict(special_tokens)
        self._bos_token_id = bos_token_id
        self._eos_token_ids = eos_token_ids
        self._fingerprint = fingerprint

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> "Tokenizer | None":
        """Load the tokenizer of `model_dir`; None when it has no tokenizer.json (tokenizer files are optional)."""
        root = Path(model_dir)
        path = root / TOKENIZER_FILE
        if not path.is_file():
            return None
        raw = path.read_bytes()
        backend = _load_backend(path, raw)
        config = _read_json(root / TOKENIZER_CONFIG_FILE)
        template, template_source = _read_template(root, config)
        special = _special_tokens(config)
        generation = _read_json(root / GENERATION_CONFIG_FILE)
        bos_id = _token_id(backend, special.get("bos_token"))
        return cls(
            backend,
            chat_template=template,
            template_source=template_source,
            special_tokens=special,
            bos_token_id=bos_id if bos_id is not None else _optional_int(generation.get("bos_token_id")),
            eos_token_ids=_eos_token_ids(backend, special, generation),
            fingerprint=_fingerprint(raw, template),
        )

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: the tokenizer's eos token and generation_config's eos_token_id."""
        return self._eos_token_ids

    @property
    def fingerprint(self) -> str:
        """sha256 hex of tokenizer.json and the chat template: equal fingerprints tokenize identically."""
        return self._fingerprint

    @property
    def has_chat_template(self) -> bool:
        return self._compiled is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render `messages` to the prompt text, with the same variables and filters as transformers."""
        if self._compiled is None:
            raise TokenizerError(f"{self._template_source}: the model has no chat template")
        chat = _check_messages(messages)
        try:
            return self._compiled.render(
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._special_tokens,
            )
        except jinja2.TemplateError as err:
            raise ValueError(f"chat template ({self._template_source}) rejected the conversation: {err}") from err

    def encode_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the rendered chat; the template writes its own special tokens, so none are added."""
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)


class IncrementalDetokenizer:
    """Turn generated ids into text deltas for streaming, never emitting half a UTF-8 character.

    The concatenation of every `add` result and the final `finish` equals `decode(context + ids)[len(context):]`
    for a context that decodes cleanly; text ending in U+FFFD is held back until a later token completes it.
    """

    def __init__(
        self, tokenizer: Tokenizer, context: Sequence[int] = (), skip_special_tokens: bool = True
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._window = list(context)[-STREAM_CONTEXT_TOKENS:] if context else []
        self._read = len(self._window)  # window[:read] is already emitted (or context)

    def add(self, token_id: int) -> str:
        """Append one id; return the newly completed text (possibly "")."""
        self._window.append(token_id)
        emitted = self._decode(self._window[: self._read])
        text = self._decode(self._window)
        if len(text) <= len(emitted) or text.endswith(REPLACEMENT_CHAR):
            return ""
        self._window = self._window[self._read :]
        self._read = len(self._window)
        return text[len(emitted) :]

    def finish(self) -> str:
        """Flush whatever is held back, incomplete characters included; the stream is over."""
        emitted = self._decode(self._window[: self._read])
        text = self._decode(self._window)
        self._window = self._window[self._read :]
        self._read = len(self._window)
        return text[len(emitted) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special) if ids else ""


def _load_backend(path: Path, raw: bytes) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as err:  # bytes that are not UTF-8, or the bare Exception tokenizers raises on bad JSON
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({err})") from err


def _read_json(path: Path) -> dict[str, Any]:
    """The JSON object in `path`, {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise TokenizerError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_template(root: Path, config: Mapping[str, Any]) -> tuple[str | None, str]:
    """The chat template and the file it came from; chat_template.jinja wins, as in transformers."""
    jinja_path = root / CHAT_TEMPLATE_FILE
    if jinja_path.is_file():
        return jinja_path.read_text(encoding="utf-8"), str(jinja_path)
    source = str(root / TOKENIZER_CONFIG_FILE)
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template, source
    if isinstance(template, list):  # legacy form: [{"name": ..., "template": ...}, ...]
        named = {entry.get("name"): entry.get("template") for entry in template if isinstance(entry, dict)}
        if isinstance(named.get("default"), str):
            return named["default"], source
    raise TokenizerError(f"{source}: chat_template must be a string or a list with a 'default' entry")


def _compile_template(template: str, source: str) -> jinja2.Template:
    """Compile like transformers' `_cached_compile_jinja_template`: sandboxed, trimmed, same globals."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise TokenizerError(f"{source}: chat template does not compile (line {err.lineno}: {err.message})") from err


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _check_messages(messages: list[dict[str, str]]) -> list[dict[str, str]]:
    """Copies of `messages` without None values (as transformers does); each must have string role and content."""
    if not messages:
        raise ValueError("a chat needs at least one message")
    chat = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"message {index} must be an object with 'role' and 'content', got {message!r}")
        clean = {key: value for key, value in message.items() if value is not None}
        for key in ("role", "content"):
            if not isinstance(clean.get(key), str):
                raise ValueError(f"message {index} has no string {key!r}: {message!r}")
        chat.append(clean)
    return chat


def _special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    """The named special tokens of tokenizer_config.json as strings (AddedToken dicts give their content)."""
    tokens = {}
    for key in SPECIAL_TOKEN_KEYS:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            tokens[key] = value
    return tokens


def _token_id(backend: tokenizers.Tokenizer, token: str | None) -> int | None:
    return backend.token_to_id(token) if token is not None else None


def _optional_int(value: Any) -> int | None:
    return value if isinstance(value, int) else None


def _eos_token_ids(
    backend: tokenizers.Tokenizer, special: Mapping[str, str], generation: Mapping[str, Any]
) -> tuple[int, ...]:
    """The tokenizer's eos id, then generation_config's eos_token_id (an int or a list), without repeats."""
    configured = generation.get("eos_token_id")
    listed = configured if isinstance(configured, list) else [configured]
    ids = [_token_id(backend, special.get("eos_token")), *listed]
    return tuple(dict.fromkeys(i for i in ids if isinstance(i, int)))


def _fingerprint(tokenizer_json: bytes, template: str | None) -> str:
    digest = hashlib.sha256(tokenizer_json)
    digest.update(b"\0chat_template\0")
    digest.update((template or "").encode("utf-8"))
    return digest.hexdigest()
