"""app.py's server without a browser: the page's files, a real sample's result, bad files each with a clear
message while the server keeps serving, the limits, no path from the browser used on disk, the box prompt."""
from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

import app
import predict

SAMPLE = ROOT / "samples" / "malignant (3).png"
CHECKPOINT = ROOT / "checkpoints" / "busi_unet_resnet18.safetensors"


def call(url: str, path: str, body: bytes | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """(status, JSON) of a GET (body None) or POST (with the page's content type); error statuses are returned,
    not raised."""
    sent = {} if body is None else {"Content-Type": "application/octet-stream"}
    req = urllib.request.Request(url + path.lstrip("/"), data=body, method="GET" if body is None else "POST",
                                 headers={**sent, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def png_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    return buf.getvalue()


def decode(data_url: str) -> np.ndarray:
    assert data_url.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(",", 1)[1]))))


@pytest.fixture(scope="module")
def served():
    cfg = app.default_settings(port=0, checkpoint=str(CHECKPOINT), max_upload_mb=2.0, keep_mb=16.0)
    with app.running(cfg) as (url, server):
        yield url, server


@pytest.fixture(scope="module")
def sample_result(served):
    url, _ = served
    status, r = call(url, "api/predict?name=malignant%20(3).png", SAMPLE.read_bytes())
    assert status == 200, r
    return r


def test_the_page_and_its_files_are_served_from_here_only(served):
    url, _ = served
    with urllib.request.urlopen(url) as r:
        html = r.read().decode()
        assert "default-src 'self'" in r.headers["Content-Security-Policy"]
    assert "/app.js" in html and "/app.css" in html
    for name in ("index.html", "app.js", "app.css"):
        text = (ROOT / "web" / name).read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text and "@import" not in text, name
    status, cfg = call(url, "api/config")
    assert status == 200 and cfg["model"] == CHECKPOINT.name and CHECKPOINT.name in cfg["models"]
    assert cfg["max_upload_mb"] == 2.0 and cfg["max_files"] == 20 and cfg["box_prompt"] is True


def test_the_page_serves_the_card_of_the_chosen_model(served):
    url, _ = served
    status, cfg = call(url, "api/config")
    assert sorted(cfg["cards"]) == sorted(m for m in cfg["models"] if (ROOT / "checkpoints" / m).with_suffix(".md").is_file())
    assert CHECKPOINT.name in cfg["cards"]
    with urllib.request.urlopen(url + "card?model=" + CHECKPOINT.name) as r:
        assert r.headers["Content-Type"].startswith("text/plain")
        assert r.read().decode() == CHECKPOINT.with_suffix(".md").read_text(encoding="utf-8")
    for bad in ("../README.md", "busi_unet_resnet18.md", ""):
        status, r = call(url, "card?model=" + bad)
        assert status == 404 and "unknown model" in r["error"]
    assert 'id="card"' in (ROOT / "web" / "index.html").read_text() and "/card?" in (ROOT / "web" / "app.js").read_text()


def test_a_real_sample_gives_label_measurements_pictures_and_downloads(sample_result):
    r = sample_result
    assert r["label"] in ("benign", "malignant", "normal") and 0 <= r["confidence"] <= 1
    assert (r["width"], r["height"]) == Image.open(SAMPLE).size and r["threshold"] == r["model_threshold"]
    assert r["lesions"] and r["lesions"][0]["size_text"].endswith("px (pixel size unknown)")
    assert {"shape", "orientation", "margin", "long_diameter"} <= set(r["lesions"][0])
    assert 0 <= r["uncertainty"] <= 1 and r["mask_source"] == "network"
    outline, filled, umap = (decode(r["images"][k]) for k in ("outline", "filled", "uncertainty"))
    assert outline.shape == filled.shape == umap.shape == (r["height"], r["width"], 3) and outline.std() > 10
    assert not np.array_equal(outline, filled)
    mask = decode(r["images"]["mask"])
    assert set(np.unique(mask)) == {0, 255} and (mask > 0).sum() == r["lesion_area_px"]
    header, row = r["csv"].splitlines()[:2]
    assert header.split(",") == predict.CSV_FIELDS and row.startswith("malignant (3).png,")
    assert r["report"]["file"] == "malignant (3).png" and r["report"]["n_lesions"] == len(r["lesions"])
    assert r["files"]["mask"] == "malignant_(3)_mask.png"


