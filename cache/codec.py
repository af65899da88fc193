"""Safe serialization of cache values: a fixed 128-byte header followed by raw bytes. Nothing is ever unpickled.

Owns: the value format (KV blocks and token ids), its validation, zstd compression and the opt-in int8 KV
quantization (lossy, flagged in the header). Does not own: keys (keys.py) or where values are stored (tiers.py).

Header, little-endian (offsets in bytes):
    0 magic 4s | 4 format version u16 | 6 flags u16 | 8 owner digest 16s (model or tokenizer fingerprint)
    24 key digest 16s | 40 layout digest 8s | 48 layer start u16 | 50 layer end u16 | 52 dtype code u8
    53 ndim u8 | 54 shape 6 x u32 | 78 stored payload bytes u64 | 86 raw payload bytes u64 | 94 zero padding
    124 crc32 u32 of header bytes 0..124 and the stored payload
A value that is short, has another magic, version, owner, key, layout, dtype or shape, fails its checksum or does
not decompress raises `CorruptValue(kind)`; callers count it and treat it as a miss.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import NamedTuple

import numpy as np
import torch
import zstandard

from moe_serve.cache.keys import KVLayout, short_digest

FORMAT_VERSION = 1
KV_MAGIC = b"MSKV"
IDS_MAGIC = b"MSTK"
HEADER_BYTES = 128  # payload starts 64-byte aligned within the value
_FIELDS = struct.Struct("<4sHH16s16s8sHHBB6IQQ")
_CRC = struct.Struct("<I")
_CRC_AT = HEADER_BYTES - _CRC.size
MAX_DIMS = 6

FLAG_ZSTD = 1 << 0
FLAG_INT8 = 1 << 1  # lossy: int8 values with one float32 scale per vector of the last axis
KNOWN_FLAGS = FLAG_ZSTD | FLAG_INT8

DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4, torch.int32: 5, torch.int8: 6,
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class Corrupt(str, Enum):
    TRUNCATED = "truncated"
    MAGIC = "magic"
    VERSION = "version"
    FLAGS = "flags"
    OWNER = "owner"  # another model's (or tokenizer's) value
    KEY = "key"  # a value stored under the wrong key
    LAYOUT = "layout"  # another KV dtype, layout, layer range or shape
    CHECKSUM = "checksum"
    PAYLOAD = "payload"  # does not decompress to the size the header states


class CorruptValue(ValueError):
    def __init__(self, kind: Corrupt, detail: str = "") -> None:
        super().__init__(f"{kind.value}: {detail}" if detail else kind.value)
        self.kind = kind


@dataclass(frozen=True)
class Header:
    magic: bytes
    version: int
    flags: int
    owner: bytes
    key: bytes
    layout: bytes
    layers: tuple[int, int]
    dtype_code: int
    shape: tuple[int, ...]
    stored_bytes: int
    raw_bytes: int

    def pack(self) -> bytes:
        shape = list(self.shape) + [0] * (MAX_DIMS - len(self.shape))
        fields = _FIELDS.pack(self.magic, self.version, self.flags, self.owner, self.key, self.layout,
                              *self.layers, self.dtype_code, len(self.shape), *shape, self.stored_bytes,
                              self.raw_bytes)
        return fields + bytes(_CRC_AT - len(fields))

    @classmethod
    def unpack(cls, value: bytes | memoryview) -> Header:
        if len(value) < HEADER_BYTES:
            raise CorruptValue(Corrupt.TRUNCATED, f"{len(value)} bytes, the header alone is {HEADER_BYTES}")
        f = _FIELDS.unpack_from(value)
        ndim = f[9]
        if ndim > MAX_DIMS:
            raise CorruptValue(Corrupt.LAYOUT, f"ndim {ndim}")
        return cls(f[0], f[1], f[2], f[3], f[4], f[5], (f[6], f[7]), f[8], tuple(f[10:10 + ndim]), f[16], f[17])


def pack_value(header: Header, payload: bytes | memoryview) -> bytes:
    head = header.pack()
    crc = zlib.crc32(payload, zlib.crc32(head))
    return b"".join((head, _CRC.pack(crc), payload))


def unpack_value(value: bytes, magic: bytes) -> tuple[Header, memoryview]:
    """Header and stored payload of `value`, after the checks that need no expectations: length, magic,
    version, flags and checksum."""
    header = Header.unpack(value)
    if header.magic != magic:
        raise CorruptValue(Corrupt.MAGIC, repr(header.magic))
    if header.version != FORMAT_VERSION:
        raise CorruptValue(Corrupt.VERSION, str(header.version))
    if header.flags & ~KNOWN_FLAGS:
        raise CorruptValue(Corrupt.FLAGS, hex(header.flags))
    end = HEADER_BYTES + header.stored_bytes
    if len(value) != end:
        raise CorruptValue(Corrupt.TRUNCATED, f"{len(value)} bytes, header says {end}")
    view = memoryview(value)
    (crc,) = _CRC.unpack_from(value, _CRC_AT)
    if zlib.crc32(view[HEADER_BYTES:], zlib.crc32(view[:_CRC_AT])) != crc:
        raise CorruptValue(Corrupt.CHECKSUM)
    return header, view[HEADER_BYTES:]


class CachedBlock(NamedTuple):
    """A decoded KV block: `data` has the layout's shape and dtype; `lossy` when it came from int8."""

    data: torch.Tensor
    lossy: bool = False

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


