import pytest
import torch

from zoo.kernels.packing import pack, packed_row_bytes, storage_bits, unpack


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("k", [1, 7, 8, 31, 32, 33, 144])
def test_pack_unpack_round_trip(bits, k):
    g = torch.Generator().manual_seed(bits * 100 + k)
    q = torch.randint(0, 2 ** bits, (5, k), generator=g, dtype=torch.int32)
    p = pack(q, bits)
    assert p.dtype == torch.uint8
    assert p.shape == (5, packed_row_bytes(k, bits))
    assert p.shape[1] == -(-k * storage_bits(bits) // 8)
    assert torch.equal(unpack(p, bits, k).to(torch.int32), q)


def test_bit_layout_is_little_endian_within_bytes():
    q = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1, 1]])
    assert pack(q, 1).tolist() == [[0b10000001, 0b00000001]]
    assert pack(torch.tensor([[3, 0, 1, 2]]), 2).tolist() == [[0b10010011]]
    assert pack(torch.tensor([[0xA, 0x5]]), 4).tolist() == [[0x5A]]
    # 32 one-bit codes read as a little-endian int32 have element i at bit i
    q32 = torch.zeros(1, 32, dtype=torch.int32)
    q32[0, [0, 5, 31]] = 1
    word = int.from_bytes(bytes(pack(q32, 1)[0].tolist()), "little")
    assert word == (1 << 0) | (1 << 5) | (1 << 31)


def test_storage_bits():
    assert [storage_bits(b) for b in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    with pytest.raises(ValueError, match="1..8"):
        storage_bits(9)


def test_pack_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack(torch.tensor([[4]]), 2)
    with pytest.raises(ValueError, match="2-D"):
        pack(torch.tensor([1, 2]), 2)
    with pytest.raises(ValueError, match="cannot hold"):
        unpack(torch.zeros(2, 1, dtype=torch.uint8), 2, 5)
