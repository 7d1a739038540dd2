"""Load benchmark of the web page (issue 22): starts `python app.py` as a server of its own on a free port of
127.0.0.1 and measures, from outside, what docs/web.md reports.

    python bench_app.py                       # everything, the default model and settings (15-20 min on 2 cores)
    python bench_app.py --uploads 20 --boxes 20 --out runs/bench_app.json

  big images    peak resident memory growth of the server for one upload of 50, 20 and 5 megapixels (right after
                the warm-up), and of predict.py for the 50-megapixel image (the peak since a reset of
                /proc/<pid>/clear_refs, Linux)
  parallel      20 uploads at once of the real scans in samples/ (the page's max_files): status of each (200, or
                503 with Retry-After), connections reset, p50 / p95 / max seconds from sending to the result
  kept          resident memory after `uploads` uploads, each followed by a box prompt (a LiteMedSAM embedding
                each): its growth over the memory after the warm-up, against keep_mb (MiB: 1 MiB = 1.05 MB)
  idle          20 connections that send nothing and 5 that send a header byte a second: seconds until the
                server closed each, and the uploads served meanwhile
Every request loop is bounded in count and time, and every address is 127.0.0.1. Nothing is written into the
repository (the big test images go to a temporary folder); the figures are printed as JSON.
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent
SAMPLES = sorted((ROOT / "samples").glob("*).png"))  # the six BUSI scans, e.g. "benign (1).png"
PAGE = {"Content-Type": "application/octet-stream"}


def proc_mb(pid: int, key: str) -> float:
    """VmRSS (resident now) or VmHWM (peak since start or the last reset) of a process, in MiB."""
    text = Path(f"/proc/{pid}/status").read_text()
    return int(text.split(f"{key}:")[1].split()[0]) / 1024


def reset_peak(pid: int) -> None:
    Path(f"/proc/{pid}/clear_refs").write_text("5")


class Server:
    """`python app.py` on a free port, its settings as flags; stopped on leaving."""

    def __init__(self, flags: list[str], log: Path):
        self.log = log  # its stderr
        with open(log, "w") as err:
            self.proc = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", "0", *flags], cwd=ROOT,
                                         stdout=subprocess.PIPE, stderr=err, text=True)
        line = self.proc.stdout.readline()  # "BUS-UNet page: http://127.0.0.1:PORT/  (Ctrl-C stops it)"
        if "http://" not in line:
            raise SystemExit(f"bench_app.py: app.py did not start: {line}{log.read_text()[-2000:]}")
        self.port = int(line.split("http://127.0.0.1:")[1].split("/")[0])

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.communicate(timeout=60)
        self.stderr = self.log.read_text()

    def post(self, path: str, body: bytes = b"", timeout: float = 600) -> tuple[int | str, float, dict]:
        """(status, or the name of the exception, e.g. ConnectionResetError; seconds; JSON) of one POST."""
        t = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request("POST", path, body=body, headers=PAGE)
            r = conn.getresponse()
            data = json.loads(r.read())
            if r.status == 503:
                data["retry_after"] = r.getheader("Retry-After")
            return r.status, time.perf_counter() - t, data
        except OSError as e:
            return type(e).__name__, time.perf_counter() - t, {}
        finally:
            conn.close()

    def upload(self, path: Path, name: str = "") -> tuple[int | str, float, dict]:
        return self.post(f"/api/predict?name={(name or path.name).replace(' ', '%20')}", path.read_bytes())

    def box(self, result: dict) -> tuple[int | str, float, dict]:
        r0, c0, r1, c1 = (result["lesions"][0]["bbox_row_col"] if result.get("lesions") else
                          (result["height"] // 4, result["width"] // 4, result["height"] * 3 // 4,
                           result["width"] * 3 // 4))
        return self.post(f"/api/box?id={result['id']}&box={c0},{r0},{c1},{r1}")


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def parallel(server: Server, n: int) -> dict:
    """n uploads at once of the samples, cycled."""
    with ThreadPoolExecutor(n) as pool:
        answers = list(pool.map(lambda i: server.upload(SAMPLES[i % len(SAMPLES)]), range(n)))
    ok = [t for s, t, _ in answers if s == 200]
    statuses = [s for s, _, _ in answers]
    names = [str(s) for s in statuses]
    return {"uploads": n, "status": {s: names.count(s) for s in sorted(set(names))},
            "reset_or_failed": sum(not isinstance(s, int) for s in statuses),
            "retry_after": sorted({d.get("retry_after") for s, _, d in answers if s == 503}),
            "p50_s": percentile(ok, 50), "p95_s": percentile(ok, 95), "max_s": max(ok) if ok else None}


def big_image(path: Path, side: int) -> Path:
    """A side x side PNG of a sample scan enlarged (nearest neighbour: a few MB however large)."""
    grey = Image.open(SAMPLES[0]).convert("L")
    grey.resize((side, side), Image.NEAREST).save(path, compress_level=1)
    return path


def big_uploads(server: Server, tmp: Path) -> list[dict]:
    out = []
    for mp in (50, 20, 5):  # the largest first: its growth is not hidden by memory the others left
        side = int((mp * 1e6) ** 0.5)
        path = big_image(tmp / f"big_{mp}mp.png", side)
        reset_peak(server.proc.pid)
        before = proc_mb(server.proc.pid, "VmRSS")
        status, seconds, r = server.upload(path)
        out.append({"megapixels": round(side * side / 1e6, 1), "file_mb": round(path.stat().st_size / 1e6, 1),
                    "status": status, "seconds": round(seconds, 2), "answer": f"{r.get('width')}x{r.get('height')}"
                    if status == 200 else r.get("error"),
                    "peak_growth_mib": round(proc_mb(server.proc.pid, "VmHWM") - before)})
    return out


PREDICT_PEAK = """
import json, sys
from pathlib import Path
sys.path.insert(0, {root!r})
import predict
def peak():
    return int(Path("/proc/self/status").read_text().split("VmHWM:")[1].split()[0]) / 1024
