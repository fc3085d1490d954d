"""Gram statistics (engine/stats.py): accumulated in upper blocks, mirrored, and packed for the trip between
processes."""

import torch


def test_gram_upper_blocks_and_mirror(monkeypatch):
    from iteris.engine import stats as capture

    blocks = capture._gram_blocks
    assert len(blocks(2048)) == 1 and len(blocks(4096)) == 2 and len(blocks(14336)) == 4
    assert sum(s.stop - s.start for s in blocks(14336)) == 14336
    monkeypatch.setattr(capture, "_gram_blocks", lambda d: [slice(0, 3), slice(3, 7), slice(7, d)])
    x = torch.randn(20, 11, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    acc = torch.zeros(11, 11, dtype=torch.float64)
    capture.add_gram(acc, x)
    capture.add_gram(acc, 2 * x)
    capture.mirror_gram(acc)
    torch.testing.assert_close(acc, 5 * x.T @ x, rtol=1e-12, atol=1e-12)
    # what travels between processes: the upper blocks only, and the Gram again from them
    packed = capture.pack_gram(acc)
    assert packed.numel() == capture.packed_size(11) == 3 * 3 + 3 * 4 + 3 * 4 + 4 * 4 + 4 * 4 + 4 * 4
    torch.testing.assert_close(capture.unpack_gram(packed, 11), acc, rtol=0, atol=0)
    into = torch.full((11, 11), float("nan"), dtype=torch.float64)
    capture.unpack_gram(packed, 11, into=into)
    assert torch.equal(torch.triu(into), torch.triu(acc))
    monkeypatch.setattr(capture, "_gram_blocks", lambda d: [slice(0, d)])
    assert capture.pack_gram(acc).data_ptr() == acc.data_ptr()  # one block: the Gram itself travels
