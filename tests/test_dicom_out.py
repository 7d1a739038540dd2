"""dicom_out.py: DICOM SEG and TID 1500 SR of DICOM inputs, read back with pydicom and highdicom, on DICOM files
built here (no real patient files): a single frame calibrated by an ultrasound region, a multi-frame cine, a file
without a pixel size, bad files; predict.py --dicom_out and the web page's downloads. The network is replaced by a
fixed predictor (test_predict.py's), so no model is trained or loaded."""
from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pydicom = pytest.importorskip("pydicom")
hd = pytest.importorskip("highdicom")

import dicom_out  # noqa: E402
import predict  # noqa: E402
from measure import lesion_labels, measure_lesions  # noqa: E402
from test_dicom_io import SECRET, region, write_dicom  # noqa: E402
from test_predict import _rows, dark_disc_png, fixed_predictor  # noqa: E402

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
US_MULTI_FRAME = "1.2.840.10008.5.1.4.1.1.3.1"
NAME, PATIENT_ID = SECRET.split()
NOT_COPIED = {"InstitutionName": "SECRET HOSPITAL", "Manufacturer": "SECRET SCANNER CO", "OperatorsName": "Op^Secret",
              "StationName": "SECRETSTATION", "DeviceSerialNumber": "SN-SECRET-99",
              "SeriesDescription": "SECRET SERIES"}


def clinical_dicom(path, pixels: np.ndarray, *, uids: bool = True, sop_class: str = "",
                   frame_of_reference: bool = False, **kw) -> Path:
    """test_dicom_io.write_dicom's file with what a scanner writes besides: study and series UIDs, a study ID,
    an accession number, and institution, device and operator names (NOT_COPIED) that no output may carry."""
    path = write_dicom(path, pixels, **kw)
    ds = pydicom.dcmread(path)
    if uids:
        ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.StudyID, ds.AccessionNumber, ds.PatientSex, ds.PatientBirthDate = "S17", "ACC-SECRET-5", "F", "19700101"
    for key, value in NOT_COPIED.items():
        setattr(ds, key, value)
    if sop_class:
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    if frame_of_reference:
        ds.FrameOfReferenceUID = pydicom.uid.generate_uid()
    ds.save_as(path)
    return Path(path)


@pytest.fixture()
def fake_net(monkeypatch, tmp_path) -> Path:
    """predict.py's network replaced by test_predict.fixed_predictor (a benign ellipse in the middle); returns
    the stand-in checkpoint file the SEG and SR name."""
    ckpt = tmp_path / "fake_model.safetensors"
    ckpt.write_bytes(b"stand-in checkpoint for the tests")
    meta = {"image_size": 64, "threshold": 0.5, "min_area": 0, "classes": 2}
    monkeypatch.setattr(predict, "load_predictor", lambda *a, **k: (fixed_predictor(), meta))
    return ckpt


def readout(mask: np.ndarray, pixel_size_at=None, **kw) -> predict.Readout:
    d = predict.Decision(mask, np.stack([mask, np.zeros_like(mask)]), "benign", 0.8, 0.9, 0.3)
    return predict.Readout(d, measure_lesions(mask, pixel_size_at), **kw)


def two_lesions(shape=(60, 80)) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[10:30, 8:40] = True     # the larger: lesion 1
    mask[40:50, 55:66] = True
    return mask


def code(seq) -> tuple[str, str]:
    return seq[0].CodingSchemeDesignator, seq[0].CodeValue


def groups(sr_path: Path) -> list:
    sr = hd.sr.srread(sr_path)
    return sr, sr.content.get_planar_roi_measurement_groups()


def measurement(group, meaning: str):
    found = [m for m in group.get_measurements() if m.name.meaning == meaning]
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------------------
# The objects themselves
# ---------------------------------------------------------------------------------------------------------