def test_the_page_and_predict_py_agree(sample_result, tmp_path):
    assert predict.main([str(SAMPLE), "--checkpoint", str(CHECKPOINT), "--out_dir", str(tmp_path)]) == 0
    written = np.asarray(Image.open(tmp_path / "malignant (3)_mask.png"))
    assert np.array_equal(written, decode(sample_result["images"]["mask"]))


def test_threshold_and_model_changes_update_the_result(served, sample_result):
    url, _ = served
    key = sample_result["id"]
    status, low = call(url, f"api/update?id={key}&threshold=0.05", b"")
    status2, high = call(url, f"api/update?id={key}&threshold=0.95", b"")
    assert status == status2 == 200 and low["threshold"] == 0.05 and high["threshold"] == 0.95
    assert low["lesion_area_px"] >= sample_result["lesion_area_px"] >= high["lesion_area_px"]
    other = "busi_unet_efficientnet_lite0.safetensors"
    status, r = call(url, f"api/update?id={key}&model={other}", b"")
    assert status == 200 and r["model"] == other and r["threshold"] == r["model_threshold"]
    for bad in ("../../README.md", str(CHECKPOINT), "nope.safetensors"):
        status, r = call(url, f"api/update?id={key}&model={urllib.parse.quote(bad)}", b"")
        assert status == 400 and "unknown model" in r["error"]


def test_bad_files_each_get_a_clear_message_and_the_server_goes_on(served, tmp_path):
    url, _ = served
    from test_dicom_io import write_dicom
    dicom = write_dicom(tmp_path / "x.dcm", np.zeros((30, 40), np.uint8))
    import pydicom
    ds = pydicom.dcmread(dicom)
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    cases = [("notes.png", b"this is text, not a scan\n", "not an image file"),
             ("empty.png", b"", "empty file (0 bytes)"),
             ("half.png", SAMPLE.read_bytes()[:3000], "truncated or corrupt"),
             ("report.dcm", (tmp_path / "nopixels.dcm").read_bytes(), "no pixel data")]
    for name, body, message in cases:
        status, r = call(url, f"api/predict?name={name}", body)
        assert status == 400 and r["error"].startswith(name) and message in r["error"], r
        assert "/tmp" not in r["error"] and "bus-app-" not in r["error"]  # the server's own paths are not shown
    status, r = call(url, "api/predict?name=ok.png", png_bytes(np.asarray(Image.open(SAMPLE).convert("L"))))
    assert status == 200 and r["label"]


