"""Model cards: checkpoints/<model>.md, generated from the checkpoint's metadata and its evaluate.py summaries.

    python reproduce.py all --stages card                  # rewrite the card of every shipped model
    python reproduce.py busi_unet_resnet18 --stages card   # one card

The sections are those of Hugging Face model cards (model details, intended use, out-of-scope use, training data,
evaluation with intervals, subgroups and calibration, known failure modes, how to reproduce). Every figure is
read from a summary.json that evaluate.py wrote (the evaluations listed for the model in reproduce.MODELS), so
a card cannot drift from its numbers: tests/test_reproduce.py regenerates each card and compares.
"""
from __future__ import annotations

import json
from pathlib import Path

REPO = Path(__file__).resolve().parent

# The data sets this project trains on: citation and licence (one place; ../shared/data/README.md has the details).
DATA_SOURCES = {
    "BUSI": ("Breast Ultrasound Images (Egypt; 780 images, normal / benign / malignant)",
             "Al-Dhabyani W., Gomaa M., Khaled H., Fahmy A., \"Dataset of breast ultrasound images\", Data in Brief 28, "
             "2020, doi 10.1016/j.dib.2019.104863", "CC0 (public domain)"),
    "BUS-UCLM": ("Universidad de Castilla-La Mancha (Spain; 683 images of 38 patients, 61% normal)",
                 "Vallez et al., 2025, Mendeley Data, dataset 7fvgj4jsp7",
                 "CC BY 4.0 (an earlier version: CC BY-NC 4.0); pixels never redistributed"),
    "BUS-BRA": ("BUS-BRA (Brazil; 1875 images of 1064 patients, four scanners, no normal scans)",
                "Gomez-Flores W., Gregorio-Calas M. J., Coelho de Albuquerque Pereira W., \"BUS-BRA: A Breast "
                "Ultrasound Dataset for Assessing Computer-aided Diagnosis Systems\", Medical Physics 51(4), 2024, "
                "doi 10.1002/mp.16812", "MIT-style (copyright notice kept, article cited)"),
}
FIGURES = (("lesion_dice", "lesion Dice", "f"), ("lesion_iou", "lesion IoU", "f"), ("miss_rate", "complete misses", "%"),
           ("normal_fp_share", "normal scans given a lesion", "%"), ("auc", "malignancy AUC", "f"))


def sources_of(train_config: dict) -> list[str]:
    """The DATA_SOURCES a run trained on, from its data_dir / manifest / sources paths."""
    from dataset import parse_sources
    paths = [p for _, p in parse_sources(train_config.get("sources") or "")] if train_config.get("sources") else []
    paths += [str(train_config.get(k) or "") for k in ("data_dir", "manifest", "path_to_images")]
    found = []
    for p in (p.upper() for p in paths if p):
        name = "BUS-UCLM" if "BUS-UCLM" in p else "BUS-BRA" if "BUS-BRA" in p else "BUSI" if "BUSI" in p else None
        if name and name not in found:
            found.append(name)
    return found


def _v(v, kind: str) -> str:
    if v is None or v != v:
        return "n/a"
    return f"{100 * v:.0f}%" if kind == "%" else f"{v:.3f}"


def _with_ci(summary: dict, key: str, kind: str) -> str:
    v = summary["figures"].get(key)
    iv = summary.get("intervals", {}).get(key)
    if iv and iv[0] == iv[0] and iv[1] == iv[1]:
        return f"{_v(v, kind)} ({_v(iv[0], kind)}-{_v(iv[1], kind)})"
    return _v(v, kind)


