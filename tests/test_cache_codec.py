"""The value format: round trips, lossy int8 flagged, and every kind of corruption a counted miss."""

from __future__ import annotations

import struct
from collections import Counter

import pytest
import torch

from moe_serve.cache import BlockCodec, Corrupt, CorruptValue, KVLayout, decode_ids, encode_ids, prefix_block_keys
from moe_serve.cache.codec import FLAG_INT8, FLAG_ZSTD, HEADER_BYTES, Header

LAYOUT = KVLayout(block_size=16, num_layers=2, num_kv_heads=2, head_dim=16)
KEY = prefix_block_keys("model-a", LAYOUT, list(range(16)))[0]
OTHER_KEY = prefix_block_keys("model-a", LAYOUT, list(range(1, 17)))[0]


def make_block(layout: KVLayout = LAYOUT, seed: int = 0) -> torch.Tensor:
    return torch.randn(layout.block_shape, generator=torch.Generator().manual_seed(seed)).to(layout.dtype)


def make_codec(**kwargs: object) -> tuple[BlockCodec, Counter[Corrupt]]:
    seen: Counter[Corrupt] = Counter()
    return BlockCodec("model-a", LAYOUT, on_corrupt=lambda kind: seen.update([kind]), **kwargs), seen


@pytest.mark.parametrize("zstd_level", [None, 3])
def test_round_trip_is_exact(zstd_level: int | None) -> None:
    codec, seen = make_codec(zstd_level=zstd_level)
    block = make_block()
    value = codec.encode(KEY, block)
    assert Header.unpack(value).flags == (FLAG_ZSTD if zstd_level else 0)
    decoded = codec.decode(KEY, value)
    assert decoded is not None and not decoded.lossy
    assert torch.equal(decoded.data, block) and decoded.data.shape == LAYOUT.block_shape
    decoded.data.add_(1)  # decoded tensors own writable memory
    assert not seen


def test_bfloat16_round_trip() -> None:
    layout = KVLayout(16, 2, 2, 16, dtype=torch.bfloat16)
    codec = BlockCodec("model-a", layout)
    block = make_block(layout)
    key = prefix_block_keys("model-a", layout, list(range(16)))[0]
    decoded = codec.decode(key, codec.encode(key, block))
    assert decoded is not None and decoded.data.dtype == torch.bfloat16 and torch.equal(decoded.data, block)


def test_int8_is_lossy_flagged_and_close() -> None:
    codec, _ = make_codec(zstd_level=3, int8=True)
    block = make_block()
    value = codec.encode(KEY, block)
    assert Header.unpack(value).flags == FLAG_ZSTD | FLAG_INT8
    assert len(value) < LAYOUT.block_bytes / 2
    decoded = make_codec()[0].decode(KEY, value)  # any codec of the model reads it: the header says how
    assert decoded is not None and decoded.lossy and decoded.data.dtype == torch.float32
    scale = block.abs().amax(dim=-1, keepdim=True) / 127
    assert ((decoded.data - block).abs() <= scale / 2 + 1e-6).all()


def _corruptions(value: bytes) -> dict[Corrupt, bytes]:
    def patched(offset: int, data: bytes) -> bytes:
        return value[:offset] + data + value[offset + len(data):]

    flipped = bytearray(value)
    flipped[HEADER_BYTES + 100] ^= 0x40
    return {
        Corrupt.TRUNCATED: value[: len(value) - 7],
        Corrupt.MAGIC: patched(0, b"NOPE"),
        Corrupt.VERSION: patched(4, struct.pack("<H", 99)),
        Corrupt.FLAGS: patched(6, struct.pack("<H", 0x80)),
        Corrupt.CHECKSUM: bytes(flipped),
    }


def test_every_corruption_is_a_counted_miss() -> None:
    codec, seen = make_codec()
    value = codec.encode(KEY, make_block())
    for kind, bad in _corruptions(value).items():
        assert codec.decode(KEY, bad) is None, kind
    assert codec.decode(KEY, value[:40]) is None  # shorter than the header
    assert codec.decode(KEY, b"") is None
    assert seen == {Corrupt.TRUNCATED: 3, Corrupt.MAGIC: 1, Corrupt.VERSION: 1, Corrupt.FLAGS: 1,
                    Corrupt.CHECKSUM: 1}


def test_foreign_model_wrong_key_and_other_layout_are_misses() -> None:
    codec, seen = make_codec()
    foreign = BlockCodec("model-b", LAYOUT).encode(KEY, make_block())
    assert codec.decode(KEY, foreign) is None
    assert codec.decode(OTHER_KEY, codec.encode(KEY, make_block())) is None
    layout = KVLayout(16, 2, 2, 16, order=("layer", "kv", "token", "head", "dim"))
    other_layout = BlockCodec("model-a", layout).encode(KEY, make_block(layout))
    assert codec.decode(KEY, other_layout) is None
    assert seen == {Corrupt.OWNER: 1, Corrupt.KEY: 1, Corrupt.LAYOUT: 1}


def test_compressed_payload_that_lies_is_a_miss() -> None:
    codec, seen = make_codec(zstd_level=3)
    good = codec.encode(KEY, make_block())
    header = Header.unpack(good)
    # a well-formed value (checksum recomputed) whose zstd payload is garbage
    from moe_serve.cache.codec import pack_value

    bad = pack_value(header, b"\x00" * header.stored_bytes)
    assert codec.decode(KEY, bad) is None
    assert seen == {Corrupt.PAYLOAD: 1}


def test_encode_refuses_a_block_of_another_shape() -> None:
    codec, _ = make_codec()
    with pytest.raises(ValueError):
        codec.encode(KEY, torch.zeros(3, 3))


def test_ids_round_trip_and_validation() -> None:
    ids = [0, 1, 2, 70000, 2**31 - 1]
    value = encode_ids("tok-a", KEY, ids)
    assert value[HEADER_BYTES:] == b"".join(struct.pack("<i", i) for i in ids)  # raw little-endian int32
    assert decode_ids("tok-a", KEY, value) == ids
    assert decode_ids("tok-a", KEY, encode_ids("tok-a", KEY, [])) == []
    for expect_tok, key, bad, kind in [
        ("tok-b", KEY, value, Corrupt.OWNER),
        ("tok-a", OTHER_KEY, value, Corrupt.KEY),
        ("tok-a", KEY, value[:-1], Corrupt.TRUNCATED),
        ("tok-a", KEY, BlockCodec("model-a", LAYOUT).encode(KEY, make_block()), Corrupt.MAGIC),
    ]:
        with pytest.raises(CorruptValue) as err:
            decode_ids(expect_tok, key, bad)
        assert err.value.kind is kind
