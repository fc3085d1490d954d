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


def _rows(n, d, seed):
    return torch.randn(n, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def test_cross_norm_from_kept_rows_equals_the_dense_product():
    """||X^T Xh||_F from tokens x tokens products (kept rows) and from the d x d cross term agree."""
    from iteris.engine.stats import GroupStats, cross_norm

    own, mixed = _rows(7, 12, 1), _rows(7, 12, 2)
    dense = torch.linalg.norm(own.T @ mixed)
    from_rows = cross_norm(GroupStats(gram=None, cross=None, rows=mixed), own)
    from_cross = cross_norm(GroupStats(gram=mixed.T @ mixed, cross=own.T @ mixed), None)
    torch.testing.assert_close(from_rows, dense, rtol=1e-12, atol=0)
    torch.testing.assert_close(from_cross, dense, rtol=1e-12, atol=0)
    # an unpaired capture: the cross term is the Gram
    same = GroupStats(gram=None, cross=None, rows=mixed, same_inputs=True)
    torch.testing.assert_close(cross_norm(same, None), torch.linalg.norm(mixed.T @ mixed), rtol=1e-12, atol=0)


def test_shares_of_a_task_sum_to_the_whole_task():
    """A task captured in shares by several processes: the sum of the shares' statistics (one kept here, the
    others as they arrive packed) is the whole task's, and the cross term's norm is taken of the sum."""
    from iteris.engine.spec import CaptureSpec
    from iteris.engine.stats import GroupStats, add_shares, pack_gram, packed_size

    d, members = 9, ["q", "k"]
    A = {m: _rows(2, d, 10 + i) for i, m in enumerate(members)}
    shares = [(_rows(5, d, s), _rows(5, d, 20 + s)) for s in range(3)]  # (own rows, merged rows) per share

    def stats(own, mixed):
        st = GroupStats(gram=mixed.T @ mixed, cross=own.T @ mixed, tokens=own.shape[0],
                        proj={m: a @ own.T @ mixed for m, a in A.items()}, out_sq={"q": 1.5, "k": 2.5})
        return st

    mine = stats(*shares[0])
    parts = []
    for own, mixed in shares[1:]:
        part = stats(own, mixed)
        part.packed, part.packed_dim, part.gram = pack_gram(part.gram.clone()), d, None
        assert part.packed.numel() == packed_size(d)
        scalars = torch.tensor([part.tokens, part.out_sq["q"], part.out_sq["k"]], dtype=torch.float64)
        parts.append((part, scalars))
    target = mine
    add_shares(target, mine, parts, members, CaptureSpec(paired=True, cross="norm", out_norms=True))
    own_all = torch.cat([o for o, _ in shares])
    mixed_all = torch.cat([m for _, m in shares])
    torch.testing.assert_close(target.gram, mixed_all.T @ mixed_all, rtol=1e-12, atol=1e-12)
    for m, a in A.items():
        torch.testing.assert_close(target.proj[m], a @ own_all.T @ mixed_all, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(target.cross_norm, torch.linalg.norm(own_all.T @ mixed_all), rtol=1e-12, atol=0)
    assert target.cross is None  # only its norm was asked for
    assert float(target.tokens) == 15 and float(target.out_sq["k"]) == 7.5


def test_capture_spec_says_when_the_own_models_can_be_skipped():
    from iteris.engine.spec import CaptureSpec

    plain = CaptureSpec(paired=True)
    assert not plain.needs_own_models  # gamma 0, no cross term: the remembered projections suffice
    assert CaptureSpec(paired=True, gamma=0.5).needs_own_models
    assert CaptureSpec(paired=True, cross="norm").needs_own_models
    assert CaptureSpec(paired=False).needs_own_models  # an own-only capture runs them by definition
    keep = CaptureSpec(paired=True, cross="keep", rows="auto")
    assert keep.keeps_cross and keep.wants_cross_norm and keep.accumulates_cross and keep.row_mode is None
    assert not CaptureSpec(cross="norm").accumulates_cross  # unpaired: the cross term is the Gram
