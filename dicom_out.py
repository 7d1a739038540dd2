"""DICOM outputs for DICOM inputs: a Segmentation (SEG) of the lesions and a Measurement Report (SR, TID 1500), new
instances of the source's patient and study, so that OHIF, 3D Slicer or a PACS shows them next to the scan.

    header = source_header("scan.dcm")                    # the source's identification and geometry, nothing else
    model = ModelInfo.of("checkpoints/x.safetensors", threshold=0.5)   # file name, SHA-256, threshold
    seg = make_seg(header, frame.index, readout, model)   # highdicom Segmentation: one binary segment per lesion
    sr = make_sr(header, frame.index, seg, readout, model)  # highdicom Comprehensive 3D SR: TID 1500 report
    names = write_dicom_out(frame, readout, header, model, out_dir, stem)  # <stem>_seg.dcm, <stem>_sr.dcm
    labels = seg_labels(pydicom.dcmread(out_dir / names["dicom_seg"]))     # read back: lesion k = k

predict.py --dicom_out writes them for every DICOM frame it predicts, app.py offers them as downloads of a DICOM
upload. Both are built by highdicom's constructors, which refuse content the standard does not allow.

Copied from the source header (source_header), as a viewer needs it to attach new instances to the study: the
patient (name, ID, issuer of the ID, birth date, sex) and study (Study Instance UID, date, time, ID, accession
number, referring physician) identification and the character set; to reference the image: its SOP Class and
Instance UID, Series Instance UID, Modality, Frame of Reference UID, rows, columns, number of frames and lossy-
compression flag. Nothing else (no institution, device, operator, other dates or descriptions). A sex, date or
time that is not a DICOM value ('U', '2024-01-31') is left empty with a warning, never guessed. The CSV, JSON and
PNG outputs of predict.py and the page still carry none of it.

SEG: BINARY, one segment per lesion ("lesion 1", "lesion 2", ... numbered as in the CSV and JSON, the largest first;
a frame without a lesion gets one empty segment "lesion (none found)"), with DICOM's codes for segmentations (CID
7150, 7151/7159, 4): segmented property category SNOMED CT 49755003 "Morphologically Abnormal Structure", type
52988006 "Lesion" (not 4147007 "Mass": BI-RADS calls a finding a mass when it is seen in two planes, which one frame
cannot show), anatomic region 76752008 "Breast". The algorithm identification names BUS-UNet, the checkpoint file,
its SHA-256 as the version, the threshold and the code's git commit; the algorithm type is AUTOMATIC, or
SEMIAUTOMATIC when a drawn box prompted the mask (LiteMedSAM). Its frames are the predicted mask pixel for pixel at
the source's rows and columns. Geometry: an ultrasound frame has no position in patient space (no Image Position /
Orientation (Patient)), so the SEG has none either and is tied to its source frame by reference (Derivation Image
Sequence, Spatial Locations Preserved YES), which is how highdicom makes segmentations of images without a patient
coordinate system (X-ray, ultrasound; the Frame of Reference UID is copied when the source has one). It carries no
Pixel Measures, by the standard (PS3.3 A.51.5, Table A.51-2): they are required only where the SEG has no Derivation
Image functional group and a patient-relative Frame of Reference, and may be present only with such a Frame of
Reference; without one "each pixel of the segmentation shall correspond to a pixel in a referenced image" (A.51.5.1),
so the SEG's pixel spacing is its source's (Pixel Spacing, or the calibrated ultrasound region) by construction, and
the SR gives the sizes in mm. (highdicom 0.28 also refuses to read Pixel Measures without a Slice Thickness, which a
2D frame does not have.)
Multi-frame sources (cine loops): one SEG and one SR per predicted frame, each referencing its frame (Referenced
Frame Number). highdicom makes a SEG of a multi-frame image without a patient coordinate system for a single
frame only (its issue #284), so the SEG is built against a single-frame stand-in of the header and its references
are then pointed at the real SOP class and frame (_point_at_frame).

SR (TID 1500, "Imaging Measurement Report", procedure SNOMED CT 47079000 "Ultrasonography of breast", observer:
the BUS-UNet device): per lesion a Planar ROI group (TID 1410) that references the lesion's segment and frame of
the SEG and shares its tracking UID, with
  long axis (SNOMED CT 103339001) = the longest diameter, perpendicular axis (131189007) = the perpendicular
  diameter, in UCUM mm, and area (42798000) in UCUM mm2, only where the pixel size is known;
  shape (300842002: oval 84360004, round 42700002, irregular 49608001; CID 6005), orientation (DCM 111354:
  parallel 111355, not parallel 111356; CID 6152) and margins (DCM 111037: circumscribed 129738007, not
  circumscribed 99BUSUNET NOTCIRC) as qualitative evaluations;
  the image's probability of cancer (DCM 111047; P(malignant | lesion), no units), the uncertainty score
  (99BUSUNET UNCERTAINTY) and the review flag (99BUSUNET REVIEW: yes / no), where predict.py has them;
  a comment saying that these are descriptors computed by a model, not a diagnosis, and where the pixel size
  came from, or why there are no mm values.
A frame without a lesion gets one image-level group (TID 1501) with the uncertainty and review (no probability
of cancer: it is one given a lesion) and a comment that no lesion was found.
99BUSUNET is this project's private coding scheme (declared in the Coding Scheme Identification Sequence) for what
DICOM has no code for.
This module imports pydicom and highdicom when it is used; predict.py and app.py import it only for DICOM outputs.
"""
from __future__ import annotations

