"""merging.temporal: neighbouring frames share the queries of their most alike slots (pure torch)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from merging import frame_partners, pair_groups, temporal_share


def test_partners_and_groups():
    assert frame_partners(4).tolist() == [1, 0, 3, 2]
    assert frame_partners(5).tolist() == [1, 0, 3, 2, 3]
    assert frame_partners(2).tolist() == [1, 0]
    assert pair_groups(5).tolist() == [0, 0, 1, 1, 1]
    assert pair_groups(3).tolist() == [0, 0, 0]
    assert pair_groups(6).tolist() == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError, match="at least 2 frames"):
        frame_partners(1)


@st.composite
def cases(draw):
    frames = draw(st.integers(2, 7))
    chunks = draw(st.integers(1, 2))
    length = draw(st.integers(4, 40))
    ratio = draw(st.sampled_from([0.1, 0.25, 0.5, 0.8, 1.0]))
    seed = draw(st.integers(0, 2 ** 16))
    return frames, chunks, length, ratio, seed


@settings(max_examples=120, deadline=None)
@given(cases())
def test_every_shared_slot_is_computed_by_the_partner(case):
    frames, chunks, length, ratio, seed = case
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(chunks * frames, length, 8, generator=g)
    share = temporal_share(metric, ratio, frames)
    skip = int(ratio * length / 2)
    if skip == 0:
        assert share is None
        return
    rows = torch.arange(chunks * frames)
    partner = rows - rows % frames + frame_partners(frames)[rows % frames]
    assert share.num_computed == length - skip
    assert share.shared.sum(1).tolist() == [skip] * len(rows)  # every row skips exactly s slots
    computed_mask = torch.zeros_like(share.shared).scatter_(1, share.computed, True)
    assert bool((computed_mask == ~share.shared).all())
    # a shared slot is computed by the partner row of the same chunk
    for r in range(len(rows)):
        for slot in share.shared[r].nonzero().flatten().tolist():
            assert computed_mask[partner[r], slot]
    # fill puts each row's own outputs back at its computed slots and the partner's at the shared ones
    values = torch.arange(chunks * frames * length, dtype=torch.float32).reshape(chunks * frames, length, 1)
    filled = share.fill(share.select(values))
    expected = torch.where(share.shared[:, :, None], values[partner], values)
    assert torch.equal(filled, expected)


def test_the_most_alike_slots_are_shared():
    """Frame 1 equals frame 0 except at slots 0-3: those are never shared; with ratio 0.5 of 16 slots, 4 are
    shared each way, drawn from the 12 identical slots."""
    g = torch.Generator().manual_seed(0)
    frame0 = torch.randn(16, 8, generator=g)
    frame1 = frame0.clone()
    frame1[:4] = torch.randn(4, 8, generator=g)
    share = temporal_share(torch.stack([frame0, frame1]), 0.5, 2)
    assert share.shared.sum(1).tolist() == [4, 4]
    assert not share.shared[:, :4].any()
    assert not (share.shared[0] & share.shared[1]).any()  # a slot is computed by at least one frame of the pair


def test_bad_input():
    with pytest.raises(ValueError, match=r"temporal ratio must be in \[0, 1\]"):
        temporal_share(torch.randn(2, 4, 3), 1.5, 2)
    with pytest.raises(ValueError, match="does not split into chunks of 3"):
        temporal_share(torch.randn(4, 4, 3), 0.5, 3)
    share = temporal_share(torch.randn(2, 8, 3), 0.5, 2)
    with pytest.raises(ValueError, match=r"expected a \[2, 6, C\]"):
        share.fill(torch.randn(2, 8, 3))
