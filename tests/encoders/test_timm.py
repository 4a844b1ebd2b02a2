"""Creating timm models: pretrained=True offline fails at once, and uses a cached copy.

The tests never reach the network: offline is forced with ``HF_HUB_OFFLINE`` (and an
empty Hugging Face cache), or the weights' URL points at a closed local port.
"""

import socket
import time

import pytest
import torch

timm = pytest.importorskip("timm")
huggingface_hub = pytest.importorskip("huggingface_hub")

from jepa_blocks.encoders import TimmTokenEncoder, ViTEncoder  # noqa: E402
from jepa_blocks.encoders._timm import hub_reachable  # noqa: E402


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "hf"


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("build", [ViTEncoder.from_timm, TimmTokenEncoder.from_timm])
def test_pretrained_offline_fails_at_once_with_a_clear_message(build, monkeypatch, empty_hf_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="vit_tiny_patch16_224.*HF_HUB_OFFLINE.*checkpoint_path"):
        build("vit_tiny_patch16_224", img_size=32, patch_size=4, pretrained=True)
    assert time.perf_counter() - start < 10  # timm alone retries the hub for about a minute


def test_unreachable_host_fails_at_once(monkeypatch):
    url = f"http://127.0.0.1:{_closed_port()}/vit_weights_for_test.pth"
    monkeypatch.setattr(torch.hub, "get_dir", lambda: "/nonexistent-torch-hub")
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="127.0.0.1 cannot be reached"):
        ViTEncoder.from_timm("vit_tiny_patch16_224", img_size=32, patch_size=4, pretrained=True,
                             pretrained_cfg_overlay={"hf_hub_id": None, "url": url})
    assert time.perf_counter() - start < 10


def test_unreachable_host_uses_the_cached_copy(tmp_path, monkeypatch):
    """An unreachable host with the weights in torch.hub's cache loads the cached file."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=4)
    (tmp_path / "checkpoints").mkdir()
    torch.save(vit.state_dict(), tmp_path / "checkpoints" / "cached_vit.pth")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    url = f"http://127.0.0.1:{_closed_port()}/cached_vit.pth"
    enc = ViTEncoder.from_timm("vit_tiny_patch16_224", img_size=32, patch_size=4, pretrained=True,
                               pretrained_cfg_overlay={"hf_hub_id": None, "url": url})
    torch.testing.assert_close(enc.blocks[11].mlp.fc2.weight, vit.blocks[11].mlp.fc2.weight, rtol=0, atol=0)


def test_hub_reachable_probe():
    assert not hub_reachable(f"http://127.0.0.1:{_closed_port()}/x", timeout=1.0)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert hub_reachable(f"http://127.0.0.1:{server.getsockname()[1]}/x", timeout=1.0)
    assert not hub_reachable("not a url")


def test_bad_arguments():
    with pytest.raises(ValueError, match="not a timm model"):
        TimmTokenEncoder.from_timm("not_a_model_xyz")
    with pytest.raises(TypeError, match="pretrained_cfg_overlay"):
        TimmTokenEncoder.from_timm("vit_tiny_patch16_224", pretrained_cfg_overlay="file.pth")
    with pytest.raises(TypeError, match="pretrained"):
        TimmTokenEncoder.from_timm("vit_tiny_patch16_224", pretrained=1)
