"""torch.compile, torch.export and ONNX of the encoder (and of a full training step).

Compiled and exported code must compute what eager code computes. Tolerances: float32
throughout; compiled loss and gradients within ``rtol=1e-4, atol=1e-6`` of eager on the
``aot_eager`` backend (same kernels, so it matches to rounding) and ``rtol=1e-4,
atol=1e-5`` with inductor (fused kernels reorder reductions); exported and ONNX outputs
within ``rtol=1e-4, atol=1e-5``.

Compile time dominates: the full chain (encoder with dropped tokens, hierarchical
predictor, latent loss, SIGReg and VICReg) runs on the ``aot_eager`` backend (dynamo +
AOTAutograd, no code generation); inductor, which needs a C++ compiler on CPU, compiles
the encoder alone.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from jepa_blocks._checks import value_checks
from jepa_blocks.encoders import EncoderTokens, ViTEncoder, export_encoder
from jepa_blocks.layers import attention_mask_from_valid
from jepa_blocks.losses import LatentPredictionLoss, SIGRegLoss, VICRegLoss
from jepa_blocks.masking import MaskIndices, MultiBlockMasker
from jepa_blocks.predictors import HierarchicalPredictor
from jepa_blocks.targets.hierarchy import hierarchical_targets

GRID = 8
IMG = 32  # 8 x 8 patches of 4 x 4 pixels
COMPILE_TOL = dict(rtol=1e-4, atol=1e-6)
EXPORT_TOL = dict(rtol=1e-4, atol=1e-5)


def tiny_encoder(**kwargs) -> ViTEncoder:
    return ViTEncoder(img_size=IMG, patch_size=4, embed_dim=32, depth=2, num_heads=4, **kwargs)


def context_masks(batch: int, seed: int, levels: int = 1):
    masker = MultiBlockMasker(grid_size=GRID, levels=levels, num_targets=2, min_context_tokens=4)
    return masker(batch, generator=torch.Generator().manual_seed(seed))


def images(batch: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def random_keep(batch: int, k: int, seed: int) -> torch.Tensor:
    """Long ``(batch, k)``: ``k`` distinct ascending token ids per sample."""
    gen = torch.Generator().manual_seed(seed)
    rows = [torch.randperm(GRID * GRID, generator=gen)[:k].sort().values for _ in range(batch)]
    return torch.stack(rows)



@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- compile


@pytest.mark.slow
@pytest.mark.parametrize("keep", ["none", "tensor", "mask_indices"])
def test_encoder_forward_has_no_graph_breaks(keep):
    torch.manual_seed(0)
    enc = tiny_encoder(pos_embed="rope" if keep == "tensor" else "sincos")
    masks = context_masks(2, seed=0).context
    kwargs = {"none": {}, "tensor": {"keep": masks.indices}, "mask_indices": {"keep": masks}}[keep]
    explanation = torch._dynamo.explain(enc)(images(2, 0), **kwargs)
    reasons = [r.reason for r in explanation.break_reasons]
    assert explanation.graph_break_count == 0, reasons
    assert explanation.graph_count == 1


@pytest.mark.slow
def test_new_mask_lengths_recompile_once_then_reuse_the_dynamic_graph():
    torch.manual_seed(0)
    enc = tiny_encoder()
    counter = CompileCounter()
    compiled = torch.compile(enc, backend=counter)
    lengths = set()
    for seed in range(4):
        masks = context_masks(3, seed=seed).context
        lengths.add(masks.shape[1])
        x = images(3, seed)
        torch.testing.assert_close(compiled(x, keep=masks).tokens, enc(x, keep=masks).tokens)
    assert len(lengths) >= 3  # the test sees different mask lengths
    assert counter.frame_count == 2  # static graph, then one with a symbolic K


class _Chain:
    """One H-JEPA step: context encoder on kept tokens, target features from the full
    image (no grad), 2-level predictor, latent loss plus SIGReg and VICReg terms."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        self.enc = tiny_encoder()
        self.pred = HierarchicalPredictor(
            grid_size=GRID, embed_dim=32, predictor_dim=32, depth=2, num_heads=4, num_levels=2
        )
        self.latent = LatentPredictionLoss()
        self.sigreg = SIGRegLoss(num_directions=16)
        self.vicreg = VICRegLoss()

    def parameters(self) -> list[torch.nn.Parameter]:
        return [*self.enc.parameters(), *self.pred.parameters()]

    def loss(self, x: torch.Tensor, masks) -> torch.Tensor:
        ctx = self.enc(x, keep=masks.context).tokens  # (B, Kc, D)
        with torch.no_grad():
            full = self.enc(x).tokens
        targets = hierarchical_targets(full, grid_size=GRID, targets=list(masks.targets))
        preds = self.pred(ctx, context_indices=masks.context, targets=list(masks.targets))
        latent = self.latent(preds, targets, [t.valid for t in masks.targets])
        weight = masks.context.valid.unsqueeze(-1).to(ctx.dtype)
        z_ctx = (ctx * weight).sum(1) / weight.sum(1)  # mean over real context tokens
        z_full = self.enc(x).tokens.mean(1)
        reg = self.sigreg(ctx.flatten(0, 1)) + self.vicreg(z_ctx, z_full)
        return latent + 0.1 * reg

    def loss_and_grads(self, fn, x, masks) -> tuple[torch.Tensor, list[torch.Tensor]]:
        for p in self.parameters():
            p.grad = None
        self.sigreg.step.zero_()  # same SIGReg directions for both runs
        loss = fn(x, masks)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in self.parameters()]


