from __future__ import annotations

import doctest
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import jepa_blocks.predictors.hierarchical as hier_module
from jepa_blocks.masking.indices import MaskIndices, mask_to_indices
from jepa_blocks.positional.sincos import sincos_2d
from jepa_blocks.predictors import HierarchicalPredictor

EMBED = 32
MODES = ["per_block", "shared_context"]


def level_grid(grid, level):
    f = 2**level
    return math.ceil(grid[0] / f), math.ceil(grid[1] / f)


def random_lists(shape, num_cells, *, p, gen, min_count=1):
    """Random padded id lists of shape (*shape, K) over num_cells, at least min_count each."""
    mask = torch.rand(*shape, num_cells, generator=gen) < p
    for idx in torch.cartesian_prod(*[torch.arange(s) for s in shape]).reshape(-1, len(shape)):
        row = mask[tuple(idx.tolist())]
        if int(row.sum()) < min_count:
            row[torch.randperm(num_cells, generator=gen)[:min_count]] = True
    return mask_to_indices(mask)


def make_inputs(grid, num_levels, batch, *, blocks=(2, 1, 1), flat=(), gen=None, p_ctx=0.6, p_tgt=0.3,
                dtype=torch.float32):
    """Context tokens, context MaskIndices (B, Nc) and per-level target MaskIndices."""
    gen = gen or torch.Generator().manual_seed(0)
    n0 = grid[0] * grid[1]
    ctx = random_lists((batch,), n0, p=p_ctx, gen=gen)
    context = torch.randn(batch, ctx.shape[-1], EMBED, generator=gen, dtype=dtype)
    targets = []
    for lvl in range(num_levels):
        lh, lw = level_grid(grid, lvl)
        shape = (batch,) if lvl in flat else (batch, blocks[lvl % len(blocks)])
        targets.append(random_lists(shape, lh * lw, p=p_tgt, gen=gen))
    return context, ctx, targets


def make_model(grid, num_levels=1, **kw):
    torch.manual_seed(0)
    defaults = dict(grid_size=grid, embed_dim=EMBED, predictor_dim=32, depth=2, num_heads=2,
                    num_levels=num_levels)
    defaults.update(kw)
    return HierarchicalPredictor(**defaults)


def scale_up_blocks(model, factor=10.0):
    """Larger transformer weights than the init (std 0.02), so that attention is far from
    uniform and the residual branches matter: a reference mismatch cannot hide."""
    with torch.no_grad():
        for p in model.blocks.parameters():
            if p.ndim == 2:
                p.mul_(factor)
    return model


def valid_slots(out, t):
    """Outputs at real target slots, as a flat (n, D) tensor."""
    return out[t.valid]


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
@pytest.mark.parametrize(
    "grid,num_levels,batch",
    [((4, 4), 1, 1), ((8, 8), 2, 3), ((7, 7), 3, 2), ((6, 8), 3, 2), ((5, 4), 2, 1)],
)
def test_output_shapes(mode, pos_embed, grid, num_levels, batch):
    model = make_model(grid, num_levels, pos_embed=pos_embed, out_dim=[8, 12, 16][:num_levels], mode=mode)
    context, ctx, targets = make_inputs(grid, num_levels, batch, flat=(1,))
    out = model(context, context_indices=ctx, targets=targets)
    assert isinstance(out, list) and len(out) == num_levels
    for lvl, (o, t) in enumerate(zip(out, targets, strict=True)):
        assert o.shape == (*t.shape, [8, 12, 16][lvl])
        assert torch.isfinite(o).all()  # padded slots too


@settings(max_examples=15, deadline=None)
@given(
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    batch=st.integers(1, 3),
    data=st.data(),
)
def test_output_shapes_property(h, w, batch, data):
    max_levels = 1 + math.ceil(math.log2(max(h, w)))
    num_levels = data.draw(st.integers(1, min(max_levels, 3)))
    pos_embed = data.draw(st.sampled_from(["sincos", "rope"]))
    mode = data.draw(st.sampled_from(MODES))
    blocks = tuple(data.draw(st.integers(1, 3)) for _ in range(num_levels))
    seed = data.draw(st.integers(0, 2**16))
    model = make_model((h, w), num_levels, pos_embed=pos_embed, depth=1, mode=mode)
    context, ctx, targets = make_inputs((h, w), num_levels, batch, blocks=blocks,
                                        gen=torch.Generator().manual_seed(seed))
    out = model(context, context_indices=ctx, targets=targets)
    for o, t in zip(out, targets, strict=True):
        assert o.shape == (*t.shape, EMBED)
        assert torch.isfinite(o).all()