class BlockCodec:
    """Encode KV blocks of one model and layout, decode only values that are exactly theirs.

    `zstd_level` compresses (cold tier); `int8` quantizes, lossy and flagged. One instance per thread: the zstd
    contexts it reuses are not thread-safe. `on_corrupt(kind)` is called for every rejected value."""

    def __init__(
        self,
        model_fp: str,
        layout: KVLayout,
        *,
        zstd_level: int | None = None,
        int8: bool = False,
        on_corrupt: Callable[[Corrupt], None] | None = None,
    ) -> None:
        self.layout = layout
        self.zstd_level = zstd_level
        self.int8 = int8
        self.on_corrupt = on_corrupt
        self._owner = short_digest(model_fp)
        self._layout = short_digest(layout.tag, 8)
        self._shape = layout.block_shape
        self._layers = (0, layout.num_layers)
        self._dtype_code = DTYPE_CODES[layout.dtype]
        self._block_bytes = layout.block_bytes
        # The exact header bytes of an uncompressed, exact value of this codec, around the per-key digest:
        # the fast path of `decode` compares bytes instead of parsing fields.
        plain = Header(KV_MAGIC, FORMAT_VERSION, 0, self._owner, bytes(16), self._layout, self._layers,
                       self._dtype_code, self._shape, self._block_bytes, self._block_bytes).pack()
        self._plain_head, self._plain_tail = plain[:24], plain[40:_CRC_AT]
        self._compressor = zstandard.ZstdCompressor(level=zstd_level) if zstd_level is not None else None
        self._decompressor = zstandard.ZstdDecompressor()

    def encode(self, key: str, block: torch.Tensor) -> bytes:
        if tuple(block.shape) != self._shape or block.dtype != self.layout.dtype:
            raise ValueError(f"block {tuple(block.shape)} {block.dtype} does not match the layout "
                             f"{self._shape} {self.layout.dtype}")
        raw = _quantize_int8(block) if self.int8 else _raw_bytes(block)
        stored = self._compressor.compress(raw) if self._compressor is not None else raw
        flags = (FLAG_ZSTD if self._compressor is not None else 0) | (FLAG_INT8 if self.int8 else 0)
        header = Header(KV_MAGIC, FORMAT_VERSION, flags, self._owner, bytes.fromhex(key), self._layout,
                        self._layers, self._dtype_code, self._shape, len(stored),
                        len(raw))
        return pack_value(header, stored)

    def decode(self, key: str, value: bytes) -> CachedBlock | None:
        """The block stored in `value` under `key`; None (after on_corrupt) for anything not exactly ours."""
        block = self._decode_plain(key, value)
        if block is not None:
            return block
        try:
            return self._decode(key, value)
        except CorruptValue as err:
            if self.on_corrupt is not None:
                self.on_corrupt(err.kind)
            return None

    def _decode_plain(self, key: str, value: bytes) -> CachedBlock | None:
        """Fast path for an intact uncompressed value (the warm tier's): byte comparisons of the header and the
        checksum. None for anything else, which the full parse then decodes or classifies."""
        if (len(value) != HEADER_BYTES + self._block_bytes or value[:24] != self._plain_head
                or value[40:_CRC_AT] != self._plain_tail or value[24:40] != bytes.fromhex(key)):
            return None
        view = memoryview(value)
        if zlib.crc32(view[HEADER_BYTES:], zlib.crc32(view[:_CRC_AT])) != _CRC.unpack_from(value, _CRC_AT)[0]:
            return None
        raw = bytearray(view[HEADER_BYTES:])
        return CachedBlock(torch.frombuffer(raw, dtype=self.layout.dtype).view(self._shape))

    def _decode(self, key: str, value: bytes) -> CachedBlock:
        header, stored = unpack_value(value, KV_MAGIC)
        if header.owner != self._owner:
            raise CorruptValue(Corrupt.OWNER)
        if header.key != bytes.fromhex(key):
            raise CorruptValue(Corrupt.KEY)
        if (header.layout != self._layout or header.shape != self._shape or header.layers != self._layers
                or header.dtype_code != self._dtype_code):
            raise CorruptValue(Corrupt.LAYOUT)
        raw = self._decompress(header, stored) if header.flags & FLAG_ZSTD else bytearray(stored)
        if header.flags & FLAG_INT8:
            return CachedBlock(_dequantize_int8(raw, self._shape, self.layout.dtype), lossy=True)
        if len(raw) != self._block_bytes:
            raise CorruptValue(Corrupt.PAYLOAD, f"{len(raw)} bytes, the layout needs {self._block_bytes}")
        return CachedBlock(torch.frombuffer(raw, dtype=self.layout.dtype).view(self._shape))

    def _decompress(self, header: Header, stored: memoryview) -> bytearray:
        try:
            raw = self._decompressor.decompress(stored, max_output_size=header.raw_bytes)
        except zstandard.ZstdError as err:
            raise CorruptValue(Corrupt.PAYLOAD, str(err)) from err
        if len(raw) != header.raw_bytes:
            raise CorruptValue(Corrupt.PAYLOAD, f"{len(raw)} bytes decompressed, header says {header.raw_bytes}")
        return bytearray(raw)


