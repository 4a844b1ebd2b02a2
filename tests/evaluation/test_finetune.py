import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from jepa_blocks import EMATarget, ViTEncoder
from jepa_blocks.evaluation import finetune, finetune_param_groups


def _images(n, seed):
    """Two classes of 16 px images: bright left half vs bright right half."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = 0.5 * torch.randn(n, 3, 16, 16, generator=g)
    images[labels == 0, :, :, :8] += 1.0
    images[labels == 1, :, :, 8:] += 1.0
    return images, labels



@pytest.fixture
def data():
    train = DataLoader(TensorDataset(*_images(64, 0)), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(*_images(32, 1)), batch_size=32)
    return train, val


def _encoder():
    torch.manual_seed(0)
    return ViTEncoder(img_size=16, patch_size=4, embed_dim=16, depth=2, num_heads=2)


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_separable_problem_reaches_high_accuracy(data):
    enc = _encoder()
    before = _snapshot(enc)
    res = finetune(enc, *data, num_classes=2, epochs=6, encoder_lr=1e-3, head_lr=1e-2, warmup_epochs=1)
    assert res.top1 >= 0.9
    assert len(res.history) == 6 and res.history[-1]["val_top1"] == res.top1
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    # the passed encoder is untouched (deep copy), the returned copy changed
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in before.items())
    assert res.encoder is not enc
    assert any(not torch.equal(v, res.encoder.state_dict()[k]) for k, v in before.items())


def test_zero_encoder_lr_keeps_encoder_while_head_learns(data):
    enc = _encoder()
    before = _snapshot(enc)
    res = finetune(enc, *data, num_classes=2, epochs=2, encoder_lr=0.0, head_lr=1e-2, warmup_epochs=0,
                   inplace=True)
    assert res.encoder is enc
    assert all(torch.equal(v, enc.state_dict()[k]) for k, v in before.items())
    torch.manual_seed(0)
    fresh = nn.Linear(16, 2)
    assert not torch.equal(res.head.weight, fresh.weight)
    assert res.history[-1]["encoder_lr"] == 0.0 and res.history[-1]["head_lr"] > 0


def test_param_groups_carry_separate_learning_rates():
    enc = _encoder()
    head = nn.Linear(16, 3)
    groups = finetune_param_groups(enc, head, encoder_lr=1e-4, head_lr=1e-2, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"encoder.layer0.decay", "encoder.layer0.no_decay", "head.decay", "head.no_decay"}
    assert by_name["encoder.layer0.decay"]["lr"] == 1e-4 and by_name["head.decay"]["lr"] == 1e-2
    assert by_name["head.no_decay"]["weight_decay"] == 0.0 and by_name["head.decay"]["weight_decay"] == 0.05
    assert by_name["head.decay"]["params"] == [head.weight]
    n_enc = sum(len(g["params"]) for n, g in by_name.items() if n.startswith("encoder"))
    assert n_enc == len(list(enc.parameters()))


def test_layer_decay_scales_by_depth():
    enc = _encoder()  # depth 2: patch_embed 0, blocks.0 -> 1, blocks.1 -> 2, norm -> 3
    groups = finetune_param_groups(enc, nn.Linear(16, 2), encoder_lr=1.0, head_lr=1.0, weight_decay=0.0,
                                   layer_decay=0.5)
    lr_of = {}
    for g in groups:
        for p in g["params"]:
            lr_of[id(p)] = g["lr"]
    assert lr_of[id(enc.patch_embed.proj.weight)] == 0.5**3
    assert lr_of[id(enc.blocks[0].attn.qkv.weight)] == 0.5**2
    assert lr_of[id(enc.blocks[1].mlp.fc1.weight)] == 0.5
    assert lr_of[id(enc.norm.weight)] == 1.0
    with pytest.raises(ValueError, match="layer_decay"):
        finetune_param_groups(nn.Linear(2, 2), nn.Linear(2, 2), encoder_lr=1.0, head_lr=1.0, weight_decay=0.0,
                              layer_decay=0.5)


def test_optimizer_applies_the_group_learning_rates(data, monkeypatch):
    """The lr that AdamW sees per group follows warmup + cosine times the group's own peak."""
    seen = []
    original = torch.optim.AdamW.step

    def spy(self, *args, **kwargs):
        seen.append({g["name"]: g["lr"] for g in self.param_groups})
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    finetune(_encoder(), *data, num_classes=2, epochs=2, encoder_lr=1e-4, head_lr=1e-2, warmup_epochs=1)
    assert len(seen) == 8  # 2 epochs x 4 batches
    enc = [s["encoder.layer0.decay"] for s in seen]
    head = [s["head.decay"] for s in seen]
    assert enc[0] == 0.0 and head[0] == 0.0  # warmup starts at 0
    assert enc[4] == pytest.approx(1e-4) and head[4] == pytest.approx(1e-2)  # peak after 1 epoch
    assert all(h == pytest.approx(100 * e) for e, h in zip(enc, head, strict=True))
    assert head[5] > head[6] > head[7] > 0


def test_same_seed_same_result(data):
    a = finetune(_encoder(), *data, num_classes=2, epochs=2, seed=3)
    b = finetune(_encoder(), *data, num_classes=2, epochs=2, seed=3)
    assert a.history == b.history
    assert all(torch.equal(v, b.encoder.state_dict()[k]) for k, v in a.encoder.state_dict().items())
    c = finetune(_encoder(), *data, num_classes=2, epochs=2, seed=4)
    assert not torch.equal(a.head.weight, c.head.weight)


def test_frozen_ema_module_is_trained_and_wrapper_rejected(data):
    target = EMATarget(_encoder(), total_steps=10)
    before = _snapshot(target.module)
    res = finetune(target.module, *data, num_classes=2, epochs=1, warmup_epochs=0)
    assert any(not torch.equal(v, res.encoder.state_dict()[k]) for k, v in before.items())
    assert not any(p.requires_grad for p in target.module.parameters())  # original untouched
    with pytest.raises(ValueError, match="EMATarget"):
        finetune(target, *data, num_classes=2, epochs=1)


def test_bad_inputs_name_the_argument(data):
    enc = _encoder()
    with pytest.raises(ValueError, match="num_classes"):
        finetune(enc, *data)
    with pytest.raises(ValueError, match="encoder_lr"):
        finetune(enc, *data, num_classes=2, encoder_lr=-1.0)
    with pytest.raises(ValueError, match="head_lr"):
        finetune(enc, *data, num_classes=2, head_lr=0.0)
    with pytest.raises(ValueError, match="warmup_epochs"):
        finetune(enc, *data, num_classes=2, epochs=1, warmup_epochs=2)
    with pytest.raises(ValueError, match="pool"):
        finetune(enc, *data, num_classes=2, pool="cls")
    with pytest.raises(ValueError, match="pool"):
        finetune(enc, *data, num_classes=2, pool="none")
    with pytest.raises(TypeError, match="train_loader"):
        finetune(enc, (b for b in data[0]), data[1], num_classes=2)
    with pytest.raises(ValueError, match="amp_dtype"):
        finetune(enc, *data, num_classes=2, amp_dtype=torch.float32)