def test_seg_of_a_region_calibrated_frame_reads_back_pixel_for_pixel(tmp_path):
    from dicom_io import read_frames
    src = clinical_dicom(tmp_path / "IM0001", np.full((60, 80), 90, np.uint8), frame_of_reference=True,
                         regions=[region(0, 0, 79, 59, (0.01, 0.01))])
    source = pydicom.dcmread(src)
    geometry, _ = read_frames(src, max_pixels=10**8)
    mask = two_lesions()
    ro = readout(mask, geometry.pixel_size_at, uncertainty=0.05, review=False)
    model = dicom_out.ModelInfo.of(__file__, 0.5)
    seg, sr = dicom_out.dicom_objects(dicom_out.source_header(src), None, ro, model)
    (tmp_path / "seg.dcm").write_bytes(dicom_out.to_bytes(seg))
    back = pydicom.dcmread(tmp_path / "seg.dcm")
    assert back.SOPClassUID == SEG_STORAGE == back.file_meta.MediaStorageSOPClassUID and back.Modality == "SEG"
    assert (back.Rows, back.Columns, back.NumberOfFrames) == (source.Rows, source.Columns, 2)  # a frame per lesion
    labels = dicom_out.seg_labels(back)
    assert np.array_equal(labels, lesion_labels(mask)) and np.array_equal(labels > 0, mask)
    read = hd.seg.segread(tmp_path / "seg.dcm")
    assert np.array_equal(read.get_pixels_by_source_instance([source.SOPInstanceUID], combine_segments=True)[0] > 0,
                          mask)
    refs = [back.SourceImageSequence[0], back.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0],
            *(g.DerivationImageSequence[0].SourceImageSequence[0] for g in back.PerFrameFunctionalGroupsSequence)]
    assert {(r.ReferencedSOPClassUID, r.ReferencedSOPInstanceUID) for r in refs} == \
        {(source.SOPClassUID, source.SOPInstanceUID)}
    assert back.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert all(g.DerivationImageSequence[0].SourceImageSequence[0].SpatialLocationsPreserved == "YES"
               for g in back.PerFrameFunctionalGroupsSequence)
    for key in ("StudyInstanceUID", "FrameOfReferenceUID", "PatientName", "PatientID", "PatientBirthDate",
                "PatientSex", "StudyDate", "StudyID", "AccessionNumber"):
        assert back[key].value == source[key].value, key
    assert back.SeriesInstanceUID != source.SeriesInstanceUID and back.SOPInstanceUID != source.SOPInstanceUID
    for key, value in NOT_COPIED.items():
        assert back.get(key) != value and value.encode() not in (tmp_path / "seg.dcm").read_bytes(), key
    # no plane geometry of its own: without a patient-relative Frame of Reference the standard (PS3.3 A.51.5) ties each
    # SEG pixel to its source pixel (Derivation Image) and allows no Pixel Measures: the spacing is the source's
    assert "PixelMeasuresSequence" not in back.SharedFunctionalGroupsSequence[0] and "PixelSpacing" not in back
    segment = back.SegmentSequence[0]
    assert segment.SegmentLabel == "lesion 1" and segment.SegmentAlgorithmType == "AUTOMATIC"
    assert code(segment.SegmentedPropertyCategoryCodeSequence) == ("SCT", "49755003")
    assert code(segment.SegmentedPropertyTypeCodeSequence) == ("SCT", "52988006")
    assert code(segment.AnatomicRegionSequence) == ("SCT", "76752008")
    algorithm = segment.SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "BUS-UNet" and algorithm.AlgorithmVersion == model.version
    assert model.version.startswith("sha256:") and "test_dicom_out.py" in algorithm.AlgorithmParameters
    assert code(algorithm.AlgorithmFamilyCodeSequence) == ("DCM", "123110")  # artificial intelligence


