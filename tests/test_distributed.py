"""train.py under torchrun (DistributedDataParallel, gloo on CPU) against a plain single-process run.

Two processes with batch_size B and --sync_bn must follow the same trajectory as one process with batch_size
2B: same data order, same global batch, DDP's gradient average equals the mean loss over the 2B images, and
global-batch BatchNorm statistics equal one process's. The runs go through epoch 1's validation (sharded over
the ranks and gathered) and stop mid-epoch 2 by max_steps.

Precision: the runs are made in float64 (a wrapper turns the model to double; nothing else changes), because
in float32 this untrained UNet is too ill-conditioned for a useful comparison: its float32 gradients differ
from float64 ones by ~0.3% (2% for the worst tensor) from summation order alone, and RMSprop's first steps
move each weight by about 10 x lr x sign(gradient), so near-zero gradients flip whole lr-sized steps. A
float32 tolerance loose enough for that (~1e-2) would also pass a broken implementation (per-rank BatchNorm
statistics, a shifted batch). In float64 the gradients of the two runs agree to ~1e-14 (relative); RMSprop's
update lr * g / sqrt(v) is scale-free in g, so the relative error of the smallest, most cancelling gradient
elements turns into absolute weight differences of up to ~lr x that error: measured ~1e-10 after 3 steps and
~4e-9 after 5 steps. TOL = 1e-6 leaves a wide margin for other BLAS builds and stays far below a real
mistake: one weight moved by one lr step is 1e-3; the same torchrun run without --sync_bn (per-rank
BatchNorm statistics) differs by 20 after 3 steps (running variances included).
"""
from __future__ import annotations

import inspect
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-6          # max |difference| of any weight / BatchNorm buffer, float64 runs (measured <= 4e-9)
B, STEPS = 2, 5     # per-rank batch; 15 training images -> 3 global batches of 4 per epoch

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

def _float64(make_model):
    """train.make_model, but the model in float64 (its inputs cast by a pre-hook); nothing else changes."""
    def make_model_f64(cfg):
        m = make_model(cfg).double()
        m.register_forward_pre_hook(lambda mod, args: tuple(a.double() for a in args))
        return m
    return make_model_f64


# what torchrun starts: train.py's train_model with the float64 model; prints each rank's final metrics
WRAPPER = f"""
import json, logging, os, sys
sys.path.insert(0, {str(ROOT)!r})
import torch
import train
from cli import parse_settings

{inspect.getsource(_float64)}
train.make_model = _float64(train.make_model)
logging.basicConfig(level=logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)
metrics = train.train_model(parse_settings(train.__file__, sys.argv[1:]))
# one write of one short line (< PIPE_BUF): the ranks' lines cannot interleave, even with PYTHONUNBUFFERED set
os.write(1, ("METRICS " + os.environ.get("RANK", "0") + " " + json.dumps(metrics, sort_keys=True) + "\\n").encode())
"""


def _args(data: Path, out: Path, batch_size: int, max_steps: int, *extra: str) -> list[str]:
    return ["--data_dir", str(data), "--out_dir", str(out), "--loss_graph_dir", str(out.parent / f"{out.name}_graph"),
            "--epochs", "3", "--image_size", "64", "--expand", "1", "--batch_size", str(batch_size),
            "--max_steps", str(max_steps), "--sync_bn", "--num_threads", "1", "--device", "cpu", "--no-progress",
            *extra]


def _torchrun(tmp: Path, args: list[str]) -> subprocess.Popen:
    """torchrun --standalone (a free port of its own) --nproc_per_node 2, in the background."""
    wrapper = tmp / "train_f64.py"
    if not wrapper.exists():
        wrapper.write_text(WRAPPER)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(wrapper)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(cmd + args, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _single(args: list[str]) -> dict:
    """A plain single-process run, in this process (no torch import to pay again)."""
    import train
    from cli import parse_settings
    threads = torch.get_num_threads()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train, "make_model", _float64(train.make_model))
            return train.train_model(parse_settings(train.__file__, args))
    finally:
        torch.set_num_threads(threads)


def _finish(p: subprocess.Popen, what: str) -> str:
    try:
        out, _ = p.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        pytest.fail(f"{what}: timed out\n{out[-4000:]}")
    assert p.returncode == 0, f"{what}: exit code {p.returncode}\n{out[-4000:]}"
    return out


def _metrics(output: str) -> dict[str, str]:
    """{rank: its final metrics as JSON text} from the wrapper's METRICS lines."""
    return {line.split(" ", 2)[1]: line.split(" ", 2)[2] for line in output.splitlines() if line.startswith("METRICS ")}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    """The weights of a checkpoint, or those stored in a run's resume state (resume.pt, or the older
    resume.pt + resume.safetensors pair)."""
    from safetensors.torch import load_file
    if path.name == "resume.pt":
        state = torch.load(path, map_location="cpu", weights_only=True)
        if "model" in state:
            return state["model"]
        path = path.with_suffix(".safetensors")
    return load_file(str(path))


def _max_diff(a: Path, b: Path) -> float:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    assert all(wa[k].dtype == torch.float64 for k in wa if wa[k].is_floating_point())
    assert all(torch.equal(wa[k], wb[k]) for k in wa if not wa[k].is_floating_point())  # num_batches_tracked
    d = max(float((wa[k] - wb[k]).abs().max()) for k in wa if wa[k].is_floating_point())
    print(f"max |difference| {a.parent.name}/{a.name} vs {b.parent.name}/{b.name}: {d:.3g}")
    return d


