import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_blocks.positional import RoPE2D, rope_2d_angles


def _rotate_reference(x: torch.Tensor, pos: torch.Tensor, theta: float) -> torch.Tensor:
    """Slow reference: an explicit 2x2 rotation per channel pair (RoFormer, axial 2D)."""
    dh = x.shape[-1]
    f = dh // 4
    out = x.clone()
    for n in range(x.shape[-2]):
        for i in range(dh // 2):
            axis, j = divmod(i, f)  # first F pairs: row, next F pairs: column
            angle = float(pos[n, axis]) * theta ** (-j / f)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[..., n, 2 * i], x[..., n, 2 * i + 1]
            out[..., n, 2 * i] = a * c - b * s
            out[..., n, 2 * i + 1] = a * s + b * c
    return out


def test_matches_explicit_pair_rotations():
    torch.manual_seed(0)
    rope = RoPE2D(head_dim=12, theta=100.0)
    q = torch.randn(2, 3, 5, 12, dtype=torch.float64)
    pos = torch.rand(5, 2, dtype=torch.float64) * 7
    q_rot, _ = rope(q, q, positions=pos)
    torch.testing.assert_close(q_rot, _rotate_reference(q, pos, 100.0))


@settings(max_examples=30, deadline=None)
@given(
    shift=st.tuples(st.floats(-50, 50), st.floats(-50, 50)),
    head_dim=st.sampled_from([4, 8, 16, 32]),
    seed=st.integers(0, 2**16),
)
def test_scores_depend_only_on_relative_offset(shift, head_dim, seed):
    g = torch.Generator().manual_seed(seed)
    rope = RoPE2D(head_dim=head_dim)
    q = torch.randn(1, 1, 6, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 6, head_dim, generator=g, dtype=torch.float64)
    pos = torch.randint(-10, 10, (6, 2), generator=g).double()
    q1, k1 = rope(q, k, positions=pos)
    q2, k2 = rope(q, k, positions=pos + torch.tensor(shift, dtype=torch.float64))
    torch.testing.assert_close(q1 @ k1.transpose(-1, -2), q2 @ k2.transpose(-1, -2))


def _rotate_per_element(x: torch.Tensor, elem_angles: torch.Tensor) -> torch.Tensor:
    """Rotate pairs with one angle per element (as a tiled sin/cos table does)."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    c, s = elem_angles.cos(), elem_angles.sin()
    out = torch.empty_like(x)
    out[..., 0::2] = x0 * c[..., 0::2] - x1 * s[..., 0::2]
    out[..., 1::2] = x1 * c[..., 1::2] + x0 * s[..., 1::2]
    return out


def _score(q, k, pos, layout):
    angles = rope_2d_angles(pos, q.shape[-1])  # (N, Dh/2), one angle per pair
    elem = angles.repeat_interleave(2, dim=-1) if layout == "interleave" else angles.repeat(1, 2)
    return (_rotate_per_element(q, elem[0]) * _rotate_per_element(k, elem[1])).sum()


def test_relative_check_catches_vjepa2_repeat_tiling():
    # V-JEPA 2 tiles sin/cos with `repeat` instead of `repeat_interleave` (its PR 15): the
    # two channels of a pair then turn by different angles and q.k stops being a
    # function of the offset. The same check that our layout passes fails for it.
    torch.manual_seed(1)
    q, k = torch.randn(16, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    pos_a = torch.tensor([[1.0, 2.0], [3.0, 5.0]], dtype=torch.float64)
    pos_b = pos_a + torch.tensor([4.0, -3.0], dtype=torch.float64)
    torch.testing.assert_close(_score(q, k, pos_a, "interleave"), _score(q, k, pos_b, "interleave"))
    assert abs(_score(q, k, pos_a, "repeat") - _score(q, k, pos_b, "repeat")) > 1e-3
    # And the interleaved per-element form is exactly what RoPE2D computes.
    rope = RoPE2D(head_dim=16)
    q_rot, _ = rope(q.view(1, 1, 1, 16), q.view(1, 1, 1, 16), positions=pos_a[:1])
    elem = rope_2d_angles(pos_a[:1], 16).repeat_interleave(2, dim=-1)
    torch.testing.assert_close(q_rot.flatten(), _rotate_per_element(q, elem[0]))


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_norms_preserved(seed):
    g = torch.Generator().manual_seed(seed)
    rope = RoPE2D(head_dim=16)
    q = torch.randn(2, 2, 7, 16, generator=g, dtype=torch.float64)
    pos = torch.randn(2, 7, 2, generator=g, dtype=torch.float64) * 20
    q2, _ = rope(q, q, positions=pos)
    torch.testing.assert_close(q2.norm(dim=-1), q.norm(dim=-1))


def test_identity_at_origin():
    rope = RoPE2D(head_dim=8)
    q = torch.randn(1, 2, 3, 8)
    q2, k2 = rope(q, q, positions=torch.zeros(3, 2))
    torch.testing.assert_close(q2, q)
    torch.testing.assert_close(k2, q)


def test_rows_and_columns_use_separate_halves():
    rope = RoPE2D(head_dim=8)
    q = torch.randn(1, 1, 1, 8)
    row_only, _ = rope(q, q, positions=torch.tensor([[3.0, 0.0]]))
    col_only, _ = rope(q, q, positions=torch.tensor([[0.0, 3.0]]))
    torch.testing.assert_close(row_only[..., 4:], q[..., 4:])  # column half untouched
    torch.testing.assert_close(col_only[..., :4], q[..., :4])  # row half untouched


def test_bf16_keeps_dtype():
    rope = RoPE2D(head_dim=8)
    q = torch.randn(1, 1, 4, 8, dtype=torch.bfloat16)
    q2, _ = rope(q, q, positions=torch.rand(4, 2))
    assert q2.dtype == torch.bfloat16


@pytest.mark.parametrize(
    "kwargs, match",
    [({"head_dim": 6}, "head_dim"), ({"head_dim": 2}, "head_dim"), ({"head_dim": 8, "theta": 1.0}, "theta"),
     ({"head_dim": "8"}, "head_dim")],
)
def test_bad_constructor_args(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        RoPE2D(**kwargs)


def test_bad_forward_args():
    rope = RoPE2D(head_dim=8)
    q = torch.randn(1, 1, 4, 8)
    with pytest.raises(ValueError, match="positions"):
        rope(q, q, positions=torch.rand(5, 2))
    with pytest.raises(ValueError, match="q"):
        rope(torch.randn(1, 4, 8), q, positions=torch.rand(4, 2))
    with pytest.raises(ValueError, match="head_dim"):
        rope(torch.randn(1, 1, 4, 12), q, positions=torch.rand(4, 2))
    with pytest.raises(TypeError, match="positions"):
        rope(q, q, positions=torch.zeros(4, 2, dtype=torch.long))


def test_inputs_on_two_devices_are_rejected_and_meta_propagates_shapes():
    """k and positions must be on the device of q (a metadata check, ValueError naming the
    argument and both devices); all on ``meta``, shapes propagate."""
    rope = RoPE2D(head_dim=8)
    q, pos = torch.randn(2, 2, 3, 8), torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"positions must be on the device of q \(cpu\), got a tensor on meta"):
        rope(q, q, positions=pos.to("meta"))
    with pytest.raises(ValueError, match=r"k must be on the device of q \(meta\), got a tensor on cpu"):
        rope(q.to("meta"), q, positions=pos)
    q2, k2 = rope(q.to("meta"), q.to("meta"), positions=pos.to("meta"))
    assert q2.device.type == "meta" and q2.shape == q.shape and k2.shape == q.shape