def test_sr_measures_each_lesion_in_mm_and_references_its_segment(tmp_path):
    from dicom_io import read_frames
    src = clinical_dicom(tmp_path / "IM0001", np.full((60, 80), 90, np.uint8),
                         regions=[region(0, 0, 79, 59, (0.01, 0.02))])  # 0.2 mm rows, 0.1 mm columns
    geometry, _ = read_frames(src, max_pixels=10**8)
    ro = readout(two_lesions(), geometry.pixel_size_at, uncertainty=0.31, review=True)
    header = dicom_out.source_header(src)
    seg, sr = dicom_out.dicom_objects(header, None, ro, dicom_out.ModelInfo.of(__file__, 0.4))
    (tmp_path / "sr.dcm").write_bytes(dicom_out.to_bytes(sr))
    sr, found = groups(tmp_path / "sr.dcm")
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34" and sr.Modality == "SR"  # Comprehensive 3D SR
    assert [g.tracking_identifier for g in found] == ["lesion 1", "lesion 2"]
    for group, lesion in zip(found, ro.lesions):
        k = lesion["lesion"]
        assert group.tracking_uid == seg.SegmentSequence[k - 1].TrackingUID
        frame = group.referenced_segmentation_frame
        assert frame.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert frame.referenced_segment_numbers == [k]
        assert frame.referenced_frame_numbers == dicom_out.segment_frames(seg, k) == [k]
        assert frame.source_image_for_segmentation.referenced_sop_instance_uid == header.SOPInstanceUID
        long_axis = measurement(group, "Long axis")
        assert long_axis.value == lesion["long_diameter"]["mm"] and long_axis.unit.value == "mm"
        assert long_axis.unit.scheme_designator == "UCUM"
        assert measurement(group, "Perpendicular Axis").value == lesion["perpendicular_diameter"]["mm"]
        area = measurement(group, "Area")
        assert area.value == lesion["area"]["mm2"] and area.unit.value == "mm2"
        assert measurement(group, "Probability of cancer").value == pytest.approx(0.3)
        assert measurement(group, "Segmentation uncertainty, 1 - mean Dice of test-time views").value == 0.31
        words = {q.name.meaning: q.value.meaning for q in group.get_qualitative_evaluations()}
        assert words["Review recommended"] == "Yes"
        comment = [i.TextValue for i in group[0].ContentSequence if i.ValueType == "TEXT"
                   and i.ConceptNameCodeSequence[0].CodeValue == "121106"][0]
        assert "not a diagnosis" in comment and "dicom ultrasound region 1" in comment
    first = {q.name.meaning: q.value for q in found[0].get_qualitative_evaluations()}
    lesion = ro.lesions[0]  # 20 x 32 px of 0.2 x 0.1 mm: taller than wide in mm
    assert lesion["orientation"]["term"] == "not parallel" and first["Orientation"].value == "111356"
    assert first["Shape"].meaning.lower() == lesion["shape"]["term"]
    assert first["Margins"].meaning.lower().startswith(lesion["margin"]["term"])
    assert sr.CodingSchemeIdentificationSequence[0].CodingSchemeDesignator == "99BUSUNET"
    evidence = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for r in s.ReferencedSeriesSequence for i in r.ReferencedSOPSequence}
    assert evidence == {seg.SOPInstanceUID, header.SOPInstanceUID}
    assert (sr.StudyInstanceUID, sr.PatientID) == (header.StudyInstanceUID, PATIENT_ID)


