"""bench.py runs with tiny settings and prints every line it promises (speed itself is not tested here)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_quick_prints_every_line(tmp_path):
    """Every path of every part gets a rate: inference (naive, torch, ONNX fp32 and INT8), the page with and without
    the uncertainty (and where its time goes), training with the recipe against the naive loop."""
    pytest.importorskip("onnxruntime")
    import bench
    out_json = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--quick", "--json", str(out_json)],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout
    for line in bench.LINES:
        assert any(l.startswith(line) for l in text.splitlines()), f"missing line {line!r} in:\n{text}"
    cells = {tuple(c.strip() for c in l.split("|")[1:3]): [c.strip() for c in l.split("|")[3:-1]]
             for l in text.splitlines() if l.startswith("| quick (64 px")}
    for path in bench.PATHS:
        ips, vs_naive, _, latency = cells[next(k for k in cells if k[1] == path)][:4]
        assert float(ips) > 0 and float(latency) > 0 and vs_naive.endswith("x"), (path, cells)
    page_rows = [l for l in text.splitlines() if l.startswith("| torch, ") or l.startswith("| onnx-int8, ")]
    assert len(page_rows) == 4 and all(float(l.split("|")[2]) > 0 for l in page_rows)
    assert "where an upload's time goes (onnx-int8, with the uncertainty" in text
    result = json.loads(out_json.read_text())
    paths = result["inference"][0]["paths"]
    assert set(paths) == set(bench.PATHS) and all(p["ips"] > 0 for p in paths.values())
    assert result["inference"][0]["onnx_max_prob_diff"] <= 1e-4
    assert result["train_project"]["train_ips"] > 0 and result["train_naive"]["train_ips"] > 0
    import reproduce
    assert result["train_project"]["recipe"] == reproduce.MODELS[reproduce.resolve("default")].recipes[-1]
    assert set(result["page"]["parts_ms"]) == {"decode", "network", "post-processing", "pictures and JSON",
                                               "HTTP and JSON transport"}


def test_bench_worker_process_reports_a_result():
    """The per-part process that a full run starts (so each part's peak memory is its own)."""
    import bench
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--quick", "--worker", "train_naive"],
                          capture_output=True, text=True, cwd=str(ROOT), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [l for l in proc.stdout.splitlines() if l.startswith(bench.RESULT_TAG)][-1]
    res = json.loads(line[len(bench.RESULT_TAG):])
    assert res["train_ips"] > 0 and res["pipeline_ips"] > 0 and res["rss_mib"] > 0


def test_gpu_check_script_runs_end_to_end_on_cpu(tmp_path):
    """gpu_check.sh (prepared for a session lent a GPU) with tiny settings on CPU: bench, phantoms, a timed
    recipe run, and its summary line."""
    import os
    import shutil
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        pytest.skip("gpu_check.sh needs bash and coreutils' timeout")
    pytest.importorskip("onnxruntime")
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "PER_CLASS": "3", "EPOCHS": "1",
           "LIMIT_S": "300", "BENCH_ARGS": "--quick", "TRAIN_ARGS": "--image_size 64 --expand 2"}
    proc = subprocess.run(["bash", str(ROOT / "gpu_check.sh"), str(tmp_path / "gc")], capture_output=True,
                          text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in ("machine.txt", "bench.txt", "bench.json", "recipe.log", "recipe.png"):
        assert (tmp_path / "gc" / name).is_file(), name
    assert "original recipe on cpu: 1 of 1 epochs in" in proc.stdout
    assert (tmp_path / "gc" / "recipe" / "best.safetensors").is_file()