args = ["--out_dir", {out!r}]
assert predict.main([{small!r}, *args]) == 0
Path("/proc/self/clear_refs").write_text("5")
base = peak()
assert predict.main([{big!r}, *args]) == 0
print(json.dumps({{"peak_growth_mib": round(peak() - base)}}))
"""


def predict_peak(tmp: Path) -> dict:
    """predict.py's peak memory growth for the 50-megapixel image over its run on a real scan (models loaded)."""
    code = PREDICT_PEAK.format(root=str(ROOT), out=str(tmp / "predict_out"), small=str(SAMPLES[0]),
                               big=str(tmp / "big_50mp.png"))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=900)
    if done.returncode != 0:
        return {"error": done.stderr[-1000:]}
    return {"megapixels": 50.0, **json.loads(done.stdout.strip().splitlines()[-1])}


def kept(server: Server, n: int, boxes: int, warm_mb: float, keep_mb: float) -> dict:
    """n uploads, the first `boxes` of them followed by a box prompt (two clients at a time)."""
    def one(i: int) -> tuple:
        status, _, r = server.upload(SAMPLES[i % len(SAMPLES)], f"kept{i}.png")
        box = server.box(r)[0] if status == 200 and i < boxes else None
        return status, box
    t = time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(one, range(n)))
    rss = proc_mb(server.proc.pid, "VmRSS")
    return {"uploads": n, "boxes": boxes, "minutes": round((time.perf_counter() - t) / 60, 1),
            "upload_status": sorted({str(a[0]) for a in answers}),
            "box_status": sorted({str(a[1]) for a in answers if a[1] is not None}),
            "rss_after_warm_up_mib": round(warm_mb), "rss_after_mib": round(rss), "growth_mib": round(rss - warm_mb),
            "keep_mb_in_mib": round(keep_mb * 1e6 / 2**20)}