def test_required_attributes_and_valid_values(tmp_path):
    """No dciodvfy here: highdicom's constructors refuse invalid content, pydicom (raising on invalid values while
    writing and reading) checks every value against its VR, and the Type 1 / Type 2 attributes of the SEG and SR
    IODs (PS3.3 A.51, A.35.13) are checked to be present."""
    from pydicom import config
    src = clinical_dicom(tmp_path / "IM0001", np.full((60, 80), 90, np.uint8), spacing=(0.1, 0.1))
    seg, sr = dicom_out.dicom_objects(dicom_out.source_header(src), None, readout(two_lesions(), None),
                                      dicom_out.ModelInfo.of(__file__, 0.5))
    modes = config.settings.writing_validation_mode, config.settings.reading_validation_mode
    config.settings.writing_validation_mode = config.settings.reading_validation_mode = config.RAISE
    try:
        seg, sr = (pydicom.dcmread(io.BytesIO(dicom_out.to_bytes(x))) for x in (seg, sr))
    finally:
        config.settings.writing_validation_mode, config.settings.reading_validation_mode = modes
    common_1 = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "ContentDate",
                "ContentTime", "InstanceNumber", "SeriesNumber")
    common_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
                "ReferringPhysicianName", "StudyID", "AccessionNumber")
    seg_1 = ("ImageType", "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated",
             "BitsStored", "HighBit", "PixelRepresentation", "LossyImageCompression", "SegmentationType",
             "SegmentSequence", "ContentLabel", "NumberOfFrames", "DimensionOrganizationSequence",
             "DimensionIndexSequence", "SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence",
             "Manufacturer", "ManufacturerModelName", "DeviceSerialNumber", "SoftwareVersions", "PixelData",
             "ReferencedSeriesSequence")
    sr_1 = ("ValueType", "ConceptNameCodeSequence", "ContentTemplateSequence", "ContentSequence", "CompletionFlag",
            "VerificationFlag", "CurrentRequestedProcedureEvidenceSequence")
    for ds, required in ((seg, common_1 + seg_1), (sr, common_1 + sr_1)):
        assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID and ds.preamble is not None
        assert not [k for k in required if ds.get(k) in (None, "")], [k for k in required if ds.get(k) in (None, "")]
        assert not [k for k in common_2 if k not in ds]
    assert seg.BitsAllocated == 1 and seg.SegmentationType == "BINARY"
    assert all(s.SegmentNumber and s.SegmentLabel and s.SegmentAlgorithmType for s in seg.SegmentSequence)
    assert code(sr.ConceptNameCodeSequence) == ("DCM", "126000")  # Imaging Measurement Report
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("PARTIAL", "UNVERIFIED")  # a model's, never signed off
    assert hd.seg.Segmentation.from_dataset(seg).number_of_segments == 2  # highdicom parses both again
    assert len(hd.sr.Comprehensive3DSR.from_dataset(sr).content.get_planar_roi_measurement_groups()) == 2


def test_a_box_prompted_mask_is_a_semiautomatic_segment_naming_its_box(tmp_path):
    src = clinical_dicom(tmp_path / "IM0001", np.full((60, 80), 90, np.uint8))
    ro = readout(two_lesions(), box=(5.0, 8.0, 45.0, 33.0))
    mask = predict.mask_source(ro)
    seg, sr = dicom_out.dicom_objects(dicom_out.source_header(src), None, ro, dicom_out.ModelInfo.of(__file__, 0.5),
                                      mask)
    assert {s.SegmentAlgorithmType for s in seg.SegmentSequence} == {"SEMIAUTOMATIC"}
    assert mask.startswith("LiteMedSAM box prompt") and mask in \
        seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters
    assert f"mask={mask}" in json.dumps(sr.to_json_dict(), default=str)


def test_header_values_that_are_not_dicom_are_left_empty_not_refused(tmp_path, caplog):
    src = clinical_dicom(tmp_path / "odd.dcm", np.full((60, 80), 90, np.uint8))
    ds = pydicom.dcmread(src)
    with pytest.warns(UserWarning):  # pydicom warns about the invalid values a scanner might write
        ds.PatientSex, ds.StudyDate, ds.StudyTime = "U", "2024-01-31", "12:30"
    ds.save_as(src)
    header = dicom_out.source_header(src)
    assert (header.PatientSex, header.StudyDate, header.StudyTime) == ("", "", "")
    assert "PatientSex, StudyDate, StudyTime not valid DICOM" in caplog.text
    seg, sr = dicom_out.dicom_objects(header, None, readout(two_lesions()), dicom_out.ModelInfo.of(__file__, 0.5))
    assert (seg.PatientID, sr.PatientID, sr.PatientSex) == (PATIENT_ID, PATIENT_ID, "")