def _raw_bytes(block: torch.Tensor) -> memoryview:
    """The block's bytes without a copy when it is contiguous (any dtype, bfloat16 included)."""
    return memoryview(block.contiguous().view(torch.uint8).numpy()).cast("B")


def _quantize_int8(block: torch.Tensor) -> bytes:
    """One float32 scale per vector of the last axis (absmax / 127), then int8 values: [scales | values]."""
    x = block.float()
    scale = x.abs().amax(dim=-1, keepdim=True) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
    return b"".join((_raw_bytes(scale), _raw_bytes(q)))


def _dequantize_int8(raw: bytearray, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    vectors = int(np.prod(shape[:-1]))
    if len(raw) != vectors * 4 + vectors * shape[-1]:
        raise CorruptValue(Corrupt.PAYLOAD, f"{len(raw)} int8 payload bytes for shape {shape}")
    scale = torch.frombuffer(raw, dtype=torch.float32, count=vectors).view(*shape[:-1], 1)
    q = torch.frombuffer(raw, dtype=torch.int8, offset=vectors * 4).view(shape)
    return (q.float() * scale).to(dtype)


# --- token ids (the prompt cache) -------------------------------------------------------------------------------

def encode_ids(tokenizer_fp: str, key: str, ids: Sequence[int]) -> bytes:
    """Token ids as raw little-endian int32 after the header."""
    payload = np.asarray(ids, dtype="<i4").tobytes()
    header = Header(IDS_MAGIC, FORMAT_VERSION, 0, short_digest(tokenizer_fp), bytes.fromhex(key), bytes(8),
                    (0, 0), DTYPE_CODES[torch.int32], (len(ids),), len(payload), len(payload))
    return pack_value(header, payload)


def decode_ids(tokenizer_fp: str, key: str, value: bytes) -> list[int]:
    """The ids stored under `key` by the tokenizer `tokenizer_fp`; raises CorruptValue otherwise."""
    header, payload = unpack_value(value, IDS_MAGIC)
    if header.owner != short_digest(tokenizer_fp):
        raise CorruptValue(Corrupt.OWNER)
    if header.key != bytes.fromhex(key):
        raise CorruptValue(Corrupt.KEY)
    if header.flags or header.dtype_code != DTYPE_CODES[torch.int32] or len(header.shape) != 1 \
            or header.shape[0] * 4 != len(payload):
        raise CorruptValue(Corrupt.LAYOUT)
    return np.frombuffer(payload, dtype="<i4").tolist()