def test_size_and_pixel_limits(served):
    url, server = served
    big = png_bytes(np.zeros((7746, 7746), np.uint8))  # 60 megapixels, a small file
    status, r = call(url, "api/predict?name=huge.png", big)
    assert status == 400 and "huge.png: image too large" in r["error"] and "max_pixels" in r["error"]
    status, r = call(url, "api/predict?name=big.bin", np.random.default_rng(0).bytes(3 * 1024 * 1024))
    assert status == 413 and "over the limit of 2.0 MB" in r["error"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(server.state.cfg, "max_pixels", 100_000)
        status, r = call(url, "api/predict?name=scan.png", SAMPLE.read_bytes())
        assert status == 400 and "the limit is 100000 pixels" in r["error"]
    assert call(url, "api/config")[0] == 200


def test_no_browser_name_or_path_is_used_on_disk(served):
    url, server = served
    target = ROOT / "runs" / "app_test_must_not_exist.png"
    name = urllib.parse.quote(f"../../../{target.relative_to(ROOT)}")
    status, r = call(url, f"api/predict?name={name}", SAMPLE.read_bytes())
    assert status == 200 and r["name"] == target.name and not target.exists()
    assert list(Path(server.state.tmp.name).iterdir()) == []  # the upload's temporary file is gone
    for path in ("../README.md", "%2e%2e/app.py", "web/app.js", "app.py", "/etc/passwd", "api/../app.py"):
        status, r = call(url, path)
        assert status == 404, path
    status, r = call(url, "api/predict?name=a.png&pixel_mm=/etc/passwd", SAMPLE.read_bytes())
    assert status == 400 and "not a number" in r["error"]


def test_pixel_size_typed_in_the_page_gives_millimetres(served):
    url, _ = served
    status, r = call(url, "api/predict?name=s.png&pixel_mm=0.1", SAMPLE.read_bytes())
    assert status == 200 and r["lesions"][0]["size_text"].endswith(" mm")
    assert r["pixel_size"]["source"] == "pixel size typed in the page"


def test_requests_for_another_host_name_are_refused(served):
    url, _ = served
    status, r = call(url, "api/config", headers={"Host": "attacker.example:80"})
    assert status == 403


def test_box_prompt_gives_a_mask_in_the_box_and_new_measurements(served, sample_result):
    url, _ = served
    key = sample_result["id"]
    r0, c0, r1, c1 = sample_result["lesions"][0]["bbox_row_col"]
    box = f"{c0 - 8},{r0 - 8},{c1 + 8},{r1 + 8}"
    status, r = call(url, f"api/box?id={key}&box={box}", b"")
    assert status == 200, r
    assert r["mask_source"].startswith("LiteMedSAM box prompt") and r["uncertainty"] is None
    mask = decode(r["images"]["mask"]) > 0
    assert mask.sum() == r["lesion_area_px"] > 500 and not mask[:, : c0 - 10].any() and not mask[r1 + 10:].any()
    assert r["lesions"] and "LiteMedSAM" in r["csv"] and r["label"] == sample_result["label"]
    status, back = call(url, f"api/update?id={key}", b"")
    assert back["mask_source"] == "network" and back["lesion_area_px"] == sample_result["lesion_area_px"]
    for bad, message in (("1,2,3", "four numbers"), ("5000,5000,6000,6000", "outside")):
        status, r = call(url, f"api/box?id={key}&box={bad}", b"")
        assert status == 400 and message in r["error"]
    status, r = call(url, "api/box?id=unknown&box=1,1,50,50", b"")
    assert status == 410 and "drop it again" in r["error"]


def test_an_internal_failure_is_answered_and_the_server_keeps_serving(served, monkeypatch):
    url, _ = served

    def boom(*a, **k):
        raise RuntimeError("simulated failure")
    monkeypatch.setattr(predict, "read_out", boom)
    status, r = call(url, "api/predict?name=x.png", SAMPLE.read_bytes())
    assert status == 500 and r["error"].startswith("x.png: could not be processed") and "simulated" in r["error"]
    monkeypatch.undo()
    assert call(url, "api/predict?name=x.png", SAMPLE.read_bytes())[0] == 200


def test_old_images_are_dropped_beyond_keep_mb(served, monkeypatch):
    url, server = served
    monkeypatch.setitem(server.state.cfg, "keep_mb", 0.5)  # two 425 x 475 scans
    small = png_bytes(np.asarray(Image.open(SAMPLE).convert("L")))
    keys = [call(url, f"api/predict?name={i}.png", small)[1]["id"] for i in range(3)]
    kept = server.state.images
    assert sum(e.frame.grey.size for e in kept.values()) <= 0.5e6 and keys[-1] in kept and keys[0] not in kept


def test_display_names_and_download_stems():
    assert app.display_name("C:\\scans\\x\u0000y.png") == "xy.png"
    assert app.display_name("../../etc/passwd") == "passwd" and app.display_name("") == "upload"
    assert app.download_stem("benign (1).PNG") == "benign_(1)" and app.download_stem("../..") == "upload"


def test_a_multi_frame_dicom_gives_millimetres_and_a_chosen_frame(served, tmp_path):
    url, _ = served
    from test_dicom_io import write_dicom
    grey = np.asarray(Image.open(SAMPLE).convert("L"))
    path = write_dicom(tmp_path / "IM0001", np.stack([grey, grey[:, ::-1]]), spacing=(0.08, 0.08))
    status, first = call(url, "api/predict?name=IM0001", path.read_bytes())  # no extension: found by its preamble
    assert status == 200 and (first["n_frames"], first["frame"]) == (2, 0), first
    assert first["pixel_size"]["source"] == "dicom PixelSpacing" and first["lesions"][0]["size_text"].endswith(" mm")
    assert first["files"]["mask"] == "IM0001_f000_mask.png" and "PatientName" not in json.dumps(first["report"])
    status, second = call(url, "api/predict?name=IM0001&frame=1", path.read_bytes())
    assert status == 200 and second["frame"] == 1
    (r0, c0), (r1, c1) = (x["lesions"][0]["centroid_row_col"] for x in (first, second))  # frame 1 is mirrored
    assert abs(r1 - r0) < 15 and abs(c1 - (grey.shape[1] - 1 - c0)) < 15
    status, r = call(url, "api/predict?name=IM0001&frame=7", path.read_bytes())
    assert status == 400 and "frame 7" in r["error"] and r["error"].startswith("IM0001")


def test_the_benchmark_runs(capsys):
    assert app.main(["--benchmark", "1", "--no-uncertainty", "--checkpoint", str(CHECKPOINT)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["uploads"] == 1 and out["median_s"] > 0 and out["next_box_s"] > 0 and "500x500" in out["image"]