# ---------------------------------------------------------------------------------------------------------
# predict.py --dicom_out
# ---------------------------------------------------------------------------------------------------------

def test_predict_writes_seg_and_sr_whose_values_equal_the_csv(fake_net, tmp_path):
    src = clinical_dicom(tmp_path / "IM0001", np.full((90, 120), 150, np.uint8),
                         regions=[region(0, 0, 119, 89, (0.005, 0.005))])
    out = tmp_path / "o"
    assert predict.main([str(src), "--out_dir", str(out), "--checkpoint", str(fake_net), "--dicom_out",
                         "--uncertainty", "--uncertainty_cutoff", "0.01"]) == 0
    row = _rows(out / "predictions.csv")[0]
    assert (row["dicom_seg"], row["dicom_sr"]) == ("IM0001_seg.dcm", "IM0001_sr.dcm") and row["error"] == ""
    report = json.loads((out / row["lesions_json"]).read_text())
    assert report["outputs"]["dicom_seg"] == "IM0001_seg.dcm"
    mask = np.asarray(Image.open(out / row["mask"])) > 0
    assert np.array_equal(dicom_out.seg_labels(pydicom.dcmread(out / row["dicom_seg"])) > 0, mask)
    sr, (group,) = groups(out / row["dicom_sr"])
    assert measurement(group, "Long axis").value == float(row["long_diameter_mm"])
    assert measurement(group, "Long axis").unit.value == "mm"
    assert measurement(group, "Perpendicular Axis").value == float(row["perpendicular_diameter_mm"])
    assert measurement(group, "Area").value == float(row["area_mm2"])
    assert measurement(group, "Segmentation uncertainty, 1 - mean Dice of test-time views").value == \
        pytest.approx(float(row["uncertainty"]), abs=1e-4)
    seg = pydicom.dcmread(out / row["dicom_seg"])
    assert group.referenced_segmentation_frame.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmParameters.count(
        "fake_model.safetensors") == 1


def test_multi_frame_gives_one_seg_and_sr_per_frame_referencing_it(fake_net, tmp_path):
    frames = np.stack([np.full((90, 120), v, np.uint8) for v in (150, 160, 170)])
    src = clinical_dicom(tmp_path / "cine.dcm", frames, spacing=(0.08, 0.08), sop_class=US_MULTI_FRAME)
    source = pydicom.dcmread(src, stop_before_pixels=True)
    out = tmp_path / "o"
    assert predict.main([str(src), "--out_dir", str(out), "--checkpoint", str(fake_net), "--dicom_out"]) == 0
    rows = _rows(out / "predictions.csv")
    assert [r["dicom_seg"] for r in rows] == [f"cine_f00{i}_seg.dcm" for i in range(3)]
    segs = [pydicom.dcmread(out / r["dicom_seg"]) for r in rows]
    assert len({s.SeriesInstanceUID for s in segs}) == 1 and [s.InstanceNumber for s in segs] == [1, 2, 3]
    for i, (row, seg) in enumerate(zip(rows, segs)):
        reference = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
        assert (reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID, reference.ReferencedFrameNumber) \
            == (US_MULTI_FRAME, source.SOPInstanceUID, i + 1)
        assert seg.SourceImageSequence[0].ReferencedFrameNumber == i + 1
        assert dicom_out.STAND_IN_CLASS not in json.dumps(seg.to_json_dict(), default=str)  # only the real class
        mask = np.asarray(Image.open(out / row["mask"])) > 0
        read = hd.seg.segread(out / row["dicom_seg"])
        assert np.array_equal(read.get_pixels_by_source_frame(source.SOPInstanceUID, [i + 1],
                                                              combine_segments=True)[0] > 0, mask)
        sr, (group,) = groups(out / row["dicom_sr"])
        assert group.referenced_segmentation_frame.source_image_for_segmentation.referenced_frame_numbers == [i + 1]
        assert measurement(group, "Long axis").value == float(row["long_diameter_mm"])