def evaluation_rows(evals: list[tuple[str, str, dict]]) -> list[str]:
    """The evaluation table: one row per (name, what, summary)."""
    head = ["evaluated on", "images (lesion / normal)", *[n for _, n, _ in FIGURES], "label accuracy",
            "ECE (reliability plot)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, what, s in evals:
        f = s["figures"]
        lines.append("| " + " | ".join([f"{what} (`{name}`)", f"{f['n_lesion']} / {f['n_normal']}",
                                        *[_with_ci(s, k, kind) for k, _, kind in FIGURES],
                                        _v(s["classification"]["accuracy"], "f"),
                                        f"{_v(f.get('ece'), 'f')} ([plot]({name}/reliability.png))"]) + " |")
    return lines


def subgroup_rows(evals: list[tuple[str, str, dict]]) -> list[str]:
    rows = [(what, r) for _, what, s in evals for r in s.get("subgroups", [])]
    if not rows:
        return ["No subgroup columns in these evaluations."]
    lines = ["| evaluated on | subgroup | images (lesion / normal) | " + " | ".join(n for _, n, _ in FIGURES) + " |",
             "|---|---|---|" + "---|" * len(FIGURES)]
    for what, r in rows:
        lines.append(f"| {what} | {r['column']} = {r['value']} | {r['n_lesion']} / {r['n_normal']} | "
                     + " | ".join(_v(r.get(k), kind) for k, _, kind in FIGURES) + " |")
    return lines


def failure_lines(evals: list[tuple[str, str, dict]]) -> list[str]:
    out = []
    for name, what, s in evals:
        f = s["figures"]
        n_miss = round(f["miss_rate"] * f["n_lesion"]) if f["miss_rate"] == f["miss_rate"] else None
        n_fp = round(f["normal_fp_share"] * f["n_normal"]) if f["n_normal"] else None
        parts = [f"no part of the lesion found in {n_miss} of {f['n_lesion']} lesion images ({_v(f['miss_rate'], '%')})"
                 if n_miss is not None else "",
                 f"a lesion drawn on {n_fp} of {f['n_normal']} normal scans ({_v(f['normal_fp_share'], '%')})"
                 if n_fp is not None else "no normal scans to measure false positives on",
                 f"the normal gate erased the mask of {f['gate_cleared_lesion']} lesion image(s)"
                 if "gate_cleared_lesion" in f else ""]
        out.append(f"- {what}: " + "; ".join(p for p in parts if p) + ".")
    return out


def render(name: str, meta: dict, spec, evals: list[tuple[str, str, dict]], size_mb: float,
           loso: dict | None = None) -> str:
    """The card's Markdown. spec: the reproduce.Model of this file."""
    tc = meta.get("train_config", {})
    recipe = meta.get("recipe", {}) or {}
    srcs = sources_of(tc)
    head = f"a classification head ({', '.join(meta['head'])})" if meta.get("head") else "no classification head"
    post = (f"threshold {meta.get('threshold')}, minimum lesion {meta.get('min_area') or 0:g} px at the input size"
            + ((f", normal gate {meta['normal_gate']}" if meta.get("normal_gate", 1.0) < 1.0
                else ", no normal gate (the head's P(normal) never clears a mask)") if meta.get("head") else "")
            + (f" (never erasing a mask of mean probability >= {meta['gate_keep']})" if meta.get("gate_keep", 1) < 1
               else "")
            + (f", review cut-off of the uncertainty {meta['uncertainty_cutoff']}" if meta.get("uncertainty_cutoff")
               is not None else ""))
    L = [f"# Model card: {name}", "",
         "_Generated by `python model_card.py` from the checkpoint's metadata and the evaluate.py summaries listed "
         "below; do not edit by hand._", "",
         "## Model details", "",
         f"- {spec.summary}",
         f"- File: `checkpoints/{name}.safetensors` ({size_mb:.0f} MB, {meta.get('storage', 'fp32')} weights, "
         f"safetensors: no pickle).",
         f"- Network: UNet, encoder {meta['encoder']} "
         f"({'ImageNet weights' if tc.get('encoder_weights') == 'imagenet' else 'no pretrained weights' if not tc.get('encoder_weights') else tc.get('encoder_weights')}"
         f"), {meta['classes']} lesion channels ({', '.join(meta.get('lesion_classes', ['benign', 'malignant']))}), "
         f"{head}.",
         f"- Input: one grey channel, {meta['image_size']}x{meta['image_size']}, scaled to [0,1] then normalized with "
         f"mean {meta['norm_mean']} and std {meta['norm_std']} (stored in the file; predict.py reads them).",
         f"- Post-processing stored in the file: {post}.",
         f"- Recipe: {', '.join(f'`{r}`' for r in spec.recipes)} "
         f"(trained {meta.get('epoch')} epochs; loss {tc.get('loss')}, {tc.get('optimizer')} lr {tc.get('lr')}, "
         f"augmentation {tc.get('augment')}).",
         f"- Code: git commit {recipe.get('git_commit') or 'not recorded (trained before recipes were stored)'}.", "",
         "## Intended use", "",
         "A research tool: outlining breast lesions in B-mode ultrasound images and giving a benign / malignant "
         "probability, for medical-imaging researchers who check its output. The outline, the sizes and the "
         "shape words are descriptors computed from a model's mask.", "",
         "## Out-of-scope use", "",
         "- Not a diagnosis, not a BI-RADS category, not a medical device; not for deciding any patient's care.",
         "- Not for scanners, probe types or hospitals it has not been shown to hold up on: every user's scanner is "
         "one it has not seen. Measure it on your own images first (`evaluate.py --manifest yours.csv`); the "
         "held-out figures below are the best guide to what to expect.",
         "- Not for colour-Doppler frames, elastography or images with burnt-in calipers without checking "
         "(subgroups below).", "",
         "## Training data", ""]
    for s in srcs:
        what, cite, lic = DATA_SOURCES[s]
        L.append(f"- **{s}**: {what}. {cite}. Licence: {lic}.")
    L += [f"- Split: `{meta.get('split_file')}` (training / validation images; split by patient where known, "
          "near-duplicate scans kept on one side).", "",
          "## Evaluation", "",
          "Every figure at each image's original resolution (evaluate.py); 95% intervals: bootstrap over patients "
          "where the data has patient ids, else over images. Lesion Dice / IoU: images with a lesion; complete "
          "miss: nothing predicted touches the lesion; AUC: benign vs malignant on lesion images; ECE: expected "
          "calibration error of the malignancy (10 bins; its reliability plot is linked).", "",
          *evaluation_rows(evals), ""]
    if loso:
        L += ["### Leave-one-source-out (what to expect on a scanner it has not seen)", "", loso["table"], ""]
    L += ["### Subgroups", "", *subgroup_rows(evals), "",
          "## Known failure modes", "", *failure_lines(evals),
          "- Figures on a source the model trained on (its validation images) are in-domain and higher than what "
          "a new scanner gives.", "",
          "## How to reproduce", "",
          f"    make reproduce MODEL={name}", "",
          "trains " + " then ".join(f"`{r}`" for r in spec.recipes) + ", ships the "
          f"{spec.weights} epoch's weights as fp16, "
          + ("chooses threshold, minimum area and gate on the validation images, " if spec.tune else "")
          + ("chooses the uncertainty review cut-off there, " if spec.uncertainty else "")
          + "runs the evaluations above and writes this card (reproduce.py). The data must be at data/BUSI, "
            "data/BUS-UCLM, data/BUS-BRA (a link to them will do).", ""]
    return "\n".join(L)


def card_text(name: str, spec) -> str:
    """The card of a shipped model (spec: its reproduce.Model), from its file and its evaluations' summaries."""
    import model
    path = REPO / spec.file
    meta = model.read_checkpoint_meta(path)
    evals = [(d, what, json.loads((path.parent / d / "summary.json").read_text(encoding="utf-8")))
             for d, (what, _) in spec.evals.items()]
    loso = None
    if spec.loso_table and (REPO / spec.loso_table).exists():
        loso = {"table": (REPO / spec.loso_table).read_text(encoding="utf-8").strip()}
    return render(name, meta, spec, evals, path.stat().st_size / 1e6, loso)


def write_card(name: str, spec) -> Path:
    out = (REPO / spec.file).with_suffix(".md")
    out.write_text(card_text(name, spec), encoding="utf-8")
    return out