import copy
import hashlib
import io
import logging
import subprocess
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from dicom_io import DicomError

if TYPE_CHECKING:
    from pydicom import Dataset

log = logging.getLogger("dicom_out")


PROJECT = "BUS-UNet"
MANUFACTURER = "BUS-UNet research project (not a medical device)"
LOCAL = "99BUSUNET"          # the private coding scheme for concepts DICOM has no code for
SEG_SERIES_NUMBER = 901      # series numbers of the new series, after a scanner's usual ones
SR_SERIES_NUMBER = 902
STAND_IN_CLASS = "1.2.840.10008.5.1.4.1.1.7"  # Secondary Capture Image Storage: single frame (see _stand_in)
NO_LESION = "lesion (none found)"

# Copied from the source (see the module docstring); Type 2 attributes a source may lack are written empty.
PATIENT_STUDY = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
                 "StudyInstanceUID", "StudyDate", "StudyTime", "StudyID", "AccessionNumber", "ReferringPhysicianName")
SOURCE_IMAGE = ("SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID", "Modality",
                "FrameOfReferenceUID", "PositionReferenceIndicator", "Rows", "Columns", "NumberOfFrames",
                "LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod")
REQUIRED = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID")
TYPE_2 = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime", "StudyID",
          "AccessionNumber", "ReferringPhysicianName")


class Readout(Protocol):
    """What this module reads of predict.Readout (predict.py imports this module, not the other way round)."""
    decision: Any              # predict.Decision: .lesion (bool H x W), .label, .malignancy
    lesions: list[dict]        # measure.measure_lesions of decision.lesion
    uncertainty: float         # NaN without --uncertainty
    review: bool | None
    box: tuple | None          # the box whose LiteMedSAM mask replaced the network's


# ---------------------------------------------------------------------------------------------------------
# The source, the model, the numbering of new instances
# ---------------------------------------------------------------------------------------------------------

def source_header(path: str | Path) -> Dataset:
    """The part of a DICOM file's header that its SEG and SR carry (PATIENT_STUDY, SOURCE_IMAGE), as a new data
    set; DicomError naming the file when it lacks the UIDs that a reference to it needs."""
    import pydicom
    path = Path(path)
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad file
        raise DicomError(f"{path}: cannot read the DICOM header ({type(e).__name__}: {e})") from None
    missing = [k for k in REQUIRED if not str(ds.get(k, "") or "").strip()]
    if missing:
        raise DicomError(f"{path}: no DICOM SEG/SR can reference this file: its header lacks {', '.join(missing)} "
                         f"(an anonymiser may have removed them)")
    out = pydicom.Dataset()
    for key in PATIENT_STUDY + SOURCE_IMAGE:
        if key in ds:
            out[key] = copy.deepcopy(ds[key])
    for key in TYPE_2:
        if key not in out:
            setattr(out, key, "")
    if not out.get("Modality"):
        out.Modality = "OT"
    _blank_invalid(out, path)
    return out