def test_without_a_pixel_size_the_sr_has_no_mm_and_says_why(fake_net, tmp_path):
    src = clinical_dicom(tmp_path / "nosize.dcm", np.full((90, 120), 150, np.uint8))
    out = tmp_path / "o"
    assert predict.main([str(src), "--out_dir", str(out), "--checkpoint", str(fake_net), "--dicom_out"]) == 0
    row = _rows(out / "predictions.csv")[0]
    assert row["pixel_size_source"] == "unknown" and row["dicom_seg"] and row["dicom_sr"]
    sr, (group,) = groups(out / row["dicom_sr"])
    assert not [m for m in group.get_measurements() if m.unit.value in ("mm", "mm2")]
    assert {q.name.meaning for q in group.get_qualitative_evaluations()} >= {"Shape", "Orientation", "Margins"}
    text = json.dumps(sr.to_json_dict(), default=str)
    assert "No sizes in mm: the pixel size is unknown" in text
    assert np.array_equal(dicom_out.seg_labels(pydicom.dcmread(out / row["dicom_seg"])) > 0,
                          np.asarray(Image.open(out / row["mask"])) > 0)


def test_a_frame_without_a_lesion_gets_an_empty_segment_and_an_image_level_report(monkeypatch, fake_net, tmp_path):
    monkeypatch.setattr(predict, "load_predictor", lambda *a, **k: (fixed_predictor(lesion=False), {"image_size": 64}))
    src = clinical_dicom(tmp_path / "normal.dcm", np.full((90, 120), 150, np.uint8), spacing=(0.1, 0.1))
    out = tmp_path / "o"
    assert predict.main([str(src), "--out_dir", str(out), "--checkpoint", str(fake_net), "--dicom_out"]) == 0
    row = _rows(out / "predictions.csv")[0]
    seg = pydicom.dcmread(out / row["dicom_seg"])
    assert row["label"] == "normal" and seg.SegmentSequence[0].SegmentLabel == dicom_out.NO_LESION
    assert not dicom_out.seg_labels(seg).any()
    sr = hd.sr.srread(out / row["dicom_sr"])
    assert not sr.content.get_planar_roi_measurement_groups()
    (group,) = sr.content.get_image_measurement_groups()
    assert group.tracking_identifier == "image" and "No lesion found" in json.dumps(sr.to_json_dict(), default=str)


def test_csv_json_and_png_still_carry_no_header_text(fake_net, tmp_path):
    folder = tmp_path / "exam"
    folder.mkdir()
    clinical_dicom(folder / "IM0001", np.stack([np.full((90, 120), 150, np.uint8)] * 2),
                   regions=[region(0, 0, 119, 89, (0.005, 0.005))])
    out = tmp_path / "o"
    assert predict.main([str(folder), "--out_dir", str(out), "--checkpoint", str(fake_net), "--dicom_out"]) == 0
    secrets = [NAME.split("^")[0], PATIENT_ID, "ACC-SECRET-5", "19700101", *NOT_COPIED.values()]
    written = sorted(out.iterdir())
    assert {f.suffix for f in written} == {".png", ".json", ".csv", ".dcm"}
    for f in written:
        data = f.read_bytes()
        for text in secrets:
            if f.suffix == ".dcm" and text in (NAME.split("^")[0], PATIENT_ID, "ACC-SECRET-5", "19700101"):
                assert text.encode() in data, f"{f.name} lacks the patient / study identification {text}"
            else:
                assert text.encode() not in data, f"{text} leaked into {f.name}"