def test_single_level_accepts_plain_mask_indices_and_tensors():
    grid = (6, 6)
    model = make_model(grid)
    context, ctx, (t,) = make_inputs(grid, 1, 2)
    a = model(context, context_indices=ctx, targets=t)[0]
    b = model(context, context_indices=ctx, targets=[t])[0]
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # Long tensors count as all valid.
    ids = torch.tensor([[[0, 7, 35]], [[1, 2, 3]]])
    out = model(context[:, :5], context_indices=torch.tensor([[4, 5, 6, 8, 9]] * 2), targets=ids)
    assert out[0].shape == (2, 1, 3, EMBED)


@pytest.mark.parametrize("mode", MODES)
def test_empty_target_lists_give_empty_outputs(mode):
    grid = (4, 4)
    model = make_model(grid, 2, mode=mode)
    context, ctx, _ = make_inputs(grid, 2, 2)
    t0 = MaskIndices(torch.zeros(2, 3, 0, dtype=torch.long), torch.zeros(2, 3, 0, dtype=torch.bool))
    t1 = MaskIndices(torch.zeros(2, 0, 4, dtype=torch.long), torch.zeros(2, 0, 4, dtype=torch.bool))
    out = model(context, context_indices=ctx, targets=[t0, t1])
    assert out[0].shape == (2, 3, 0, EMBED) and out[1].shape == (2, 0, 4, EMBED)
    # One level empty, the other not.
    t1 = MaskIndices(torch.tensor([[[0, 3]], [[1, 2]]]), torch.ones(2, 1, 2, dtype=torch.bool))
    out = model(context, context_indices=ctx, targets=[t0, t1])
    assert out[0].shape == (2, 3, 0, EMBED) and out[1].shape == (2, 1, 2, EMBED)
    assert torch.isfinite(out[1]).all()


def test_doctest_example_runs():
    assert doctest.testmod(hier_module).failed == 0


# --------------------------------------------------------------------------- parity


