"""dicom_io.py: DICOM files built here with pydicom (no real patient files): pixel formats (MONOCHROME1/2, 8/16-bit,
RGB, YBR, multi-frame, compressed), the pixel size from ultrasound regions or PixelSpacing, cropping, bad files,
the pixel_mm setting, and DICOM through dataset.py's loader and discovery."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")

import dicom_io  # noqa: E402
from dataset import DataError, discover_folders, load_image  # noqa: E402
from dicom_io import DicomError, Geometry, PixelSize, read_frame, read_frames  # noqa: E402

LIMIT = 50_000_000
SECRET = "Doe^Jane SECRET-ID-4711"  # header values that must never reach an output


def region(x0, y0, x1, y1, delta_cm=(0.01, 0.01), units=(3, 3), spatial_format=1):
    """One item of the Sequence of Ultrasound Regions (delta_cm: Physical Delta X, Y)."""
    from pydicom.dataset import Dataset
    r = Dataset()
    r.RegionSpatialFormat, r.RegionDataType, r.RegionFlags = spatial_format, 1, 0
    r.RegionLocationMinX0, r.RegionLocationMinY0, r.RegionLocationMaxX1, r.RegionLocationMaxY1 = x0, y0, x1, y1
    r.PhysicalUnitsXDirection, r.PhysicalUnitsYDirection = units
    r.PhysicalDeltaX, r.PhysicalDeltaY = delta_cm
    return r


def _jpeg_frames(pixels: np.ndarray) -> list[bytes]:
    """Baseline JPEG (YCbCr 4:2:2) of each RGB frame, made with Pillow."""
    frames = pixels if pixels.ndim == 4 else pixels[None]
    out = []
    for f in frames:
        buf = io.BytesIO()
        Image.fromarray(f).save(buf, "JPEG", quality=95, subsampling=1)
        out.append(buf.getvalue())
    return out


def write_dicom(path, pixels: np.ndarray, photometric: str = "MONOCHROME2", *, spacing=None, regions=(),
                syntax: str = "", bits_stored: int | None = None, preamble: bool = True) -> Path:
    """An ultrasound DICOM file of `pixels` (H x W, H x W x 3, or frames first), with the patient's name, ID and
    a date in its header. syntax: '' (uncompressed), 'rle', 'j2k' or 'jpeg' (baseline, YBR_FULL_422)."""
    from pydicom import uid
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.6.1"  # US Image Storage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = uid.generate_uid()
    ds.Modality, ds.PatientName, ds.PatientID, ds.StudyDate = "US", SECRET.split()[0], SECRET.split()[1], "20240131"
    if syntax == "jpeg":
        ds.set_pixel_data(pixels, "RGB", 8)
        ds.PixelData = encapsulate(_jpeg_frames(pixels))
        ds["PixelData"].VR = "OB"
        ds.PhotometricInterpretation, ds.LossyImageCompression = "YBR_FULL_422", "01"
        ds.file_meta.TransferSyntaxUID = uid.JPEGBaseline8Bit
    else:
        ds.set_pixel_data(pixels, photometric, 8 if pixels.dtype == np.uint8 else 16)
    if bits_stored:
        ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    if spacing:
        ds.PixelSpacing = list(spacing)
    if regions:
        ds.SequenceOfUltrasoundRegions = list(regions)
    if syntax in ("rle", "j2k"):
        ds.compress(uid.RLELossless if syntax == "rle" else uid.JPEG2000Lossless)
    ds.save_as(path, enforce_file_format=preamble)
    return Path(path)


def ramp(h=40, w=60) -> np.ndarray:
    return ((np.arange(h)[:, None] * 3 + np.arange(w)[None]) % 256).astype(np.uint8)


def test_monochrome2_with_pixel_spacing_and_no_extension(tmp_path):
    a = ramp()
    path = write_dicom(tmp_path / "IM0001", a, spacing=(0.1, 0.2))
    assert dicom_io.is_dicom(path) and dicom_io.has_dicom_magic(path)
    geometry, frames = read_frames(path, max_pixels=LIMIT)
    assert [(i, f.tobytes()) for i, f in frames] == [(0, a.tobytes())]
    assert (geometry.rows, geometry.cols, geometry.n_frames) == (40, 60, 1)
    assert geometry.pixel_size_at(5, 5) == PixelSize(0.1, 0.2, "dicom PixelSpacing")
    assert np.array_equal(load_image(path), a)  # dataset.py's loader reads it too


def test_two_regions_each_give_the_pixel_size_of_their_lesions(tmp_path):
    regions = [region(0, 5, 29, 39, (0.01, 0.01)), region(30, 5, 59, 39, (0.02, 0.025)),
               region(0, 0, 59, 4, (0.5, 0.1), units=(4, 7), spatial_format=3)]  # a spectrum: s and cm/s
    path = write_dicom(tmp_path / "dual.dcm", ramp(), regions=regions)
    geometry, _ = read_frames(path, max_pixels=LIMIT)
    left, right = geometry.pixel_size_at(20, 10), geometry.pixel_size_at(20, 45)
    assert left.row_mm == pytest.approx(0.1) and left.col_mm == pytest.approx(0.1)
    assert left.source == "dicom ultrasound region 1"
    assert right.row_mm == pytest.approx(0.25) and right.col_mm == pytest.approx(0.2)
    assert geometry.pixel_size_at(2, 10) is None  # only the spectrum (not cm) there, and no PixelSpacing
    assert geometry.tissue_box() == (5, 40, 0, 60)  # the two 2D regions, end exclusive
    assert geometry.with_fallback(PixelSize(0.3, 0.3, "pixel_mm setting")).pixel_size_at(2, 10).row_mm == 0.3
    text = str(geometry.to_json())
    assert "dicom ultrasound region 2" in text and "Doe" not in text and "4711" not in text


def test_multi_frame_each_or_one(tmp_path):
    frames = np.stack([ramp(), 255 - ramp(), ramp() // 2])
    path = write_dicom(tmp_path / "cine.dcm", frames)
    geometry, it = read_frames(path, -1, max_pixels=LIMIT)
    got = list(it)
    assert geometry.n_frames == 3 and [i for i, _ in got] == [0, 1, 2]
    assert all(np.array_equal(g, f) for (_, g), f in zip(got, frames))
    assert np.array_equal(read_frame(path, 2, max_pixels=LIMIT), frames[2])
    assert np.array_equal(load_image(path), frames[0])  # the loader takes the first frame
    with pytest.raises(DicomError, match="cine.dcm: frame 3 asked, the file has 3"):
        read_frames(path, 3, max_pixels=LIMIT)


def test_monochrome1_is_inverted_and_16_bit_is_scaled(tmp_path):
    a = ramp()
    assert np.array_equal(read_frame(write_dicom(tmp_path / "m1.dcm", a, "MONOCHROME1"), max_pixels=LIMIT), 255 - a)
    b = (a.astype(np.uint16) * 16)  # 12 bits stored: 0..4080
    b[0, 0] = 4095
    got = read_frame(write_dicom(tmp_path / "b12.dcm", b, bits_stored=12), max_pixels=LIMIT)
    assert got[0, 0] == 255 and got[0, 1] == round(16 / 4095 * 255)
    got[0, 0] = a[0, 0]
    assert np.abs(got.astype(int) - a).max() <= 1  # 16 x v of 4095 -> about v of 255


def test_rgb_and_ybr_become_pils_grey(tmp_path):
    from pydicom.pixels import convert_color_space
    rgb = np.stack([ramp(), 255 - ramp(), ramp() // 3], -1)
    want = np.asarray(Image.fromarray(rgb).convert("L"))
    assert np.array_equal(read_frame(write_dicom(tmp_path / "rgb.dcm", rgb, "RGB"), max_pixels=LIMIT), want)
    ybr = write_dicom(tmp_path / "ybr.dcm", convert_color_space(rgb, "RGB", "YBR_FULL"), "YBR_FULL")
    assert np.abs(read_frame(ybr, max_pixels=LIMIT).astype(int) - want).max() <= 2
    grey_rgb = np.repeat(ramp()[..., None], 3, -1)  # equal channels keep their values exactly
    assert np.array_equal(read_frame(write_dicom(tmp_path / "g.dcm", grey_rgb, "RGB"), max_pixels=LIMIT), ramp())


def test_compressed_transfer_syntaxes(tmp_path):
    a = ramp()
    assert np.array_equal(read_frame(write_dicom(tmp_path / "rle.dcm", a, syntax="rle"), max_pixels=LIMIT), a)
    handlers = dicom_io.installed_handlers()
    assert handlers["RLE Lossless"]
    if "pylibjpeg" in handlers["JPEG 2000 Image Compression (Lossless Only)"]:
        pytest.importorskip("openjpeg")
        assert np.array_equal(read_frame(write_dicom(tmp_path / "j2k.dcm", a, syntax="j2k"), max_pixels=LIMIT), a)
    rgb = np.repeat(ramp(48, 64)[..., None], 3, -1)
    got = read_frame(write_dicom(tmp_path / "jpg.dcm", np.stack([rgb, 255 - rgb]), syntax="jpeg"), 1,
                     max_pixels=LIMIT)
    assert np.abs(got.astype(int) - (255 - ramp(48, 64))).mean() < 3  # lossy, YBR_FULL_422, second frame


def test_bad_files_are_errors_naming_the_file(tmp_path):
    good = write_dicom(tmp_path / "good.dcm", np.stack([ramp(), ramp()]))
    data = good.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:-700])  # inside the pixel data
    with pytest.raises(DicomError, match=r"cut\.dcm: cannot decode the pixel data.*truncated"):
        list(read_frames(tmp_path / "cut.dcm", max_pixels=LIMIT)[1])
    (tmp_path / "head.dcm").write_bytes(data[:300])  # inside the header
    with pytest.raises(DicomError, match=r"head\.dcm: .*(no pixel data|truncated)"):
        read_frames(tmp_path / "head.dcm", max_pixels=LIMIT)
    nopix = write_dicom(tmp_path / "report.dcm", ramp())
    ds = pydicom.dcmread(nopix)
    del ds.PixelData
    ds.save_as(nopix)
    with pytest.raises(DicomError, match=r"report\.dcm: the DICOM file holds no pixel data"):
        read_frames(nopix, max_pixels=LIMIT)
    with pytest.raises(DicomError, match=r"wide\.dcm: ultrasound region 2 .* contradicts the image size"):
        read_frames(write_dicom(tmp_path / "wide.dcm", ramp(), regions=[region(0, 0, 59, 39), region(0, 0, 60, 39)]),
                    max_pixels=LIMIT)
    (tmp_path / "notdicom.dcm").write_bytes(b"hello" * 50)
    with pytest.raises(DicomError, match=r"notdicom\.dcm"):
        read_frames(tmp_path / "notdicom.dcm", max_pixels=LIMIT)
    with pytest.raises(DicomError, match=r"good\.dcm: frames of 60x40 pixels exceed the limit"):
        read_frames(good, max_pixels=1000)


def test_unsupported_compression_is_a_clear_error(tmp_path):
    from pydicom.encaps import encapsulate
    path = write_dicom(tmp_path / "private.dcm", ramp())
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5"  # a private syntax no handler knows
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds.save_as(path, implicit_vr=False, little_endian=True)
    with pytest.raises(DicomError, match=r"private\.dcm: pixel data encoded as 1\.2\.3\.4\.5, which no installed"):
        read_frame(path, max_pixels=LIMIT)
    with pytest.raises(DataError, match=r"private\.dcm"):  # through the loader: its DataError
        load_image(path)


def test_crop_and_uncrop():
    grey = ramp()
    box = (5, 40, 10, 50)
    part = dicom_io.crop(grey, box)
    assert part.shape == (35, 40)
    back = dicom_io.uncrop(np.ones((2, *part.shape), bool), box, grey.shape)
    assert back.shape == (2, 40, 60) and back.sum() == 2 * 35 * 40 and not back[:, :5].any()
    assert dicom_io.crop(grey, None) is grey and Geometry(40, 60).tissue_box() is None


def test_pixel_mm_setting(tmp_path):
    assert dicom_io.pixel_mm_lookup("")(Path("a.png")) is None
    assert dicom_io.pixel_mm_lookup("0.08")(Path("a.png")) == PixelSize(0.08, 0.08, "pixel_mm setting")
    (tmp_path / "sizes.csv").write_text("file,mm\nscans/a.png,0.1\nb.png,0.05\n")
    look = dicom_io.pixel_mm_lookup(str(tmp_path / "sizes.csv"))
    assert look(tmp_path / "scans" / "a.png").row_mm == 0.1   # by its path relative to the CSV
    assert look(Path("elsewhere/b.png")).col_mm == 0.05        # by its name
    assert look(Path("c.png")) is None
    with pytest.raises(DicomError, match="pixel_mm: pixel size 'abc' is not a number"):
        dicom_io.pixel_mm_lookup("abc")
    (tmp_path / "bad.csv").write_text("a.png,-1\n")
    with pytest.raises(DicomError, match="bad.csv row 1: pixel size -1.0 mm"):
        dicom_io.pixel_mm_lookup(str(tmp_path / "bad.csv"))


def test_discovery_finds_dicom_without_extension(tmp_path):
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    write_dicom(images / "benign_case1", ramp(), preamble=True)
    (images / "notes").write_text("not an image")
    m = np.zeros((40, 60), np.uint8)
    m[10:20, 10:30] = 255
    Image.fromarray(m).save(masks / "benign_case1_mask.png")
    samples = discover_folders(images, masks)
    assert [s.image.name for s in samples] == ["benign_case1"] and samples[0].label == "benign"