def _blank_invalid(header: Dataset, path: Path) -> None:
    """Sex, dates and times that are not DICOM values (scanners write 'U', '2024-01-31', '12:30') would make
    highdicom refuse the file: they are left empty (Type 2: unknown) with a warning, never guessed."""
    from pydicom.valuerep import DA, TM
    sex = str(header.PatientSex or "").strip().upper()
    header.PatientSex = sex if sex in ("", "M", "F", "O") else ""
    bad = [] if sex in ("", "M", "F", "O") else ["PatientSex"]
    for key, kind in (("PatientBirthDate", DA), ("StudyDate", DA), ("StudyTime", TM)):
        try:
            kind(str(header.get(key) or "").strip() or None)
        except ValueError:
            setattr(header, key, "")
            bad.append(key)
    if bad:
        log.warning("%s: %s not valid DICOM: left empty in its SEG and SR", path, ", ".join(bad))


def n_frames(header: Dataset) -> int:
    return int(header.get("NumberOfFrames", 1) or 1)


@lru_cache(maxsize=16)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@lru_cache(maxsize=1)
def code_version() -> str:
    """'git <commit>' of this code, or 'unknown' outside a git checkout."""
    try:
        r = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=Path(__file__).resolve().parent,
                           capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"git {r.stdout.strip()}" if r.returncode == 0 and r.stdout.strip() else "unknown"


@dataclass(frozen=True)
class ModelInfo:
    """What the SEG and SR say about the model: its file, a version that names its content, the threshold."""
    file: str         # the checkpoint's file name
    version: str      # 'sha256:' and the first 16 hex digits of the file's SHA-256
    threshold: float

    @classmethod
    def of(cls, checkpoint: str | Path, threshold: float) -> ModelInfo:
        p = Path(checkpoint).resolve()
        st = p.stat()
        return cls(p.name, "sha256:" + _sha256(str(p), st.st_size, st.st_mtime_ns)[:16], float(threshold))

    def parameters(self, mask: str) -> dict[str, str]:
        """The algorithm parameters: model file, threshold, code version and the mask's source (predict.mask_source:
        'network' or the box of a LiteMedSAM prompt)."""
        return {"model_file": self.file, "threshold": f"{self.threshold:g}", "code": code_version(), "mask": mask}