def drip(sock: socket.socket, stop: threading.Event, every: float, n: int) -> None:
    """Send a request's header one byte every `every` seconds (n filler bytes: never a whole request) until stop."""
    for ch in b"GET /api/config HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"y" * n:
        if stop.wait(every):
            return
        try:
            sock.send(bytes([ch]))
        except OSError:
            return


def idle(server: Server, n_idle: int = 20, n_slow: int = 5) -> dict:
    """Connections that send nothing or a byte a second: seconds until each is closed; uploads served meanwhile."""
    t0 = time.monotonic()
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(n_idle + n_slow)]
    stop = threading.Event()
    for sock in socks[n_idle:]:
        threading.Thread(target=drip, args=(sock, stop, 1.0, 200), daemon=True).start()
    closed: list[float] = []

    def wait_closed(sock: socket.socket) -> None:
        sock.settimeout(120)
        try:
            while sock.recv(4096):
                pass
            closed.append(time.monotonic() - t0)
        except ConnectionResetError:
            closed.append(time.monotonic() - t0)
        except OSError:
            pass
    waiters = [threading.Thread(target=wait_closed, args=(s,), daemon=True) for s in socks]
    for w in waiters:
        w.start()
    served = [server.upload(SAMPLES[i % len(SAMPLES)]) for i in range(5)]
    for w in waiters:
        w.join(130)
    stop.set()
    for s in socks:
        s.close()
    return {"idle": n_idle, "trickling": n_slow, "closed": len(closed),
            "closed_after_s": [round(min(closed), 1), round(max(closed), 1)] if closed else None,
            "uploads_meanwhile": [s for s, _, _ in served],
            "upload_s_meanwhile": round(statistics.median(t for _, t, _ in served), 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parallel", type=int, default=20, help="uploads sent at once")
    ap.add_argument("--uploads", type=int, default=200, help="uploads for the kept-memory figure")
    ap.add_argument("--boxes", type=int, default=200, help="of those, how many get a box prompt")
    ap.add_argument("--out", default="", help="also write the figures to this JSON file")
    ap.add_argument("flags", nargs="*", help="flags for app.py after --, e.g. -- --backend onnx-int8")
    args = ap.parse_args(argv)
    if not Path("/proc/self/clear_refs").exists():
        raise SystemExit("bench_app.py: needs Linux (/proc/<pid>/status and clear_refs for the peak memory)")
    from cli import read_settings
    keep_mb = float(read_settings(ROOT / "app.py")["keep_mb"][0])
    flags = list(args.flags)
    if "--keep_mb" in flags:
        keep_mb = float(flags[flags.index("--keep_mb") + 1])
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # `kill` stops the server it started too
    res = {"machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start",
           "flags": flags}
    with tempfile.TemporaryDirectory(prefix="bench-app-") as tmp, Server(flags, Path(tmp) / "stderr.txt") as server:
        status, _, first = server.upload(SAMPLES[0])  # warm-up: the model and LiteMedSAM loaded
        if status != 200:
            raise SystemExit(f"bench_app.py: the first upload failed: {status} {first}")
        server.box(first)
        warm = proc_mb(server.proc.pid, "VmRSS")
        res["rss_after_warm_up_mib"] = round(warm)
        res["big_uploads"] = big_uploads(server, Path(tmp))  # first: no memory freed by earlier loads hides it
        print(json.dumps({"big_uploads": res["big_uploads"]}), flush=True)
        res["parallel"] = parallel(server, args.parallel)
        print(json.dumps({"parallel": res["parallel"]}), flush=True)
        res["idle"] = idle(server)
        print(json.dumps({"idle": res["idle"]}), flush=True)
        res["kept"] = kept(server, args.uploads, args.boxes, warm, keep_mb)
        res["predict_py_50mp"] = predict_peak(Path(tmp))
        res["load_average_end"] = round(os.getloadavg()[0], 2)
    res["server_stderr_tracebacks"] = server.stderr.count("Traceback")  # read once it stopped
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
