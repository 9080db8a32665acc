"""Proportional attention: a merged key weighs as many tokens as its slot holds (pure torch)."""
import math

import pytest
import torch
import torch.nn.functional as F

from merging import (
    RandomGridConfig, TokenGrid, attention_with_key_bias, frame_partition, key_bias_mask, log_slot_sizes,
    make_partition, padded_head_size,
)


def comfy_like_attention(q, k, v, heads, heads_first=False):
    """ComfyUI's attention contract: heads split from the last axis (or already [B, H, L, D]), scale 1/sqrt(D),
    output [B, Lq, H*D]."""
    def split(x):
        if heads_first:
            return x
        x = x.reshape(x.shape[0], x.shape[1], heads, -1) if x.ndim == 3 else x  # SD3's v: [B, L, H, D]
        return x.transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def heads(x):
    """[B, L, 4*16] -> [B, 4, L, 16]."""
    return x.reshape(x.shape[0], x.shape[1], 4, 16).transpose(1, 2)


def _qkv(seed=0, batch=2, q_len=10, k_len=7, heads=4, head=16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, n, heads * head, generator=g) for n in (q_len, k_len, k_len)]


@pytest.mark.parametrize("align", [1, 8])
@pytest.mark.parametrize("layout", ["flat", "heads_first", "sd3_value"])
def test_same_logits_as_an_additive_key_mask(layout, align):
    q, k, v = _qkv()
    bias = log_slot_sizes(torch.tensor([[1, 2, 3, 1, 4, 1, 2], [2, 2, 1, 1, 1, 5, 1]], dtype=torch.float32))

    expected = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=bias[:, None, None, :])
    expected = expected.transpose(1, 2).reshape(2, 10, 64)
    if layout == "heads_first":
        args, first = (heads(q), heads(k), heads(v)), True
    elif layout == "sd3_value":
        args, first = (q, k, v.reshape(2, 7, 4, 16)), False
    else:
        args, first = (q, k, v), False
    out = attention_with_key_bias(lambda *t: comfy_like_attention(*t, 4, heads_first=first), *args, 4, bias,
                                  align=align, heads_first=first)
    torch.testing.assert_close(out, expected, atol=2e-6, rtol=1e-5)


def test_a_slot_of_s_identical_tokens_attends_like_s_copies():
    """Merging identical keys/values with proportional attention changes nothing; without it, it does."""
    q, k, v = _qkv(batch=1, k_len=5)
    counts = torch.tensor([3, 1, 2, 1, 4])
    full_k, full_v = k[0].repeat_interleave(counts, 0)[None], v[0].repeat_interleave(counts, 0)[None]
    reference = comfy_like_attention(q, full_k, full_v, 4)
    proportional = attention_with_key_bias(lambda *t: comfy_like_attention(*t, 4), q, k, v, 4,
                                           log_slot_sizes(counts[None].float()))
    torch.testing.assert_close(proportional, reference, atol=2e-6, rtol=1e-5)
    assert (comfy_like_attention(q, k, v, 4) - reference).abs().max() > 1e-2


def test_padded_head_sizes_and_bad_input():
    assert padded_head_size(64) == 65 and padded_head_size(64, 8) == 72 and padded_head_size(7, 8) == 8
    with pytest.raises(ValueError):
        padded_head_size(0)
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="key_bias"):
        attention_with_key_bias(lambda *t: comfy_like_attention(*t, 4), q, k, v, 4, torch.zeros(2, 6))
    with pytest.raises(ValueError, match="heads"):
        attention_with_key_bias(lambda *t: comfy_like_attention(*t, 3), q, k, v, 3, torch.zeros(2, 7))


def test_slot_counts_of_partitions_count_every_token():
    """The counts the bias comes from: per slot of the merged sequence, summing to the tokens (frame partitions
    too, frame by frame in merged order)."""
    grid = TokenGrid(4, 6)
    g = torch.Generator().manual_seed(0)
    part = make_partition(torch.randn(2, 24, 8, generator=g), RandomGridConfig(0.5), grid=grid,
                          generator=torch.Generator().manual_seed(1))
    counts = part.slot_counts[..., 0]
    assert counts.shape == (2, 12) and torch.equal(counts.sum(1), torch.full((2,), 24.0))
    ones = torch.ones(2, 24, 1)
    torch.testing.assert_close(part.merge(ones) * part.slot_counts, part.slot_counts)  # mean of ones per slot
    video = TokenGrid(4, 6, frames=3)
    frames = frame_partition(torch.randn(2, 72, 8, generator=g), video, RandomGridConfig(0.5),
                             generator=torch.Generator().manual_seed(1))
    counts = frames.slot_counts
    assert counts.shape == (2, 36, 1)
    assert torch.equal(counts[..., 0].reshape(2, 3, 12).sum(-1), torch.full((2, 3), 24.0))
    slot_frame = frames.merge(torch.arange(3.0).repeat_interleave(24)[None, :, None].expand(2, 72, 1).contiguous())
    assert torch.equal(slot_frame[..., 0], torch.arange(3.0).repeat_interleave(12).expand(2, -1))
    assert math.isclose(float(log_slot_sizes(counts).exp().sum()), 144.0, rel_tol=1e-6)


@pytest.mark.parametrize("existing", [None, "bool", "float", "square"])
def test_bias_as_a_mask_combines_with_the_models_mask(existing):
    """The GPU form: an additive [B, 1, 1 or Lq, Lk] mask, added to a mask the model passes (bool: True = attend,
    or additive float, 2-D / 3-D as ComfyUI's kernels take them); the same logits as the bias plus that mask."""
    q, k, v = _qkv()
    bias = log_slot_sizes(torch.tensor([[1, 2, 3, 1, 4, 1, 2], [2, 2, 1, 1, 1, 5, 1]], dtype=torch.float32))

    allowed = torch.ones(2, 10, 7, dtype=torch.bool)
    allowed[:, :, 5:] = False  # the last two keys padded away
    model_mask = {None: None, "bool": allowed[:, :1], "float": torch.zeros(2, 1, 7).masked_fill(~allowed[:, :1], -1e4),
                  "square": torch.zeros(10, 7).masked_fill(~allowed[0], -1e4)}[existing]
    mask = key_bias_mask(bias, model_mask, torch.float32)
    assert mask.ndim == 4 and mask.shape[1] == 1 and mask.shape[-1] == 7
    expected_mask = bias[:, None, None, :] + (0 if existing is None else torch.zeros(2, 1, 10, 7).masked_fill(
        ~allowed[:, None], float("-inf")))
    expected = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=expected_mask)
    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert key_bias_mask(bias, None, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_channel_stays_close_to_the_float_reference(dtype):
    """In half precision the bias channel is rounded once; the result stays within half-precision noise of the
    float32 masked reference."""
    q, k, v = _qkv()
    bias = log_slot_sizes(torch.tensor([[1, 2, 9, 1, 4, 1, 2], [2, 2, 1, 1, 1, 5, 1]], dtype=torch.float32))

    expected = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=bias[:, None, None, :])
    expected = expected.transpose(1, 2).reshape(2, 10, 64)
    out = attention_with_key_bias(lambda *t: comfy_like_attention(*t, 4), q.to(dtype), k.to(dtype), v.to(dtype), 4,
                                  bias)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=0.05, rtol=0.05)