class Numbering:
    """Series and instance numbers of the SEG and SR objects of one run: one SEG and one SR series per source
    series (the frames of a cine loop become instances 1, 2, ... of the same series)."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str], tuple[str, int]] = {}

    def next(self, header: Dataset, kind: str) -> tuple[str, int]:
        """(series instance UID, instance number) of the next `kind` ('seg' or 'sr') object for this source."""
        from highdicom import UID
        key = (str(header.SeriesInstanceUID), kind)
        uid, n = self._series.get(key, (str(UID()), 0))
        self._series[key] = (uid, n + 1)
        return uid, n + 1


# ---------------------------------------------------------------------------------------------------------
# SEG
# ---------------------------------------------------------------------------------------------------------

def _codes():
    from pydicom.sr.codedict import codes
    return codes


def _stand_in(header: Dataset, frame: int | None) -> tuple[Dataset, int | None]:
    """(the header highdicom builds the SEG against, the 1-based source frame to reference or None).
    A file with Number of Frames (a multi-frame SOP class, or frames in a single-frame class) is shown to
    highdicom as a single-frame Secondary Capture image without that attribute; _point_at_frame then makes every
    reference name the real SOP class and frame."""
    if "NumberOfFrames" not in header:
        return header, None
    stand_in = copy.deepcopy(header)
    del stand_in.NumberOfFrames
    stand_in.SOPClassUID = STAND_IN_CLASS
    return stand_in, (frame or 0) + 1


def _point_at_frame(seg: Dataset, header: Dataset, number: int) -> None:
    """Every reference of the SEG to its source: the real SOP class, and the frame (where the standard has one)."""
    uid = header.SOPInstanceUID
    framed = list(seg.get("SourceImageSequence", []))
    for group in seg.get("PerFrameFunctionalGroupsSequence", []):
        for derivation in group.get("DerivationImageSequence", []):
            framed += list(derivation.get("SourceImageSequence", []))
    for item in framed:
        if item.ReferencedSOPInstanceUID == uid:
            item.ReferencedSOPClassUID = header.SOPClassUID
            item.ReferencedFrameNumber = number
    for series in seg.get("ReferencedSeriesSequence", []):
        for item in series.get("ReferencedInstanceSequence", []):
            if item.ReferencedSOPInstanceUID == uid:
                item.ReferencedSOPClassUID = header.SOPClassUID


def make_seg(header: Dataset, frame: int | None, ro: Readout, model: ModelInfo, mask: str = "network",
             series: tuple[str, int] | None = None) -> Dataset:
    """The SEG of one predicted frame (frame: its 0-based index in a multi-frame file, None for a single image):
    a highdicom Segmentation with one segment per lesion of ro.lesions. mask: where the mask came from
    (predict.mask_source). series: (series UID, instance number), default a new series."""
    import highdicom as hd

    from measure import lesion_labels
    codes = _codes()
    labels = lesion_labels(ro.decision.lesion)
    if int(labels.max()) != len(ro.lesions):
        raise ValueError(f"the mask has {labels.max()} lesions, the read-out {len(ro.lesions)}")
    if (int(header.Rows), int(header.Columns)) != labels.shape:
        raise DicomError(f"the mask is {labels.shape[1]}x{labels.shape[0]}, the DICOM frame "
                         f"{header.Columns}x{header.Rows}")
    algorithm = hd.AlgorithmIdentificationSequence(
        name=PROJECT, family=codes.cid7162.ArtificialIntelligence, version=model.version,
        source=MANUFACTURER, parameters=model.parameters(mask))
    kind = hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC if ro.box is None else \
        hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC
    names = [f"lesion {k}" for k in range(1, len(ro.lesions) + 1)] or [NO_LESION]
    segments = [hd.seg.SegmentDescription(
        segment_number=k, segment_label=name, segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Lesion, algorithm_type=kind, algorithm_identification=algorithm,
        tracking_id=name, tracking_uid=hd.UID(), anatomic_regions=[codes.SCT.Breast])
        for k, name in enumerate(names, start=1)]
    stand_in, number = _stand_in(header, frame)
    series_uid, instance = series or (str(hd.UID()), 1)
    seg = hd.seg.Segmentation(
        source_images=[stand_in], pixel_array=labels.astype(np.uint16 if labels.max() > 255 else np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=segments,
        series_instance_uid=series_uid, series_number=SEG_SERIES_NUMBER, sop_instance_uid=hd.UID(),
        instance_number=instance, manufacturer=MANUFACTURER, manufacturer_model_name=PROJECT,
        software_versions=code_version(), device_serial_number="none (software)",
        omit_empty_frames=False,  # a frame per segment, also the empty one of a frame without a lesion
        content_label="LESIONS", content_description="BUS-UNet lesion mask: model output, not a diagnosis",
        series_description="BUS-UNet lesions (model output, not a diagnosis)")
    if number is not None:
        _point_at_frame(seg, header, number)
    return seg


def segment_frames(seg: Dataset, segment: int) -> list[int]:
    """The 1-based SEG frames that hold a segment (its number is per frame, or shared when there is one)."""
    shared = seg.SharedFunctionalGroupsSequence[0].get("SegmentIdentificationSequence")
    if shared:
        return list(range(1, int(seg.NumberOfFrames) + 1)) if int(shared[0].ReferencedSegmentNumber) == segment else []
    return [i for i, group in enumerate(seg.PerFrameFunctionalGroupsSequence, start=1)
            if int(group.SegmentIdentificationSequence[0].ReferencedSegmentNumber) == segment]


def seg_labels(seg: Dataset) -> np.ndarray:
    """A SEG of make_seg read back with highdicom: its lesions at the source frame's size as a label image (lesion
    k = k, 0 outside), the way measure.lesion_labels numbers them."""
    import highdicom as hd
    seg = hd.seg.Segmentation.from_dataset(seg)
    source = seg.SourceImageSequence[0]
    if "ReferencedFrameNumber" in source:
        labels = seg.get_pixels_by_source_frame(source.ReferencedSOPInstanceUID, [int(source.ReferencedFrameNumber)],
                                                combine_segments=True)
    else:
        labels = seg.get_pixels_by_source_instance([source.ReferencedSOPInstanceUID], combine_segments=True)
    return np.asarray(labels[0])


# ---------------------------------------------------------------------------------------------------------
# SR
# ---------------------------------------------------------------------------------------------------------

def _local(value: str, meaning: str):
    from highdicom.sr import CodedConcept
    return CodedConcept(value=value, scheme_designator=LOCAL, meaning=meaning)


def _comment(group, text: str) -> None:
    """A TEXT "Comment" (DCM 121106) in a measurement group (the templates are extensible)."""
    import highdicom as hd
    group[0].ContentSequence.append(hd.sr.TextContentItem(
        name=_codes().DCM.Comment, value=text, relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))


def _image_values(ro: Readout) -> tuple[list, list]:
    """(measurements, qualitative evaluations) of the whole image: probability of cancer, uncertainty, review."""
    import highdicom as hd
    codes = _codes()
    measurements, evaluations = [], []
    d = ro.decision
    if d.malignancy == d.malignancy and d.label != "normal":  # NaN: not known; no lesion: no probability given one
        measurements.append(hd.sr.Measurement(name=codes.DCM.ProbabilityOfCancer, value=round(d.malignancy, 4),
                                              unit=codes.UCUM.NoUnits))
    if ro.uncertainty == ro.uncertainty:
        measurements.append(hd.sr.Measurement(
            name=_local("UNCERTAINTY", "Segmentation uncertainty, 1 - mean Dice of test-time views"),
            value=round(ro.uncertainty, 4), unit=codes.UCUM.NoUnits))
    if ro.review is not None:
        evaluations.append(hd.sr.QualitativeEvaluation(_local("REVIEW", "Review recommended"),
                                                       codes.SCT.Yes if ro.review else codes.SCT.No))
    return measurements, evaluations


def _lesion_values(lesion: dict) -> tuple[list, list]:
    """(measurements in mm where known, shape / orientation / margin words) of one lesion dict of measure.py."""
    import highdicom as hd

    from measure import TOO_SMALL
    codes = _codes()
    measurements = []
    if lesion["long_diameter"]["mm"] is not None:
        for name, value, unit in ((codes.SCT.LongAxis, lesion["long_diameter"]["mm"], codes.UCUM.Millimeter),
                                  (codes.SCT.PerpendicularAxis, lesion["perpendicular_diameter"]["mm"],
                                   codes.UCUM.Millimeter),
                                  (codes.SCT.Area, lesion["area"]["mm2"], codes.UCUM.SquareMillimeter)):
            measurements.append(hd.sr.Measurement(name=name, value=float(value), unit=unit))
    words = {"shape": (codes.SCT.Shape, {"oval": codes.SCT.OvoidShapeOval, "round": codes.SCT.RoundShape,
                                         "irregular": codes.SCT.Irregular}),
             "orientation": (codes.DCM.Orientation, {"parallel": codes.DCM.Parallel,
                                                     "not parallel": codes.DCM.NotParallel}),
             "margin": (codes.DCM.Margins, {"circumscribed": codes.SCT.CircumscribedLesion,
                                            "not circumscribed": _local("NOTCIRC", "Not circumscribed")})}
    evaluations = [hd.sr.QualitativeEvaluation(name, values[lesion[key]["term"]])
                   for key, (name, values) in words.items() if lesion[key]["term"] != TOO_SMALL]
    return measurements, evaluations


def _size_note(lesion: dict) -> str:
    size = lesion["pixel_size"]
    if size is None:
        return ("No sizes in mm: the pixel size is unknown (the DICOM header gives no Pixel Spacing and no ultrasound "
                "region calibrated in cm, and no pixel_mm setting was given).")
    return (f"Sizes in mm from a pixel of {size['row_mm']:g} x {size['col_mm']:g} mm (rows x columns), "
            f"source: {size['source']}.")


def make_sr(header: Dataset, frame: int | None, seg: Dataset, ro: Readout, model: ModelInfo, mask: str = "network",
            series: tuple[str, int] | None = None) -> Dataset:
    """The Measurement Report (TID 1500) of one predicted frame whose SEG is `seg` (make_seg): a highdicom
    Comprehensive3DSR. mask and series as make_seg's."""
    import highdicom as hd
    from highdicom.coding_schemes import CodingSchemeIdentificationItem
    from pydicom.uid import generate_uid

    from measure import NOTE
    codes = _codes()
    _, number = _stand_in(header, frame)
    frames = None if number is None else [number]
    algorithm = hd.sr.AlgorithmIdentification(
        name=PROJECT, version=model.version,
        parameters=[f"{k}={v}" for k, v in model.parameters(mask).items()])
    note = f"Computed by {PROJECT} ({model.file}) from its predicted mask: {NOTE}."
    image_note = ("Probability of cancer (P(malignant | lesion)), uncertainty and review are the model's for the "
                  "whole image.")
    image_measurements, image_evaluations = _image_values(ro)
    groups = []
    for lesion in ro.lesions:
        k = lesion["lesion"]
        reference = hd.sr.ReferencedSegmentationFrame(
            sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID,
            frame_number=segment_frames(seg, k), segment_number=k,
            source_image=hd.sr.SourceImageForSegmentation(header.SOPClassUID, header.SOPInstanceUID, frames))
        measurements, evaluations = _lesion_values(lesion)
        group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=seg.SegmentSequence[k - 1].TrackingUID,
                                                         identifier=f"lesion {k}"),
            referenced_segment=reference, finding_type=codes.SCT.Lesion,
            finding_category=codes.SCT.MorphologicallyAbnormalStructure,
            finding_sites=[hd.sr.FindingSite(codes.SCT.Breast)], algorithm_id=algorithm,
            measurements=measurements + image_measurements, qualitative_evaluations=evaluations + image_evaluations)
        _comment(group, f"{note} {_size_note(lesion)} {image_note}")
        groups.append(group)
    if not groups:
        group = hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(), identifier="image"), algorithm_id=algorithm,
            measurements=image_measurements or None, qualitative_evaluations=image_evaluations or None,
            source_images=[hd.sr.SourceImageForMeasurementGroup(header.SOPClassUID, header.SOPInstanceUID, frames)])
        _comment(group, f"No lesion found by {PROJECT} ({model.file}) in this frame (label {ro.decision.label}). "
                        f"{note} {image_note}")
        groups.append(group)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=generate_uid(entropy_srcs=[PROJECT, model.version]), name=PROJECT, manufacturer_name=MANUFACTURER,
        model_name=model.file)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
            observer_type=codes.DCM.Device, observer_identifying_attributes=device)),
        procedure_reported=codes.SCT.UltrasonographyOfBreast, imaging_measurements=groups)
    series_uid, instance = series or (str(hd.UID()), 1)
    return hd.sr.Comprehensive3DSR(
        evidence=[seg, header], content=report[0], series_instance_uid=series_uid, series_number=SR_SERIES_NUMBER,
        sop_instance_uid=hd.UID(), instance_number=instance, manufacturer=MANUFACTURER,
        series_description="BUS-UNet measurements (model output, not a diagnosis)",
        coding_schemes=[CodingSchemeIdentificationItem(
            designator=LOCAL, name="BUS-UNet local codes", responsible_organization=MANUFACTURER)])


