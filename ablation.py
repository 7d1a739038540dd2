"""The ablation table: each arm of configs/ablation/ on the same LOSO folds, at the same short budget and seed.

    python ablation.py                                   # every arm, in the listed order; finished folds skipped
    python ablation.py --arms base,head01 --holdout bus-uclm

Every arm is a recipe that builds on configs/ablation/base.py and changes one thing. Each arm runs loso.py's
folds (BUS-UCLM left out and BUS-BRA left out by default) into runs/ablation/<arm>/, resumable; the table
(runs/ablation/ablation.md and .json, copied to checkpoints/ablation.md with each fold's record in
checkpoints/ablation/<arm>/<fold>.json) lists per arm the held-out lesion
Dice of each fold and their mean (the recipe is chosen by that mean, never by one set), complete misses,
normal scans given a lesion, malignancy AUC, and the arm's cost in minutes (training + evaluation).
"""
from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

log = logging.getLogger("ablation")

# ---- settings (edit here, or override on the command line: --arms base,head01)
arms = "base,head01,head03,smp_dice,aug_none,balance,size160,one_channel,mobilenetv2,resnet18_scratch,lite2,aug_recipe,bce_only,seed2,size192,size256,combo160,lite2_160,size160_seed7,size160_head01,aug_recipe_seed7,size160_aug_recipe,size160_aug_head01"  # recipes in configs/ablation/, run in this order
holdout = "bus-uclm,bus-bra"        # the LOSO folds of every arm
out_dir = "runs/ablation"           # <out_dir>/<arm>/<fold>/, the table ablation.md / ablation.json
split_dir = "runs/loso/splits"      # the folds' splits, shared with loso.py
stages = "train,tune,eval"          # loso.py's stages
copy_table = "checkpoints/ablation.md"  # the table is also copied here (committed); empty: no copy
# ---- end of settings

CONFIG_DIR = Path(__file__).resolve().parent / "configs" / "ablation"


def arm_rows(out: Path, names: list[str], folds: list[str]) -> list[dict]:
    """One row per arm with at least one finished fold: its figures per fold and the means."""
    rows = []
    for name in names:
        found = {f: json.loads((out / name / f / "fold.json").read_text()) for f in folds
                 if (out / name / f / "fold.json").exists()}
        if not found:
            continue
        doc = (CONFIG_DIR / f"{name}.py").read_text(encoding="utf-8").split('"""')
        row = {"arm": name, "what": doc[1].replace("Ablation arm: ", "").split("\n")[0] if len(doc) > 2 else "",
               "folds": {f: {k: r[k] for k in ("lesion_dice", "lesion_iou", "miss_rate", "normal_fp_share", "auc",
                                               "gate_cleared_lesion", "n_lesion")} for f, r in found.items()},
               "minutes": round(sum(r["train_minutes"] + r["eval_minutes"] for r in found.values()), 1),
               "complete": len(found) == len(folds)}
        rows.append(_with_means(row))
        if any(r.get("no_gate") for r in found.values()):  # the same model with its normal gate switched off
            # a fold whose tuning chose no gate (normal_gate 1.0) is its own gate-off figure
            off = {f: {**(r.get("no_gate") or row["folds"][f]), "gate_cleared_lesion": 0, "n_lesion": r["n_lesion"]}
                   for f, r in found.items()}
            rows.append(_with_means({**row, "arm": f"{name}, gate off", "what": "the same model without its normal gate",
                                     "folds": off, "minutes": 0.0}))
    return rows


def _with_means(row: dict) -> dict:
    for k in ("lesion_dice", "miss_rate", "auc"):
        vals = [f[k] for f in row["folds"].values() if f[k] == f[k]]
        row[f"mean_{k}"] = sum(vals) / len(vals) if vals else float("nan")
    return row


def _f(v) -> str:
    return "n/a" if v is None or v != v else f"{v:.3f}"


def _pct(v) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.0f}%"


