"""ship_checkpoint.py: fp16 by default, the split copied and pointed at, a chosen threshold stored."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model import load_checkpoint
from ship_checkpoint import ship

ROOT = Path(__file__).resolve().parents[1]


def test_ship_halves_the_weights_and_points_at_the_copied_split(tiny_checkpoint, tmp_path):
    out, split = tmp_path / "ck" / "shipped.safetensors", tmp_path / "ck" / "split.json"
    meta = ship(str(tiny_checkpoint), str(out), str(split))
    src_model, src_meta = load_checkpoint(tiny_checkpoint)
    model, stored = load_checkpoint(out)
    assert stored["storage"] == "fp16" and stored["split_file"] == str(split) == meta["split_file"]
    assert stored["shipped_from"] == str(tiny_checkpoint) and stored["threshold"] == src_meta["threshold"]
    assert json.loads(split.read_text()) == json.loads(Path(src_meta["split_file"]).read_text())
    assert out.stat().st_size < 0.6 * Path(tiny_checkpoint).stat().st_size
    for (k, a), (_, b) in zip(src_model.state_dict().items(), model.state_dict().items()):
        if a.is_floating_point():
            assert torch.allclose(a.float(), b.float(), rtol=1e-3, atol=1e-4), k


def test_ship_stores_a_threshold_from_the_command_line(tiny_checkpoint, tmp_path):
    out = tmp_path / "s.safetensors"
    proc = subprocess.run([sys.executable, str(ROOT / "ship_checkpoint.py"), "--src", str(tiny_checkpoint),
                           "--out", str(out), "--split", str(tmp_path / "split.json"), "--fp32",
                           "--threshold", "0.35"], capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["threshold"] == 0.35
    _, meta = load_checkpoint(out)
    assert meta["threshold"] == 0.35 and meta["storage"] == "fp32"
    with pytest.raises(ValueError, match="between 0 and 1"):
        ship(str(tiny_checkpoint), str(tmp_path / "bad.safetensors"), str(tmp_path / "split.json"), threshold=1.5)


def test_ship_stores_the_uncertainty_cutoff_with_its_method(tiny_checkpoint, tmp_path):
    from uncertainty import METHOD, stored_cutoff
    ship(str(tiny_checkpoint), str(tmp_path / "u.safetensors"), str(tmp_path / "split.json"), uncertainty_cutoff=0.12)
    _, meta = load_checkpoint(tmp_path / "u.safetensors")
    assert meta["uncertainty_cutoff"] == 0.12 and meta["uncertainty_method"] == METHOD and stored_cutoff(meta) == 0.12
    assert stored_cutoff({**meta, "uncertainty_method": "an older method"}) is None
    with pytest.raises(ValueError, match="uncertainty_cutoff must lie in"):
        ship(str(tiny_checkpoint), str(tmp_path / "bad.safetensors"), str(tmp_path / "split.json"),
             uncertainty_cutoff=-0.1)