def _log(path: Path) -> list[dict]:
    import csv
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, phantom_tree):
    """ref: 1 process, batch 2B, STEPS steps; ddp: torchrun 2 processes, batch B, STEPS steps; res: 1 process
    for 2 steps (stopping mid-epoch 1), then resumed by torchrun with 2 processes up to STEPS steps.
    The two torchrun jobs run in the background while the single-process runs run here."""
    tmp = tmp_path_factory.mktemp("ddp")
    ddp = _torchrun(tmp, _args(phantom_tree, tmp / "ddp", B, STEPS))
    _single(_args(phantom_tree, tmp / "res", 2 * B, 2))
    res2 = _torchrun(tmp, _args(phantom_tree, tmp / "res", B, STEPS, "--resume"))
    ref_metrics = _single(_args(phantom_tree, tmp / "ref", 2 * B, STEPS))
    outputs = {"ddp": _finish(ddp, "ddp"), "res2": _finish(res2, "res2")}
    yield {"tmp": tmp, "out": outputs, "ref_metrics": ref_metrics}
    shutil.rmtree(tmp, ignore_errors=True)  # ~1 GB of float64 checkpoints


def test_torchrun_matches_single_process(runs):
    tmp, out = runs["tmp"], runs["out"]
    ref, ddp = tmp / "ref", tmp / "ddp"
    # (a) it completed on both ranks, and both ranks hold the same (gathered) validation numbers
    m = _metrics(out["ddp"])
    assert set(m) == {"0", "1"}, out["ddp"][-3000:]
    assert m["0"] == m["1"]
    assert json.loads(m["0"])["val_loss"] == pytest.approx(runs["ref_metrics"]["val_loss"], rel=1e-6)  # validation runs in float32
    # (b) exactly one set of outputs: the same files as the single-process run, one log row per epoch, one graph
    names = sorted(p.name for p in ddp.iterdir())
    assert names == sorted(p.name for p in ref.iterdir())
    assert {"best.safetensors", "last.safetensors", "log.csv", "resume.pt", "split.json"} <= set(names)
    assert not [n for n in names if n.endswith(".tmp") or n.startswith(".")]
    assert [p.name for p in (tmp / "ddp_graph").iterdir()] == ["ddp.png"]
    assert {p.name for p in tmp.iterdir()} <= {"ddp", "ddp_graph", "ref", "ref_graph", "res", "res_graph",
                                               "train_f64.py"}  # nothing written beside (cwd of torchrun)
    assert out["ddp"].count("wrote split") == 1
    assert json.loads((ddp / "split.json").read_text())["val"] == json.loads((ref / "split.json").read_text())["val"]
    rows_ddp, rows_ref = _log(ddp / "log.csv"), _log(ref / "log.csv")
    assert [r["epoch"] for r in rows_ddp] == ["1"]
    for key in ("train_loss", "val_loss", "val_dice", "lr"):
        assert float(rows_ddp[0][key]) == pytest.approx(float(rows_ref[0][key]), rel=1e-5, abs=1e-6), key
    state = torch.load(ddp / "resume.pt", weights_only=True)
    assert (state["epoch"], state["samples"], state["global_batch"], state["world_size"], state["step"]) == \
        (2, 2 * 2 * B, 2 * B, 2, STEPS)
    # (c) the weights after epoch 1 (3 steps, BatchNorm buffers included) and after STEPS steps match
    assert _max_diff(ddp / "last.safetensors", ref / "last.safetensors") < TOL
    assert _max_diff(ddp / "resume.pt", ref / "resume.pt") < TOL


def test_resume_with_another_number_of_processes(runs):
    tmp, out = runs["tmp"], runs["out"]
    res, ref = tmp / "res", tmp / "ref"
    assert "after 8 of its training samples" in out["res2"], out["res2"][-3000:]
    # the resumed run went on from sample 8 of epoch 1 as two processes, and ended where the uninterrupted
    # single-process run ended
    assert _max_diff(res / "last.safetensors", ref / "last.safetensors") < TOL
    assert _max_diff(res / "resume.pt", ref / "resume.pt") < TOL
    rows_res, rows_ref = _log(res / "log.csv"), _log(ref / "log.csv")
    assert len(rows_res) == 1
    for key in ("train_loss", "val_loss"):  # the running train loss crossed the resume (2 + 1 steps)
        assert float(rows_res[0][key]) == pytest.approx(float(rows_ref[0][key]), rel=1e-5), key


def test_resume_mid_epoch_with_another_global_batch(tmp_path, phantom_tree):
    """The position is stored as samples of the epoch, so a new global batch (other batch_size or number of
    processes) goes on from the same draw, even when it does not divide the samples already used."""
    import train
    from cli import parse_settings
    args = _args(phantom_tree, tmp_path / "run", 4, 2)
    threads = torch.get_num_threads()
    try:
        train.train_model(parse_settings(train.__file__, args))
        first = torch.load(tmp_path / "run" / "resume.pt", weights_only=True)
        assert (first["epoch"], first["samples"], first["global_batch"], first["step"]) == (1, 8, 4, 2)
        args[args.index("--batch_size") + 1], args[args.index("--max_steps") + 1] = "3", "3"
        train.train_model(parse_settings(train.__file__, args + ["--resume"]))
    finally:
        torch.set_num_threads(threads)
    state = torch.load(tmp_path / "run" / "resume.pt", weights_only=True)
    assert (state["epoch"], state["samples"], state["global_batch"], state["step"]) == (1, 11, 3, 3)
    assert state["running_count"] == 3
