"""Shared test fixtures: small synthetic data sets (phantoms) and the location of the real BUSI data."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUSI = ROOT.parent / "shared" / "data" / "BUSI"
needs_busi = pytest.mark.skipif(not BUSI.is_dir(), reason=f"real BUSI data not found at {BUSI}")


@pytest.fixture(scope="session")
def phantom_tree(tmp_path_factory) -> Path:
    """A BUSI-style tree of 6 phantoms per class, 96x120 pixels."""
    from phantom import write_busi_tree
    return write_busi_tree(tmp_path_factory.mktemp("phantoms"), per_class=6, height=96, width=120, seed=1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, phantom_tree) -> Path:
    """A checkpoint from one short epoch at 64x64 (weights barely trained: for plumbing tests only)."""
    import train
    out = tmp_path_factory.mktemp("tinyrun")
    cfg = train.default_settings(data_dir=str(phantom_tree), out_dir=str(out / "run"),
                                         loss_graph_dir=str(out / "lg"), epochs=1, image_size=64, expand=1,
                                         batch_size=4, progress=False)
    train.train_model(cfg)
    return out / "run" / "best.safetensors"


@pytest.fixture()
def forbid_pickle(monkeypatch):
    """Make any use of pickle or torch.load fail the test."""
    import pickle

    import torch

    def refuse(*a, **k):
        raise AssertionError("pickle was used to load a checkpoint")
    for mod, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)