def format_table(rows: list[dict], folds: list[str]) -> str:
    base = next((r for r in rows if r["arm"] == "base" and r["complete"]), None)
    head = ["arm", "what it changes", *[f"Dice, {f} left out" for f in folds], "mean Dice", "vs base",
            *[f"misses, {f}" for f in folds], "normal scans given a lesion (bus-uclm)",
            "lesion images the gate cleared", "mean AUC", "minutes"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in sorted(rows, key=lambda r: (not r["complete"], -r["mean_lesion_dice"])):
        fr = r["folds"]
        delta = (f"{r['mean_lesion_dice'] - base['mean_lesion_dice']:+.3f}" if base and r["complete"]
                 and r is not base else "")
        fp = fr.get("bus-uclm", {}).get("normal_fp_share")
        cleared = ", ".join(f"{fr[f]['gate_cleared_lesion']}/{fr[f]['n_lesion']}" for f in folds if f in fr)
        lines.append("| " + " | ".join([
            f"`{r['arm']}`", r["what"], *[_f(fr.get(f, {}).get("lesion_dice")) for f in folds],
            _f(r["mean_lesion_dice"]) + ("" if r["complete"] else " (partial)"), delta,
            *[_pct(fr.get(f, {}).get("miss_rate")) for f in folds], _pct(fp), cleared, _f(r["mean_auc"]),
            f"{r['minutes']:.0f}"]) + " |")
    return "\n".join(lines)


def write_table(cfg: dict, rows: list[dict], folds: list[str]) -> str:
    from dataset import save_json_atomic
    from evaluate import json_safe
    out = Path(cfg["out_dir"])
    text = format_table(rows, folds) + "\n"
    save_json_atomic(out / "ablation.json", json_safe({"folds": folds, "arms": rows}))
    (out / "ablation.md").write_text(text, encoding="utf-8")
    if cfg["copy_table"]:  # the table, and every finished fold's record beside it (checkpoints/ablation/<arm>/<fold>.json)
        copy = Path(cfg["copy_table"])
        copy.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(out / "ablation.md", copy)
        for rec in out.glob("*/*/fold.json"):
            (copy.with_suffix("") / rec.parent.parent.name).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(rec, copy.with_suffix("") / rec.parent.parent.name / f"{rec.parent.name}.json")
    return text


def restore_records(cfg: dict, arm: str, folds: list[str]) -> None:
    """Folds whose record was committed (checkpoints/ablation/<arm>/<fold>.json) count as done in a fresh checkout."""
    import loso
    if not cfg["copy_table"]:
        return
    for fold in folds:
        loso.restore_record(Path(cfg["copy_table"]).with_suffix("") / arm / f"{fold}.json",
                            Path(cfg["out_dir"]) / arm / fold / "fold.json")


def run(cfg: dict) -> list[dict]:
    import loso
    from cli import settings_with
    names = [a.strip() for a in cfg["arms"].split(",") if a.strip()]
    folds = [f.strip() for f in cfg["holdout"].split(",") if f.strip()]
    missing = [n for n in names if not (CONFIG_DIR / f"{n}.py").exists()]
    if missing:
        from dataset import DataError
        raise DataError(f"no recipe configs/ablation/{missing[0]}.py (arms: {', '.join(missing)})")
    # the table shows every arm with a finished fold, also those another ablation.py process runs
    listed = names + sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem not in names)
    for name in listed:  # a fresh checkout: committed records count as done and stay in the table
        restore_records(cfg, name, folds)
    for name in names:
        log.info("arm %s", name)
        for fold in folds:  # one fold at a time, so each finished fold's record is copied as it lands
            # tune_gate: every arm with a head gets the gate under the floor and its gate-off row, as before
            loso.run(settings_with(loso.__file__, recipe=f"configs/ablation/{name}.py", holdout=fold,
                                   out_dir=str(Path(cfg["out_dir"]) / name), split_dir=cfg["split_dir"],
                                   stages=cfg["stages"], tune_gate=True))
            rows = arm_rows(Path(cfg["out_dir"]), listed, folds)
            if rows:
                write_table(cfg, rows, folds)
    rows = arm_rows(Path(cfg["out_dir"]), listed, folds)
    if rows:
        print(write_table(cfg, rows, folds))
    return rows


def main(argv: list[str] | None = None) -> int:
    from loso import run_cli
    return run_cli(__file__, run, argv, __doc__)


if __name__ == "__main__":
    sys.exit(main())
