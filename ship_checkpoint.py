"""Turn a training run's checkpoint into the file shipped in checkpoints/: fp16 weights, its split beside it.

    python ship_checkpoint.py --src runs/busi_r18_256/best.safetensors \
        --out checkpoints/busi_unet_resnet18.safetensors --split checkpoints/busi_split.json

The metadata keeps everything train.py stored (settings, epoch, metrics) and points split_file at the copied
split, so `python evaluate.py` on the shipped file finds its validation images. fp16 halves the file; the
metrics must be measured again on the converted file (evaluate.py), which is what the README reports.

A shipped file can be shipped onto itself to add a setting chosen on the validation split, e.g. the review cut-off
of predict.py --uncertainty (printed by evaluate.py --uncertainty):

    python ship_checkpoint.py --src checkpoints/busi_unet_resnet18.safetensors \
        --out checkpoints/busi_unet_resnet18.safetensors --split checkpoints/busi_split.json --uncertainty_cutoff 0.12
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from model import load_checkpoint, save_checkpoint


def ship(src: str, out: str, split: str, half: bool = True, threshold: float | None = None,
         min_area: float | None = None, normal_gate: float | None = None,
         uncertainty_cutoff: float | None = None, gate_keep: float | None = None, recipe: dict | None = None) -> dict:
    """Write src as the shipped file out (fp16 unless half=False), its split copied to split; threshold,
    min_area and normal_gate, if given (chosen together on the validation split with evaluate.py
    --tune_threshold), replace the stored ones; uncertainty_cutoff (chosen on the validation split with
    evaluate.py --uncertainty) is stored with the uncertainty method it belongs to; recipe (file, text, git_commit:
    train.recipe_provenance) replaces the stored one, for files trained before recipes were stored."""
    if threshold is not None and not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie between 0 and 1, got {threshold}")
    if min_area is not None and not min_area >= 0:
        raise ValueError(f"min_area must be >= 0, got {min_area}")
    if normal_gate is not None and not 0.0 < normal_gate <= 1.0:
        raise ValueError(f"normal_gate must lie in (0, 1], got {normal_gate}")
    if uncertainty_cutoff is not None and not 0.0 <= uncertainty_cutoff <= 1.0:
        raise ValueError(f"uncertainty_cutoff must lie in [0, 1], got {uncertainty_cutoff}")
    model, meta = load_checkpoint(src)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if Path(meta["split_file"]).resolve() != Path(split).resolve():
        shutil.copyfile(meta["split_file"], split)
    in_place = Path(src).resolve() == Path(out).resolve()  # e.g. only a cut-off added: keep where it came from
    meta = {**meta, "split_file": split, "shipped_from": meta.get("shipped_from", str(src)) if in_place else str(src),
            "storage": "fp16" if half else "fp32"}
    if threshold is not None:
        meta["threshold"] = float(threshold)
    if min_area is not None:
        meta["min_area"] = float(min_area)
    if normal_gate is not None:
        if not meta.get("head"):
            raise ValueError(f"{src}: normal_gate needs a model with a classification head")
        meta["normal_gate"] = float(normal_gate)
    if gate_keep is not None:
        if not 0.0 < gate_keep <= 1.0:
            raise ValueError(f"gate_keep must lie in (0, 1], got {gate_keep}")
        meta["gate_keep"] = float(gate_keep)
    if recipe is not None:
        meta["recipe"] = recipe
    if uncertainty_cutoff is not None:
        from uncertainty import METHOD
        meta.update(uncertainty_cutoff=float(uncertainty_cutoff), uncertainty_method=METHOD)
    save_checkpoint(out, model, meta, half=half)
    return meta


def tune_and_ship(src: str, out: str, split: str, recall_floor: float = 0.02, tune_gate: bool = True) -> dict:
    """Choose threshold, min_area and (with a head, unless tune_gate is False: then no gate) the normal gate on
    src's validation images (evaluate.tune: highest all-image Dice (b), at most recall_floor of the lesion images
    erased), and ship src as out (fp16) with them; returns the chosen setting. reproduce.py and loso.py call this,
    so no value is copied by hand."""
    import evaluate
    from cli import settings_with
    from predict import load_predictor, pick_device
    predictor, meta = load_predictor(src, pick_device("auto"))
    ecfg = settings_with(evaluate.__file__, checkpoint=src, split="val", recall_floor=recall_floor, tune_gate=tune_gate)
    data, info = evaluate.load_eval_set(ecfg, meta)
    _, setting = evaluate.tune(ecfg, predictor, data, info)
    kwargs = {"threshold": setting["threshold"], "min_area": setting["min_area"]}
    if meta.get("head"):
        kwargs.update(normal_gate=setting["normal_gate"], gate_keep=setting["gate_keep"])
    ship(src, out, split, **kwargs)
    return setting


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", required=True, help="checkpoint of a training run")
    ap.add_argument("--out", default="checkpoints/busi_unet_resnet18.safetensors", help="shipped file")
    ap.add_argument("--split", default="checkpoints/busi_split.json", help="where the run's split is copied")
    ap.add_argument("--fp32", action="store_true", help="keep fp32 weights")
    ap.add_argument("--threshold", type=float, default=None,
                    help="lesion threshold to store (chosen on the validation split: evaluate.py --tune_threshold)")
    ap.add_argument("--min_area", type=float, default=None,
                    help="smallest lesion component kept, pixels of the network input (evaluate.py --tune_threshold)")
    ap.add_argument("--normal_gate", type=float, default=None,
                    help="models with a head: clear the mask when P(normal) >= this (evaluate.py --tune_threshold)")
    ap.add_argument("--gate_keep", type=float, default=None,
                    help="models with a head: the gate never erases a mask this confident (evaluate.py --tune_threshold)")
    ap.add_argument("--uncertainty_cutoff", type=float, default=None,
                    help="predict.py --uncertainty flags an image for review above this score "
                         "(chosen on the validation split: evaluate.py --uncertainty)")
    a = ap.parse_args()
    m = ship(a.src, a.out, a.split, half=not a.fp32, threshold=a.threshold, min_area=a.min_area,
             normal_gate=a.normal_gate, uncertainty_cutoff=a.uncertainty_cutoff, gate_keep=a.gate_keep)
    print(json.dumps({k: m.get(k) for k in ("encoder", "image_size", "epoch", "split_file", "storage", "threshold",
                                            "min_area", "normal_gate", "gate_keep", "uncertainty_cutoff")}))