def test_bad_input_keeps_its_error_and_unreferenceable_files_are_errors(fake_net, tmp_path, caplog):
    caplog.set_level("INFO", logger="predict")
    folder = tmp_path / "mixed"
    folder.mkdir()
    dark_disc_png(folder / "a.png")
    good = clinical_dicom(folder / "b.dcm", np.full((60, 80), 100, np.uint8))
    (folder / "c.dcm").write_bytes(good.read_bytes()[:-1500])  # cut inside the pixel data
    clinical_dicom(folder / "d.dcm", np.full((60, 80), 100, np.uint8), uids=False)  # no study / series UID
    out = tmp_path / "o"
    assert predict.main([str(folder), "--out_dir", str(out), "--checkpoint", str(fake_net), "--dicom_out"]) == 1
    rows = {Path(r["file"]).name: r for r in _rows(out / "predictions.csv")}
    assert rows["a.png"]["error"] == "" and rows["a.png"]["dicom_seg"] == ""  # no DICOM study to attach it to
    assert rows["b.dcm"]["error"] == "" and (out / rows["b.dcm"]["dicom_seg"]).is_file()
    assert "c.dcm" in rows["c.dcm"]["error"] and "truncated" in rows["c.dcm"]["error"]
    assert "d.dcm" in rows["d.dcm"]["error"] and "StudyInstanceUID, SeriesInstanceUID" in rows["d.dcm"]["error"]
    assert "without --dicom_out it gets its masks" in rows["d.dcm"]["error"]
    assert not list(out.glob("d*")) and "not DICOM and get no SEG/SR" in caplog.text


# ---------------------------------------------------------------------------------------------------------
# The web page
# ---------------------------------------------------------------------------------------------------------

def test_the_page_offers_seg_and_sr_for_a_dicom_upload(fake_net, tmp_path):
    import app
    cfg = app.default_settings(checkpoint=str(fake_net), checkpoint_dir=str(tmp_path / "none"), uncertainty=False)
    state = app.State(cfg)
    try:
        src = clinical_dicom(tmp_path / "IM0001", np.stack([np.full((90, 120), 150, np.uint8)] * 2), spacing=(0.1, 0.1))
        r = app.handle_upload(state, src.read_bytes(), {"name": "IM0001", "frame": "1"})
        assert (r["dicom"]["seg_file"], r["dicom"]["sr_file"]) == ("IM0001_f001_seg.dcm", "IM0001_f001_sr.dcm")
        files = {}
        for key in ("seg", "sr"):
            prefix, data = r["dicom"][key].split(",", 1)
            assert prefix == "data:application/dicom;base64"
            files[key] = tmp_path / f"{key}.dcm"
            files[key].write_bytes(base64.b64decode(data))
        seg = pydicom.dcmread(files["seg"])
        assert seg.SourceImageSequence[0].ReferencedFrameNumber == 2
        assert (dicom_out.seg_labels(seg) > 0).sum() == r["lesion_area_px"]
        sr, (group,) = groups(files["sr"])
        assert measurement(group, "Long axis").value == r["lesions"][0]["long_diameter"]["mm"]
        assert NAME.split("^")[0] not in json.dumps({k: v for k, v in r.items() if k != "dicom"})
        png = app.handle_upload(state, (dark_disc_png(tmp_path / "s.png")).read_bytes(), {"name": "s.png"})
        assert png["dicom"] is None
        bare = clinical_dicom(tmp_path / "bare.dcm", np.full((60, 80), 100, np.uint8), uids=False)
        r = app.handle_upload(state, bare.read_bytes(), {"name": "bare.dcm"})
        assert r["label"] and r["dicom"]["error"].startswith("bare.dcm: ") and "StudyInstanceUID" in r["dicom"]["error"]
        assert str(state.tmp.name) not in r["dicom"]["error"]
    finally:
        state.tmp.cleanup()
    js = (Path(app.WEB) / "app.js").read_text(encoding="utf-8")
    assert "r.dicom.seg_file" in js and "DICOM SEG" in js and "DICOM SR" in js