# ---------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------

def dicom_objects(header: Dataset, frame: int | None, ro: Readout, model: ModelInfo, mask: str = "network",
                  numbering: Numbering | None = None) -> tuple[Dataset, Dataset]:
    """(SEG, SR) of one predicted frame (make_seg, make_sr); content that highdicom refuses is a DicomError."""
    numbering = numbering or Numbering()
    try:
        seg = make_seg(header, frame, ro, model, mask, numbering.next(header, "seg"))
        sr = make_sr(header, frame, seg, ro, model, mask, numbering.next(header, "sr"))
    except (ValueError, TypeError, AttributeError) as e:
        if isinstance(e, DicomError):
            raise
        raise DicomError(f"cannot write a DICOM SEG/SR for this file ({type(e).__name__}: {e})") from None
    return seg, sr


def to_bytes(ds: Dataset) -> bytes:
    """A data set as a DICOM file (preamble and file meta information)."""
    from pydicom import dcmwrite
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


def write_dicom_out(fr: Any, ro: Readout, header: Dataset, model: ModelInfo, out: Path, stem: str,
                    mask: str = "network", numbering: Numbering | None = None) -> dict[str, str]:
    """<stem>_seg.dcm and <stem>_sr.dcm of one predict.Frame (fr: .path, .index) into out; returns their names
    (dicom_seg, dicom_sr)."""
    try:
        seg, sr = dicom_objects(header, fr.index, ro, model, mask, numbering)
    except DicomError as e:
        raise DicomError(f"{fr.path}: {e}") from None
    names = {"dicom_seg": f"{stem}_seg.dcm", "dicom_sr": f"{stem}_sr.dcm"}
    for ds, key in ((seg, "dicom_seg"), (sr, "dicom_sr")):
        (Path(out) / names[key]).write_bytes(to_bytes(ds))
    return names