def reference_forward(model, context, ctx, targets, grid, *, shared_context=False):
    """Per-sample, per-block loop over unpadded sequences, positions computed from scratch.

    ``shared_context=True``: the semantics of ``mode="shared_context"``, the same loop with
    the context rows attending to the context columns only (an explicit (N, N) mask)."""
    outs = []
    for lvl, t in enumerate(targets):
        t3 = MaskIndices(t.indices[:, None], t.valid[:, None]) if t.indices.ndim == 2 else t
        out = torch.zeros(*t3.shape, model.out_dims[lvl], dtype=context.dtype)
        f = 2**lvl
        _, lw = level_grid(grid, lvl)
        for b in range(context.shape[0]):
            c_ids = [int(i) for i, v in zip(ctx.indices[b], ctx.valid[b], strict=True) if v]
            c_tok = model.predictor_embed(context[b, ctx.valid[b]])
            c_pos = [(i // grid[1], i % grid[1]) for i in c_ids]
            for m in range(t3.shape[1]):
                q_ids = [int(i) for i, v in zip(t3.indices[b, m], t3.valid[b, m], strict=True) if v]
                if not q_ids:
                    continue
                # Centre of each coarse cell's level-0 footprint (clipped at the edge).
                q_pos = []
                for i in q_ids:
                    r, c = divmod(i, lw)
                    rows = range(r * f, min((r + 1) * f, grid[0]))
                    cols = range(c * f, min((c + 1) * f, grid[1]))
                    q_pos.append((sum(rows) / len(rows), sum(cols) / len(cols)))
                pos = torch.tensor(c_pos + q_pos, dtype=torch.float64)
                q_tok = model.mask_tokens[lvl].expand(len(q_ids), -1)
                seq = torch.cat((c_tok, q_tok))[None]
                rope = None
                if model.pos_embed == "sincos":
                    seq = seq + sincos_2d(pos, model.predictor_dim).to(seq.dtype)
                else:
                    rope = model.rope.cos_sin(pos)
                mask = None
                if shared_context:
                    n, nc = seq.shape[1], len(c_ids)
                    mask = torch.ones(1, 1, n, n, dtype=torch.bool)
                    mask[..., :nc, nc:] = False  # context rows do not see the queries
                for block in model.blocks:
                    seq = block(seq, rope=rope, attn_mask=mask)
                pred = model.heads[lvl](model.norm(seq[0, len(c_ids):]))
                out[b, m, : len(q_ids)] = pred
        outs.append(out[:, 0] if t.indices.ndim == 2 else out)
    return outs


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
@pytest.mark.parametrize("grid,num_levels", [((7, 7), 3), ((6, 8), 2)])
def test_matches_per_block_reference(pos_embed, grid, num_levels):
    model = make_model(grid, num_levels, pos_embed=pos_embed, out_dim=[8, 12, 16][:num_levels]).double()
    context, ctx, targets = make_inputs(grid, num_levels, 3, flat=(1,), dtype=torch.float64)
    with torch.no_grad():
        out = model(context, context_indices=ctx, targets=targets)
        ref = reference_forward(model, context, ctx, targets, grid)
    for o, r, t in zip(out, ref, targets, strict=True):
        # Tolerance: the model's position tables are float32, the reference's float64.
        torch.testing.assert_close(valid_slots(o, t), valid_slots(r, t), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- shared-context mode


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
@pytest.mark.parametrize("grid,num_levels,call_grid,call_levels", [
    ((7, 7), 3, None, None),
    ((6, 8), 2, None, None),
    ((8, 8), 3, (5, 6), 2),  # grid_size= and num_levels= at forward
    ((8, 8), 3, (3, 4), 1),
])
def test_shared_context_matches_its_per_block_reference(pos_embed, grid, num_levels, call_grid, call_levels):
    model = make_model(grid, num_levels, pos_embed=pos_embed, out_dim=[8, 12, 16][:num_levels],
                       mode="shared_context").double()
    scale_up_blocks(model)
    g = call_grid or grid
    levels = call_levels or num_levels
    context, ctx, targets = make_inputs(g, levels, 3, blocks=(3, 2, 1), flat=(1,), dtype=torch.float64)
    with torch.no_grad():
        out = model(context, context_indices=ctx, targets=targets, grid_size=call_grid, num_levels=call_levels)
        ref = reference_forward(model, context, ctx, targets, g, shared_context=True)
        other = reference_forward(model, context, ctx, targets, g)  # per-block semantics
    assert len(out) == levels
    for o, r, x, t in zip(out, ref, other, targets, strict=True):
        torch.testing.assert_close(valid_slots(o, t), valid_slots(r, t), rtol=1e-5, atol=1e-5)
        # Not the per-block mode: there the context also attends to the queries.
        assert (valid_slots(o, t) - valid_slots(x, t)).abs().max() > 1e-3  # 100 x the tolerance


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_shared_context_gradients_match_the_reference(pos_embed):
    grid = (6, 8)
    model = make_model(grid, 3, pos_embed=pos_embed, mode="shared_context", depth=3,
                       layer_scale_init=0.3).double()
    scale_up_blocks(model, 5.0)
    context, ctx, targets = make_inputs(grid, 3, 2, flat=(2,), dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    weights = [torch.randn(*t.shape, EMBED, generator=gen, dtype=torch.float64) * t.valid[..., None]
               for t in targets]
    grads = []
    for run in (model, lambda *a, **k: reference_forward(model, *a[:1], k["context_indices"],
                                                          k["targets"], grid, shared_context=True)):
        model.zero_grad()
        x = context.clone().requires_grad_(True)
        out = run(x, context_indices=ctx, targets=targets)
        sum((o * w).sum() for o, w in zip(out, weights, strict=True)).backward()
        grads.append((x.grad, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (g1, p1), (g2, p2) = grads
    # Tolerance: float32 position tables in the model, float64 in the reference.
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-6 * float(g2.abs().max()))
    assert (g1[~ctx.valid] == 0).all()  # padded context tokens get nothing
    for name in p1:
        assert p2[name].abs().max() > 0, name  # every parameter takes part
        torch.testing.assert_close(p1[name], p2[name], rtol=1e-5, atol=1e-6 * float(p2[name].abs().max()),
                                   msg=lambda m, name=name: f"{name}: {m}")


@settings(max_examples=12, deadline=None)
@given(
    pos_embed=st.sampled_from(["sincos", "rope"]),
    blocks=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    level=st.integers(0, 1),
    seed=st.integers(0, 2**16),
)
def test_shared_context_block_alone_equals_block_among_others(pos_embed, blocks, level, seed):
    """Each block's prediction is a function of the context and that block only: running it
    alone (every other block and level removed) or among new random blocks gives the same."""
    grid = (6, 6)
    model = make_model(grid, 2, pos_embed=pos_embed, mode="shared_context", depth=2).double()
    gen = torch.Generator().manual_seed(seed)
    context, ctx, targets = make_inputs(grid, 2, 2, blocks=blocks, gen=gen, dtype=torch.float64)
    j = int(torch.randint(0, targets[level].shape[1], (1,), generator=gen))
    with torch.no_grad():
        out = model(context, context_indices=ctx, targets=targets)[level][:, j]
        t = targets[level]
        alone = [MaskIndices(torch.zeros(2, 0, 1, dtype=torch.long), torch.zeros(2, 0, 1, dtype=torch.bool))] * 2
        alone[level] = MaskIndices(t.indices[:, j : j + 1], t.valid[:, j : j + 1])
        out_alone = model(context, context_indices=ctx, targets=alone)[level][:, 0]
        # Other blocks replaced by new random ones (other ids, positions and lengths).
        new = [random_lists((2, 3), 36 if lvl == 0 else 9, p=0.5, gen=gen) for lvl in range(2)]
        k = max(new[level].shape[-1], t.shape[-1])
        ids = torch.nn.functional.pad(new[level].indices, (0, k - new[level].shape[-1]))
        valid = torch.nn.functional.pad(new[level].valid, (0, k - new[level].shape[-1]), value=False)
        ids[:, 1, : t.shape[-1]], valid[:, 1] = t.indices[:, j], False
        valid[:, 1, : t.shape[-1]] = t.valid[:, j]
        new[level] = MaskIndices(ids, valid)
        out_among = model(context, context_indices=ctx, targets=new)[level][:, 1, : t.shape[-1]]
    v = t.valid[:, j]
    torch.testing.assert_close(out_alone[v], out[v])
    torch.testing.assert_close(out_among[v], out[v])


def test_modes_share_parameters_and_mode_is_checked():
    per_block = make_model((6, 6), 2)
    shared = make_model((6, 6), 2, mode="shared_context")
    assert per_block.mode == "per_block"  # the default (I-JEPA)
    shared.load_state_dict(per_block.state_dict())  # same parameters, same names
    assert "mode='shared_context'" in repr(shared)
    with pytest.raises(ValueError, match="mode"):
        make_model((6, 6), mode="shared")
    with pytest.raises(TypeError, match="mode"):
        make_model((6, 6), mode=None)
    context, ctx, targets = make_inputs((6, 6), 2, 2)
    shared.mode = "context"  # reassigned after construction: checked at forward
    with pytest.raises(ValueError, match="mode"):
        shared(context, context_indices=ctx, targets=targets)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_gradients_reach_context_mask_tokens_and_heads(mode, pos_embed):
    grid = (6, 8)
    model = make_model(grid, 3, pos_embed=pos_embed, mode=mode)
    context, ctx, targets = make_inputs(grid, 3, 2, flat=(2,))
    context.requires_grad_(True)
    out = model(context, context_indices=ctx, targets=targets)
    loss = sum((o * t.valid[..., None]).square().sum() for o, t in zip(out, targets, strict=True))
    loss.backward()
    assert context.grad[ctx.valid].abs().sum(-1).gt(0).all()  # every real context token
    assert (context.grad[~ctx.valid] == 0).all()  # padded context tokens get nothing
    for lvl in range(3):
        assert model.mask_tokens.grad[lvl].abs().sum() > 0
        assert model.heads[lvl].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- masking invariants


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_padded_context_tokens_are_ignored(mode, pos_embed):
    grid = (7, 7)
    model = make_model(grid, 2, pos_embed=pos_embed, mode=mode).double()
    context, ctx, targets = make_inputs(grid, 2, 3, dtype=torch.float64)
    assert (~ctx.valid).any()
    out = model(context, context_indices=ctx, targets=targets)
    gen = torch.Generator().manual_seed(1)
    pad = ~ctx.valid
    context2 = context.clone()
    context2[pad] = 100 * torch.randn(int(pad.sum()), EMBED, generator=gen, dtype=torch.float64)
    ids2 = ctx.indices.clone()
    ids2[pad] = torch.randint(0, 49, (int(pad.sum()),), generator=gen)
    out2 = model(context2, context_indices=MaskIndices(ids2, ctx.valid), targets=targets)
    for o, o2, t in zip(out, out2, targets, strict=True):
        torch.testing.assert_close(valid_slots(o2, t), valid_slots(o, t))
    # Extra padding appended to the context changes nothing either.
    context3 = torch.cat((context, torch.randn(3, 4, EMBED, dtype=torch.float64)), dim=1)
    ctx3 = MaskIndices(torch.cat((ctx.indices, torch.zeros(3, 4, dtype=torch.long)), 1),
                       torch.cat((ctx.valid, torch.zeros(3, 4, dtype=torch.bool)), 1))
    out3 = model(context3, context_indices=ctx3, targets=targets)
    for o, o3, t in zip(out, out3, targets, strict=True):
        torch.testing.assert_close(valid_slots(o3, t), valid_slots(o, t))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_padded_queries_do_not_change_real_queries(mode, pos_embed):
    grid = (8, 8)
    model = make_model(grid, 2, pos_embed=pos_embed, mode=mode).double()
    context, ctx, targets = make_inputs(grid, 2, 2, dtype=torch.float64)
    out = model(context, context_indices=ctx, targets=targets)
    gen = torch.Generator().manual_seed(2)
    new_targets = []
    for lvl, t in enumerate(targets):
        n = level_grid(grid, lvl)[0] * level_grid(grid, lvl)[1]
        extra = 3
        ids = torch.cat((t.indices, torch.zeros(*t.shape[:-1], extra, dtype=torch.long)), -1)
        valid = torch.cat((t.valid, torch.zeros(*t.shape[:-1], extra, dtype=torch.bool)), -1)
        ids[~valid] = torch.randint(0, n, (int((~valid).sum()),), generator=gen)  # garbage ids
        new_targets.append(MaskIndices(ids, valid))
    out2 = model(context, context_indices=ctx, targets=new_targets)
    for o, o2, t, t2 in zip(out, out2, targets, new_targets, strict=True):
        torch.testing.assert_close(valid_slots(o2, t2), valid_slots(o, t))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_blocks_do_not_see_each_other(mode, pos_embed):
    grid = (8, 8)
    model = make_model(grid, 2, pos_embed=pos_embed, mode=mode).double()
    context, ctx, targets = make_inputs(grid, 2, 2, blocks=(2, 2), dtype=torch.float64)
    out = model(context, context_indices=ctx, targets=targets)
    # New ids (and a different length) for block 1 of level 0 and for every level-1 block.
    gen = torch.Generator().manual_seed(3)
    t0 = targets[0]
    other = random_lists((2,), 64, p=0.5, gen=gen)
    k = max(t0.shape[-1], other.shape[-1])

    def pad(x, value):
        return torch.nn.functional.pad(x, (0, k - x.shape[-1]), value=value)

    ids = torch.stack((pad(t0.indices[:, 0], 0), pad(other.indices, 0)), 1)
    valid = torch.stack((pad(t0.valid[:, 0], False), pad(other.valid, False)), 1)
    new_t1 = random_lists((2, 3), 16, p=0.7, gen=gen)
    out2 = model(context, context_indices=ctx, targets=[MaskIndices(ids, valid), new_t1])
    v = t0.valid[:, 0]
    torch.testing.assert_close(out2[0][:, 0, : t0.shape[-1]][v], out[0][:, 0][v])
    assert not torch.allclose(out2[0][:, 1][valid[:, 1]][:3], out[0][:, 1][t0.valid[:, 1]][:3])


@pytest.mark.parametrize("mode", MODES)
def test_batch_consistency(mode):
    grid = (6, 8)
    model = make_model(grid, 2, pos_embed="rope", mode=mode).double()
    context, ctx, targets = make_inputs(grid, 2, 3, dtype=torch.float64)
    out = model(context, context_indices=ctx, targets=targets)
    for i in range(3):
        # Sample i alone, with its own (tighter) padding.
        kc = int(ctx.valid[i].sum())
        ctx_i = MaskIndices(ctx.indices[i : i + 1, :kc], ctx.valid[i : i + 1, :kc])
        t_i = []
        for t in targets:
            k = int(t.valid[i].sum(-1).max())
            t_i.append(MaskIndices(t.indices[i : i + 1, ..., :k], t.valid[i : i + 1, ..., :k]))
        out_i = model(context[i : i + 1, :kc], context_indices=ctx_i, targets=t_i)
        for o, oi, t, ti in zip(out, out_i, targets, t_i, strict=True):
            torch.testing.assert_close(oi[ti.valid], o[i : i + 1][t.valid[i : i + 1]])


# --------------------------------------------------------------------------- fast vs slow paths


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_fused_matches_manual_attention(mode, pos_embed):
    grid = (7, 7)
    fused = make_model(grid, 2, pos_embed=pos_embed, fused_attn=True, mode=mode).double()
    manual = make_model(grid, 2, pos_embed=pos_embed, fused_attn=False, mode=mode).double()
    manual.load_state_dict(fused.state_dict())
    assert not manual.blocks[0].attn.fused
    context, ctx, targets = make_inputs(grid, 2, 2, dtype=torch.float64)
    a = fused(context, context_indices=ctx, targets=targets)
    b = manual(context, context_indices=ctx, targets=targets)
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("mode", MODES)
def test_grad_checkpointing_matches(mode, monkeypatch):
    grid = (6, 6)
    plain = make_model(grid, 2, drop_path_rate=0.3, pos_embed="rope", mode=mode).double()
    ckpt = make_model(grid, 2, drop_path_rate=0.3, pos_embed="rope", grad_checkpointing=True,
                      mode=mode).double()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    real = hier_module.checkpoint

    def spy(*args, **kwargs):
        calls.append(kwargs.get("use_reentrant"))
        return real(*args, **kwargs)

    monkeypatch.setattr(hier_module, "checkpoint", spy)
    context, ctx, targets = make_inputs(grid, 2, 2, dtype=torch.float64)
    results = []
    for model in (plain, ckpt):
        model.train()
        x = context.clone().requires_grad_(True)
        torch.manual_seed(5)  # same drop-path draws in both runs
        out = model(x, context_indices=ctx, targets=targets)
        sum((o * t.valid[..., None]).sum() for o, t in zip(out, targets, strict=True)).backward()
        grads = {n: p.grad for n, p in model.named_parameters()}
        results.append((out, x.grad, grads))
    assert calls == [False, False]  # one call per block, non-reentrant
    (o1, g1, p1), (o2, g2, p2) = results
    for a, b in zip(o1, o2, strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(g1, g2)
    for name in p1:
        torch.testing.assert_close(p1[name], p2[name], msg=name)
    # Not used in eval mode.
    calls.clear()
    ckpt.eval()
    ckpt(context, context_indices=ctx, targets=targets)
    assert calls == []


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_bf16_autocast_close_to_fp32(mode, pos_embed):
    grid = (7, 7)
    model = make_model(grid, 3, pos_embed=pos_embed, mode=mode)
    context, ctx, targets = make_inputs(grid, 3, 2)
    with torch.no_grad():
        ref = model(context, context_indices=ctx, targets=targets)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(context, context_indices=ctx, targets=targets)
    for r, lo in zip(ref, low, strict=True):
        assert lo.dtype == torch.bfloat16
        torch.testing.assert_close(lo.float(), r, rtol=0.05, atol=0.02)


# --------------------------------------------------------------------------- init


def test_init_follows_ijepa():
    model = make_model((8, 8), 2, depth=3, predictor_dim=128, num_heads=4)
    assert model.mask_tokens.shape == (2, 128)
    # trunc_normal_(std=0.02) with torch's default bounds [-2, 2]: effectively N(0, 0.02^2).
    assert abs(float(model.mask_tokens.detach().std()) / 0.02 - 1) < 0.15
    assert (model.predictor_embed.bias == 0).all()
    assert abs(float(model.predictor_embed.weight.detach().std()) / 0.02 - 1) < 0.1
    # Residual projections rescaled by 1 / sqrt(2 * layer_id).
    for layer_id, block in enumerate(model.blocks, start=1):
        expected = 0.02 / math.sqrt(2 * layer_id)
        for w in (block.mlp.fc2.weight, block.attn.proj.weight):
            assert abs(float(w.detach().std()) / expected - 1) < 0.1
        assert abs(float(block.attn.qkv.weight.detach().std()) / 0.02 - 1) < 0.1
    # Positional tables are not part of the state dict.
    assert not any("pos_table" in k or "rope_" in k for k in model.state_dict())


def test_drop_path_rises_linearly():
    model = make_model((4, 4), depth=3, drop_path_rate=0.2, layer_scale_init=1e-5)
    rates = [b.drop_path1.drop_prob if hasattr(b.drop_path1, "drop_prob") else 0.0 for b in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2])
    assert all(float(b.ls1.gamma.detach()[0]) == pytest.approx(1e-5) for b in model.blocks)


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "kwargs,exc,match",
    [
        (dict(predictor_dim=30, num_heads=4), ValueError, "num_heads"),
        (dict(predictor_dim=30, num_heads=3), ValueError, "predictor_dim"),  # sincos needs 4 | P
        (dict(predictor_dim=24, num_heads=4, pos_embed="rope"), ValueError, "predictor_dim"),
        (dict(num_levels=0), ValueError, "num_levels"),
        (dict(num_levels=5), ValueError, "num_levels"),  # 8 x 8 has 4 levels: 8, 4, 2, 1
        (dict(num_levels=2, out_dim=[8]), ValueError, "out_dim"),
        (dict(out_dim=0), ValueError, "out_dim"),
        (dict(out_dim="8"), TypeError, "out_dim"),
        (dict(pos_embed="learned"), ValueError, "pos_embed"),
        (dict(drop_path_rate=1.0), ValueError, "drop_path_rate"),
        (dict(depth=0), ValueError, "depth"),
        (dict(grid_size=(0, 4)), ValueError, "grid_size"),
        (dict(embed_dim=2.0), TypeError, "embed_dim"),
        (dict(rope_theta=1.0, pos_embed="rope"), ValueError, "rope_theta"),
        (dict(grad_checkpointing=1), TypeError, "grad_checkpointing"),
    ],
)
def test_bad_hyperparameters(kwargs, exc, match):
    base = dict(grid_size=(8, 8), embed_dim=EMBED, predictor_dim=32, depth=1, num_heads=2)
    base.update(kwargs)
    with pytest.raises(exc, match=match):
        HierarchicalPredictor(**base)


def test_bad_forward_inputs():
    grid = (6, 6)
    model = make_model(grid, 2)
    context, ctx, targets = make_inputs(grid, 2, 2)

    def call(c=context, ci=ctx, t=targets):
        return model(c, context_indices=ci, targets=t)

    with pytest.raises(TypeError, match="context"):
        call(c=context.tolist())
    with pytest.raises(ValueError, match="context"):
        call(c=context[0])
    with pytest.raises(ValueError, match="embed_dim"):
        call(c=context[..., :16])
    with pytest.raises(TypeError, match="context"):
        call(c=context.long())
    with pytest.raises(ValueError, match="context_indices"):
        call(ci=MaskIndices(ctx.indices[:, :-1], ctx.valid[:, :-1]))
    with pytest.raises(ValueError, match="context_indices"):
        call(ci=MaskIndices(ctx.indices + 36, ctx.valid))
    with pytest.raises(TypeError, match="context_indices"):
        call(ci=ctx.indices.float())
    with pytest.raises(ValueError, match="targets"):
        call(t=targets[:1])
    with pytest.raises(TypeError, match="targets"):
        call(t=targets[0])  # a single MaskIndices for num_levels=2
    with pytest.raises(TypeError, match="targets"):
        call(t=[targets[0], "oops"])
    bad = MaskIndices(targets[1].indices.clone(), targets[1].valid)
    bad.indices[0, 0, 0] = 9  # level-1 grid of 6 x 6 is 3 x 3 = 9 cells
    with pytest.raises(ValueError, match=r"targets\[1\]"):
        call(t=[targets[0], bad])
    with pytest.raises(ValueError, match=r"targets\[0\]"):
        call(t=[MaskIndices(targets[0].indices[:1], targets[0].valid[:1]), targets[1]])
    with pytest.raises(ValueError, match=r"targets\[0\]"):
        call(t=[torch.zeros(2, 1, 1, 3, dtype=torch.long), targets[1]])


# --------------------------------------------------------------------------- grid at forward time


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
@pytest.mark.parametrize("default", [(8, 8), None])
def test_forward_grid_matches_a_predictor_built_for_that_grid(mode, pos_embed, default):
    g2 = (5, 6)
    shared = make_model(default, 2, pos_embed=pos_embed, mode=mode)  # grid_size=None: no default grid
    built = make_model(g2, 2, pos_embed=pos_embed, mode=mode)
    built.load_state_dict(shared.state_dict())
    context, ctx, targets = make_inputs(g2, 2, 3, flat=(1,))
    out = shared(context, context_indices=ctx, targets=targets, grid_size=g2)
    ref = built(context, context_indices=ctx, targets=targets)
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=0, atol=0)
    if default is not None:  # the default grid still works, and equals passing it
        context, ctx, targets = make_inputs(default, 2, 2)
        a = shared(context, context_indices=ctx, targets=targets)
        b = shared(context, context_indices=ctx, targets=targets, grid_size=default)
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_one_predictor_trains_on_global_and_local_crops():
    model = make_model((8, 8), 2, pos_embed="rope")
    loss = 0
    for grid in ((8, 8), (4, 4)):  # global views, then small local crops: same weights
        context, ctx, targets = make_inputs(grid, 2, 2)
        out = model(context, context_indices=ctx, targets=targets, grid_size=grid)
        loss = loss + sum((o * t.valid[..., None]).square().sum() for o, t in zip(out, targets, strict=True))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
@pytest.mark.parametrize("local_grid,local_levels", [((3, 4), 1), ((2, 2), 2)])
def test_first_levels_on_a_small_grid_match_a_weight_tied_predictor(mode, pos_embed, local_grid, local_levels):
    """What multi-crop training used to build: a second predictor on the local grid whose
    every weight is the main one's (level l: mask token and head l). The main predictor
    called with grid_size and num_levels computes exactly the same."""
    main = make_model((8, 8), 3, pos_embed=pos_embed, out_dim=[8, 12, 16], mode=mode)
    tied = make_model(local_grid, local_levels, pos_embed=pos_embed, mode=mode)
    for name in ("predictor_embed", "mask_tokens", "blocks", "norm", "heads"):
        setattr(tied, name, getattr(main, name))
    context, ctx, targets = make_inputs(local_grid, local_levels, 3)
    out = main(context, context_indices=ctx, targets=targets, grid_size=local_grid, num_levels=local_levels)
    ref = tied(context, context_indices=ctx, targets=targets)
    assert len(out) == local_levels
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=0, atol=0)
    # The default grid still predicts every level.
    context, ctx, targets = make_inputs((8, 8), 3, 2)
    assert len(main(context, context_indices=ctx, targets=targets)) == 3


def test_position_tables_are_cached_per_grid():
    model = make_model((8, 8), 2)
    assert list(model._grid_tables) == [(8, 8)]  # the default grid, built at construction
    context, ctx, targets = make_inputs((4, 6), 2, 2)
    model(context, context_indices=ctx, targets=targets, grid_size=(4, 6))
    tables = model._grid_tables[(4, 6)]
    model(context, context_indices=ctx, targets=targets, grid_size=(4, 6))
    assert model._grid_tables[(4, 6)] is tables  # reused, not rebuilt
    assert tables.pos.dtype == torch.float32 and tables.level_cells == [24, 6]
    assert not any("table" in k or "rope" in k for k in model.state_dict())
    # .double() / .to() drop the cache; the next call rebuilds it and gives the same result.
    before = model(context, context_indices=ctx, targets=targets, grid_size=(4, 6))
    model.double()
    assert not model._grid_tables
    after = model(context.double(), context_indices=ctx, targets=targets, grid_size=(4, 6))
    assert model._grid_tables[(4, 6)].pos.dtype == torch.float32  # cast at use
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(b.float(), a, rtol=1e-5, atol=1e-5)
    # The cache is bounded: the oldest grid goes first.
    for side in range(1, 2 * hier_module._MAX_CACHED_GRIDS):
        model._tables_for((side + 1, 3), torch.device("cpu"))
    assert len(model._grid_tables) == hier_module._MAX_CACHED_GRIDS


def test_bad_forward_grid_names_it():
    model = make_model((8, 8), 3)  # 3 levels: 8, 4, 2
    context, ctx, targets = make_inputs((8, 8), 3, 2)

    def call(grid, m=model):
        return m(context, context_indices=ctx, targets=targets, grid_size=grid)

    with pytest.raises(ValueError, match="grid_size.*num_levels=3"):
        call((2, 2))  # 2 x 2 has 2 levels only
    with pytest.raises(ValueError, match=r"grid_size\[0\]"):
        call((0, 8))
    with pytest.raises(TypeError, match="grid_size"):
        call("8x8")
    with pytest.raises(ValueError, match="context_indices"):
        call((4, 4))  # context ids of the 8 x 8 grid do not fit 4 x 4
    with pytest.raises(ValueError, match="grid_size must be passed"):
        call(None, make_model(None, 3))
    for bad in (0, 4):
        with pytest.raises(ValueError, match="num_levels"):
            model(context, context_indices=ctx, targets=targets, num_levels=bad)
    with pytest.raises(TypeError, match="num_levels"):
        model(context, context_indices=ctx, targets=targets, num_levels=1.0)
    with pytest.raises(ValueError, match=r"targets must hold one entry per level \(num_levels=2\)"):
        model(context, context_indices=ctx, targets=targets, num_levels=2)
    assert len(model(context, context_indices=ctx, targets=targets[:2], num_levels=2)) == 2
    assert len(model(context, context_indices=ctx, targets=targets[0], num_levels=1)) == 1
    # Without a default grid, num_levels is checked at forward only.
    assert make_model(None, 9).num_levels == 9


@pytest.mark.slow
def test_forward_grid_under_torch_compile():
    torch._dynamo.reset()
    model = make_model((8, 8), 2, pos_embed="rope", depth=1)
    compiled = torch.compile(model, backend="aot_eager")
    try:
        for grid in ((8, 8), (4, 6), (4, 6)):
            context, ctx, targets = make_inputs(grid, 2, 2)
            out = compiled(context, context_indices=ctx, targets=targets, grid_size=grid)
            ref = model(context, context_indices=ctx, targets=targets, grid_size=grid)
            for o, r in zip(out, ref, strict=True):
                torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()