@pytest.mark.slow
def test_compiled_training_chain_matches_eager_loss_and_gradients():
    chain = _Chain()
    x, masks = images(4, 0), context_masks(4, seed=0, levels=2)
    assert not bool(masks.context.valid.all())  # padded context lists are exercised
    loss, grads = chain.loss_and_grads(chain.loss, x, masks)
    compiled = torch.compile(chain.loss, backend="aot_eager")
    c_loss, c_grads = chain.loss_and_grads(compiled, x, masks)
    assert torch.isfinite(loss)
    torch.testing.assert_close(c_loss, loss, **COMPILE_TOL)
    assert len(c_grads) == len(grads)
    for c_grad, grad in zip(c_grads, grads, strict=True):
        torch.testing.assert_close(c_grad, grad, **COMPILE_TOL)
    assert int(chain.sigreg.step) == 1  # the buffer update survived compilation


def _cxx_compiler() -> str | None:
    names = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return next((shutil.which(n) for n in names if n and shutil.which(n)), None)


@pytest.mark.slow
@pytest.mark.skipif(_cxx_compiler() is None, reason="inductor on CPU needs a C++ compiler")
def test_inductor_encoder_matches_eager_forward_and_backward():
    torch.manual_seed(0)
    enc = tiny_encoder(pos_embed="rope")
    x, masks = images(3, 1), context_masks(3, seed=1).context

    def run(model):
        enc.zero_grad(set_to_none=True)
        tokens = model(x, keep=masks).tokens
        (tokens * masks.valid.unsqueeze(-1)).square().mean().backward()
        return tokens.detach(), [p.grad.clone() for p in enc.parameters()]

    tokens, grads = run(enc)
    c_tokens, c_grads = run(torch.compile(enc))
    torch.testing.assert_close(c_tokens, tokens, rtol=1e-4, atol=1e-5)
    for c_grad, grad in zip(c_grads, grads, strict=True):
        torch.testing.assert_close(c_grad, grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_all_valid_mask_without_the_host_read_gives_the_same_tokens(fused):
    # While tracing (value checks off) the "no padding" shortcut of the attention mask
    # cannot read `valid`: an all-true mask is built instead and must change nothing.
    torch.manual_seed(0)
    enc = tiny_encoder(fused_attn=fused)
    keep = MaskIndices(random_keep(2, 10, seed=0), torch.ones(2, 10, dtype=torch.bool))
    assert attention_mask_from_valid(keep.valid) is None
    x = images(2, 0)
    out = enc(x, keep=keep)
    with value_checks(False):
        mask = attention_mask_from_valid(keep.valid)
        traced_like = enc(x, keep=keep)
    assert mask is not None and mask.shape == (2, 1, 1, 10) and bool(mask.all())
    torch.testing.assert_close(traced_like.tokens, out.tokens, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def trained() -> dict[str, ViTEncoder]:
    """Encoders after a few AdamW steps on random data (weights away from their init).

    Stochastic depth is on, so an export that forgot eval mode would not match."""
    out = {}
    for pos_embed in ("sincos", "rope"):
        torch.manual_seed(0)
        enc = tiny_encoder(pos_embed=pos_embed, drop_path_rate=0.2, layer_scale_init=0.1)
        opt = torch.optim.AdamW(enc.parameters(), lr=1e-2)
        for step in range(3):
            x, masks = images(4, 10 + step), context_masks(4, seed=10 + step).context
            ctx = enc(x, keep=masks).tokens
            with torch.no_grad():
                target = enc(x).tokens.gather(1, masks.indices.unsqueeze(-1).expand_as(ctx))
            spread = enc(x).tokens.std(0).mean()
            loss = ((ctx - target).square().mean(-1) * masks.valid).mean() - spread
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[pos_embed] = enc
    return out


def eager_tokens(enc: ViTEncoder, x: torch.Tensor, keep=None) -> torch.Tensor:
    was_training = enc.training
    enc.eval()
    with torch.no_grad():
        out = enc(x, keep=keep).tokens
    enc.train(was_training)
    return out


@pytest.mark.parametrize("example_batch", [1, 2])
def test_export_full_image_with_dynamic_batch(trained, example_batch):
    enc = trained["sincos"]
    program = enc.export(images(example_batch, 0))
    assert enc.training  # the encoder's mode is restored
    for batch in (1, 2, 5):
        x = images(batch, batch)
        out = program.module()(x)
        assert out.shape == (batch, GRID * GRID, 32)
        torch.testing.assert_close(out, eager_tokens(enc, x), **EXPORT_TOL)


@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_export_with_mask_indices_and_dynamic_keep_length(trained, pos_embed):
    enc = trained[pos_embed]
    masks = context_masks(2, seed=0).context
    program = export_encoder(enc, images(2, 0), keep=masks)
    other = context_masks(5, seed=3).context  # another batch size and list length
    assert other.shape[1] != masks.shape[1]
    assert not bool(other.valid.all())
    x = images(5, 3)
    out = program.module()(x, other.indices, other.valid)
    torch.testing.assert_close(out, eager_tokens(enc, x, keep=other), **EXPORT_TOL)


def test_export_with_long_tensor_keep(trained):
    enc = trained["rope"]
    program = enc.export(images(2, 0), keep=random_keep(2, 12, seed=0))
    keep, x = random_keep(3, 20, seed=1), images(3, 1)
    expected = eager_tokens(enc, x, keep=keep)
    torch.testing.assert_close(program.module()(x, keep), expected, **EXPORT_TOL)


def test_exported_program_saves_and_loads(trained, tmp_path):
    enc = trained["sincos"]
    masks = context_masks(2, seed=0).context
    program = enc.export(images(2, 0), keep=masks)
    path = tmp_path / "encoder.pt2"
    torch.export.save(program, path)
    loaded = torch.export.load(path)
    other, x = context_masks(3, seed=5).context, images(3, 5)
    with torch.no_grad():
        out = loaded.module()(x, other.indices, other.valid)
    torch.testing.assert_close(out, eager_tokens(enc, x, keep=other), **EXPORT_TOL)


def test_static_batch_export_rejects_another_batch_size(trained):
    program = trained["sincos"].export(images(2, 0), dynamic_batch=False)
    program.module()(images(2, 1))
    with pytest.raises(AssertionError, match="images"):  # torch.export's input guard
        program.module()(images(3, 1))


def test_export_bad_inputs():
    enc = tiny_encoder()
    with pytest.raises(ValueError, match="images"):
        enc.export(torch.randn(2, 3, IMG))
    with pytest.raises(TypeError, match="images"):
        export_encoder(enc, torch.zeros(2, 3, IMG, IMG, dtype=torch.long))
    with pytest.raises(ValueError, match="keep"):
        enc.export(images(2, 0), keep=torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="dynamic_batch"):
        enc.export(images(2, 0), dynamic_batch=1)
    with pytest.raises(TypeError, match="encoder"):
        export_encoder(lambda x: x, images(2, 0))
    with pytest.raises(ValueError, match="valid"):
        EncoderTokens(enc)(images(2, 0), valid=torch.ones(2, 4, dtype=torch.bool))


def test_encoder_tokens_matches_encoder():
    torch.manual_seed(0)
    enc = tiny_encoder()
    masks = context_masks(2, seed=0).context
    x = images(2, 0)
    torch.testing.assert_close(EncoderTokens(enc)(x), enc(x).tokens)
    module = EncoderTokens(enc)
    torch.testing.assert_close(module(x, masks.indices, masks.valid), enc(x, keep=masks).tokens)
    all_real = MaskIndices(masks.indices, torch.ones_like(masks.valid))
    torch.testing.assert_close(module(x, masks.indices), enc(x, keep=all_real).tokens)


# ----------------------------------------------------------------------------- ONNX


@pytest.mark.slow
@pytest.mark.parametrize("with_keep", [False, True])
def test_onnx_export_matches_eager_with_dynamic_batch(trained, with_keep, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")
    ort = pytest.importorskip("onnxruntime")
    enc = trained["rope"]
    keep = context_masks(2, seed=0).context if with_keep else None
    program = enc.export(images(2, 0), keep=keep)
    onnx_program = torch.onnx.export(program, dynamo=True, verbose=False)
    path = tmp_path / "encoder.onnx"
    onnx_program.save(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    other, x = context_masks(5, seed=4).context, images(5, 4)
    feeds = [x] if keep is None else [x, other.indices, other.valid]
    names = [i.name for i in session.get_inputs()]
    (out,) = session.run(None, {n: t.numpy() for n, t in zip(names, feeds, strict=True)})
    expected = eager_tokens(enc, x, keep=None if keep is None else other)
    torch.testing.assert_close(torch.from_numpy(out), expected, **EXPORT_TOL)
