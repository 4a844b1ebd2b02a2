import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from jepa_blocks.evaluation import extract_features, pool_tokens


class DummyEncoder(torch.nn.Module):
    """Images (B, 3, 4, 4) -> 16 tokens of width 5 -> average pool (B, 5); records its context."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(3, 5)
        self.seen = []

    def forward(self, images):
        self.seen.append((torch.is_inference_mode_enabled(), torch.is_autocast_enabled("cpu")))
        tokens = self.proj(images.flatten(2).transpose(1, 2))  # (B, 16, 5)
        return pool_tokens(tokens)


def make_loader(sizes=(4, 3, 5)):
    g = torch.Generator().manual_seed(0)
    return [
        (torch.randn(b, 3, 4, 4, generator=g), torch.randint(0, 10, (b,), generator=g))
        for b in sizes
    ]


def test_extract_matches_direct_computation():
    enc = DummyEncoder().eval()
    loader = make_loader()
    feats, labels = extract_features(enc, loader)
    assert feats.shape == (12, 5) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    with torch.no_grad():
        ref = torch.cat([enc(x) for x, _ in loader])
    torch.testing.assert_close(feats, ref)
    assert torch.equal(labels, torch.cat([y for _, y in loader]))
    assert enc.seen[0] == (True, False)  # inference mode, no autocast
    assert not feats.is_inference()  # plain tensors, usable in autograd later


def test_autocast_bf16_returns_float32():
    enc = DummyEncoder().eval()
    feats, _ = extract_features(enc, make_loader(), amp_dtype=torch.bfloat16, device="cpu")
    assert enc.seen[0] == (True, True)
    assert feats.dtype == torch.float32
    ref, _ = extract_features(enc, make_loader())
    torch.testing.assert_close(feats, ref, atol=0.05, rtol=0.05)


def test_torch_dataloader_and_list_labels():
    ds = torch.utils.data.TensorDataset(torch.randn(10, 3, 4, 4), torch.arange(10))
    feats, labels = extract_features(DummyEncoder(), torch.utils.data.DataLoader(ds, batch_size=4))
    assert feats.shape == (10, 5) and labels.tolist() == list(range(10))
    feats, labels = extract_features(lambda x: x.flatten(1), [(torch.ones(2, 3), [7, 8])])
    assert labels.tolist() == [7, 8]


@pytest.mark.parametrize(
    ("loader", "encoder", "err", "match"),
    [
        ([], None, ValueError, "loader"),
        ([torch.ones(2, 3)], None, TypeError, "loader"),
        ([(torch.ones(2, 3), torch.ones(2), 0)], None, TypeError, "loader"),
        ([(torch.ones(2, 3), torch.tensor([1, 2, 3]))], None, ValueError, "labels"),
        (
            [(torch.ones(2, 3), torch.tensor([1, 2]))],
            lambda x: x[:, None],
            ValueError,
            "encoder_fn",
        ),
        ([(torch.ones(2, 3), torch.tensor([1, 2]))], lambda x: x[:1], ValueError, "encoder_fn"),
        ([(torch.ones(2, 3), [0, 1]), (torch.ones(1, 4), [2])], None, ValueError, "encoder_fn"),
    ],
)
def test_bad_loaders_and_encoders(loader, encoder, err, match):
    with pytest.raises(err, match=match):
        extract_features(encoder or (lambda x: x), loader)


def test_bad_options():
    with pytest.raises(ValueError, match="amp_dtype"):
        extract_features(lambda x: x, make_loader(), amp_dtype=torch.float32)
    with pytest.raises(TypeError, match="encoder_fn"):
        extract_features("not callable", make_loader())


def test_pool_tokens_matches_loop_and_ignores_padding():
    g = torch.Generator().manual_seed(1)
    tokens = torch.randn(3, 6, 4, generator=g)
    valid = torch.tensor(
        [[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=torch.bool
    )
    tokens[~valid] = float("nan")  # padding must never leak
    out = pool_tokens(tokens, valid)
    for b in range(3):
        rows = [tokens[b, i] for i in range(6) if valid[b, i]]
        torch.testing.assert_close(out[b], sum(rows) / len(rows))
    torch.testing.assert_close(pool_tokens(tokens[:1]), tokens[0].mean(0, keepdim=True))


@settings(max_examples=20, deadline=None)
@given(data=st.data())
def test_pool_tokens_padding_values_are_irrelevant(data):
    b, n = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 8))
    seed = data.draw(st.integers(0, 1000))
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(b, n, generator=g) < 0.6
    valid[:, 0] = True
    x = torch.randn(b, n, 3, generator=g)
    y = torch.where(valid[..., None], x, torch.randn(b, n, 3, generator=g) * 1e3)
    torch.testing.assert_close(pool_tokens(x, valid), pool_tokens(y, valid))


def test_pool_tokens_keeps_dtype():
    x = torch.randn(2, 5, 3).bfloat16()
    assert pool_tokens(x).dtype == torch.bfloat16
    assert pool_tokens(x, torch.ones(2, 5, dtype=torch.bool)).dtype == torch.bfloat16


def test_pool_tokens_bad_inputs():
    x = torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="tokens"):
        pool_tokens(x[0])
    with pytest.raises(TypeError, match="tokens"):
        pool_tokens(torch.ones(2, 4, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="valid"):
        pool_tokens(x, torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="valid"):
        pool_tokens(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match="valid"):
        pool_tokens(x, torch.tensor([[True, False, False, False], [False] * 4]))


def test_docstring_examples_run():
    import doctest
    import importlib

    module = importlib.import_module("jepa_blocks.evaluation.features")
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
