"""Leave-one-source-out (LOSO): train on every source but one, evaluate zero-shot on the one left out.

    python loso.py configs/loso.py                             # every fold of the recipe, in turn
    python loso.py configs/loso.py --holdout bus-uclm          # one fold
    python loso.py configs/ablation/head01.py --holdout bus-uclm,bus-bra --out_dir runs/ablation/head01

A user's scanner is always one the model has not seen; LOSO is the honest estimate of what they get. The
recipe's `sources` names every source; fold <name> trains on the others. Per fold, in <out_dir>/<name>/:
  train   train.py with the recipe (sources = the others, split by patient and near-duplicate group into
          training and validation images of the training sources only; one split per fold in split_dir, shared
          by every recipe so arms are compared on the same images); resumed when a run is there, skipped when done;
  tune    threshold and minimum area (and, with --tune_gate true, the normal gate) chosen on that validation
          split (evaluate.tune rules: highest all-image Dice (b), at most recall_floor of the lesion images that
          threshold 0.5 finds left empty); the last epoch's weights shipped as model.safetensors (fp16) with that
          setting. No gate by default: in both folds where validation chose one, it erased more lesion images of
          the new scanner than the floor allowed;
  eval    model.safetensors on every image of the held-out source (nothing of it chose anything) with
          patient-bootstrap intervals and subgroup rows (device, doppler, marks where the manifest has them),
          into eval_heldout/ (and, when a normal gate was chosen, once more without it: eval_heldout_nogate/);
          and on the validation images of the training sources, into eval_val/.
fold.json records the fold's figures; a fold with fold.json is skipped (delete it to redo the fold's tune and
eval; a fold tuned under the other --tune_gate is tuned and evaluated again). After each fold the table of every
finished fold is written: <out_dir>/loso.md and loso.json. With
--ship_dir (checkpoints/loso) each fold's model, split and record and the table go there too, and a fresh checkout
restores the shipped records first, so finished folds are skipped and stay in the table.
"""
from __future__ import annotations

import json
import logging
import shlex
import shutil
import sys
import time
from pathlib import Path

log = logging.getLogger("loso")

# ---- settings (edit here, or override on the command line: --holdout bus-uclm)
recipe = "configs/loso.py"        # train.py recipe file; its sources are all the sources, each fold leaves one out
holdout = ""                      # sources to leave out, comma-separated names (empty: each source of the recipe in turn)
out_dir = ""                      # folds go to <out_dir>/<source>/; empty: runs/loso/<recipe name>
split_dir = "runs/loso/splits"    # one split file per fold (without_<source>.json), shared by every recipe
stages = "train,tune,eval"        # stages to run; a stage whose output is there is skipped
recall_floor = 0.02               # tuning may leave empty at most this share of the validation lesion images threshold 0.5 finds
tune_gate = False                 # True: tuning may choose a normal gate (models with a head); False: no gate (why: docs/results.md)
bootstrap = 1000                  # patient-bootstrap resamples for the held-out intervals
subgroups = "device,doppler,marks"  # held-out subgroup columns, each used where the source's manifest has it
train_args = ""                   # extra train.py flags for every fold, e.g. "--max_steps 2" (tests)
ship_dir = ""                     # also copy each fold's model, split, record and the table here (e.g. checkpoints/loso)
# ---- end of settings

REPO = Path(__file__).resolve().parent
FIGURES = ("lesion_dice", "lesion_iou", "miss_rate", "normal_fp_share", "auc")
BREAKDOWN = ("found_lesion_dice", "n_found", "pooled_lesion_dice", "n_missed", "small_miss_share")  # evaluate.lesion_breakdown


def fold_names(sources: str, holdout_: str) -> list[str]:
    """The sources to leave out in turn (all of the recipe's when holdout_ is empty); unknown names are an error."""
    from dataset import DataError, parse_sources
    names = [n for n, _ in parse_sources(sources)]
    if len(names) < 2:
        raise DataError(f"LOSO needs a recipe with two or more sources, got {names or 'none'}")
    wanted = [h.strip() for h in holdout_.split(",") if h.strip()] or names
    unknown = [h for h in wanted if h not in names]
    if unknown:
        raise DataError(f"--holdout {', '.join(unknown)}: not a source of the recipe ({', '.join(names)})")
    return wanted


def training_sources(sources: str, left_out: str) -> str:
    """The recipe's sources spec without the one left out."""
    from dataset import parse_sources
    return ";".join(f"{n}={p}" for n, p in parse_sources(sources) if n != left_out)


def source_path(sources: str, name: str) -> str:
    from dataset import parse_sources
    return dict(parse_sources(sources))[name]


def train_cfg(cfg: dict, left_out: str, fold_dir: Path) -> dict:
    """train.py's settings for the fold: the recipe, then train_args, then the fold's sources and folders."""
    from cli import parse_settings
    import train
    tcfg = parse_settings(train.__file__, [cfg["recipe"], *shlex.split(cfg["train_args"])])
    tcfg.update(sources=training_sources(tcfg["sources"], left_out), out_dir=str(fold_dir / "run"),
                loss_graph_dir=str(fold_dir), split_file=str(Path(cfg["split_dir"]) / f"without_{left_out}.json"))
    return tcfg


def run_is_finished(run_dir: Path, tcfg: dict) -> bool:
    """A training run that reached its last epoch (or its max_steps) and wrote last.safetensors."""
    from train import read_log
    rows = read_log(run_dir / "log.csv")
    if not rows or not (run_dir / "last.safetensors").exists():
        return False
    if tcfg["max_steps"]:
        return (run_dir / "trained.json").exists()
    return int(rows[-1]["epoch"]) >= tcfg["epochs"]


def stage_train(cfg: dict, left_out: str, fold_dir: Path) -> None:
    """Train (or resume, or skip when finished) the fold's run."""
    import train
    from model import atomic_write_bytes
    tcfg = train_cfg(cfg, left_out, fold_dir)
    run_dir = Path(tcfg["out_dir"])
    if not run_is_finished(run_dir, tcfg):
        tcfg["resume"] = (run_dir / "resume.pt").exists()
        tcfg["overwrite"] = not tcfg["resume"]
        log.info("fold %s: training on %s%s", left_out, tcfg["sources"], " (resumed)" if tcfg["resume"] else "")
        train.train_model(tcfg)
        if tcfg["max_steps"]:
            atomic_write_bytes(run_dir / "trained.json", b'{"max_steps_reached": true}\n')
        if not run_is_finished(run_dir, tcfg):
            raise train.TrainingError(f"{run_dir}: training stopped before its last epoch; run loso.py again to "
                                      f"resume it")


def _eval_cfg(**overrides) -> dict:
    import evaluate
    from cli import settings_with
    return settings_with(evaluate.__file__, gallery=0, measure=False, **overrides)


def tuned_as_asked(record: dict, cfg: dict) -> bool:
    """Whether a tuned.json or fold.json was made under cfg's tune_gate (records before the setting had the gate)."""
    return record.get("tune_gate", True) == cfg["tune_gate"]


def stage_tune(cfg: dict, left_out: str, fold_dir: Path) -> dict:
    """Choose threshold / min_area / gate on the training sources' validation images; ship model.safetensors."""
    from model import read_checkpoint_meta
    from ship_checkpoint import tune_and_ship
    model_path = fold_dir / "model.safetensors"
    chosen_path = fold_dir / "tuned.json"
    if model_path.exists() and chosen_path.exists():
        chosen = json.loads(chosen_path.read_text())
        if tuned_as_asked(chosen, cfg):
            return chosen
    src = fold_dir / "run" / "last.safetensors"
    setting = tune_and_ship(str(src), str(model_path), str(fold_dir / "split.json"), cfg["recall_floor"],
                            cfg["tune_gate"])
    chosen = {**setting, "recall_floor": cfg["recall_floor"], "tune_gate": cfg["tune_gate"],
              "tuned_on": f"validation images of {read_checkpoint_meta(src)['train_config']['sources']}"}
    chosen_path.write_text(json.dumps(chosen, indent=1) + "\n")
    return chosen


def held_out_subgroups(cfg: dict, spec: str) -> str:
    """The subgroup columns of the held-out source's manifest among cfg['subgroups']."""
    import csv
    path = Path(spec)
    if path.suffix.lower() != ".csv":
        return ""
    with open(path, newline="", encoding="utf-8") as f:
        have = set(next(csv.reader(f), []))
    return ",".join(c for c in cfg["subgroups"].split(",") if c.strip() in have)


def stage_eval(cfg: dict, left_out: str, fold_dir: Path, sources: str) -> dict:
    """The fold's model on all of the held-out source, and on the training sources' validation images."""
    import evaluate
    model_path = str(fold_dir / "model.safetensors")
    spec = source_path(sources, left_out)
    t0 = time.time()
    held = evaluate.run(_eval_cfg(checkpoint=model_path, sources=f"{left_out}={spec}", split="all",
                                  out_dir=str(fold_dir / "eval_heldout"), bootstrap=cfg["bootstrap"],
                                  subgroups=held_out_subgroups(cfg, spec)))
    val = evaluate.run(_eval_cfg(checkpoint=model_path, split="val", out_dir=str(fold_dir / "eval_val"),
                                 bootstrap=0))
    no_gate = None
    if held.get("head") and held["normal_gate"] < 1.0:  # what the gate costs and buys on the held-out source
        no_gate = evaluate.run(_eval_cfg(checkpoint=model_path, sources=f"{left_out}={spec}", split="all",
                                         out_dir=str(fold_dir / "eval_heldout_nogate"), bootstrap=0,
                                         normal_gate=1.0, gate_keep=1.0))
    elif (fold_dir / "eval_heldout_nogate").exists():  # of an earlier tuning that chose a gate
        shutil.rmtree(fold_dir / "eval_heldout_nogate")
    return {"held_out": held, "val": val, "no_gate": no_gate, "eval_minutes": (time.time() - t0) / 60}


def fold_record(left_out: str, tcfg: dict, chosen: dict, train_minutes: float, ev: dict) -> dict:
    """What the table needs of a finished fold."""
    held, val = ev["held_out"], ev["val"]
    f = held["figures"]
    return {"held_out": left_out, "trained_on": tcfg["sources"], "recipe": tcfg["config"],
            "setting": {k: chosen[k] for k in ("threshold", "min_area", "normal_gate", "gate_keep")},
            "tune_gate": chosen.get("tune_gate", True),
            "n_images": held["all"]["n_images"], "n_lesion": f["n_lesion"], "n_normal": f["n_normal"],
            **{k: f[k] for k in FIGURES}, **{k: f[k] for k in BREAKDOWN},
            "gate_cleared_lesion": f.get("gate_cleared_lesion", 0),
            "gate_kept_for_review": f.get("gate_kept_for_review", 0),
            "intervals": {k: held.get("intervals", {}).get(k) for k in FIGURES},
            "subgroups": held.get("subgroups", []),
            "val": {k: val["figures"][k] for k in FIGURES},
            "no_gate": {k: ev["no_gate"]["figures"][k] for k in FIGURES} if ev.get("no_gate") else None,
            "train_minutes": round(train_minutes, 1), "eval_minutes": round(ev["eval_minutes"], 1)}


def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None or v != v else f"{v:.{digits}f}"


def _pct(v) -> str:
    return "n/a" if v is None or v != v else f"{100 * v:.0f}%"


def _ci(iv) -> str:
    return f" ({_f(iv[0], 2)}-{_f(iv[1], 2)})" if iv and iv[0] == iv[0] else ""


def format_table(folds: list[dict]) -> str:
    """The LOSO table in Markdown: one row per held-out source, then its subgroup rows."""
    lines = ["| held out | trained on | images (lesion / normal) | lesion Dice (95% CI) | lesion IoU (95% CI) | "
             "complete misses | Dice of the found lesions | pooled Dice | normal scans given a lesion | "
             "lesion images erased by the gate | malignancy AUC |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in folds:
        iv = r["intervals"]
        on = " + ".join(s.split("=")[0] for s in r["trained_on"].split(";"))
        lines.append(f"| **{r['held_out']}** | {on} | {r['n_lesion']} / {r['n_normal']} | "
                     f"{_f(r['lesion_dice'])}{_ci(iv.get('lesion_dice'))} | {_f(r['lesion_iou'])}"
                     f"{_ci(iv.get('lesion_iou'))} | {_pct(r['miss_rate'])} | {_f(r.get('found_lesion_dice'))} | "
                     f"{_f(r.get('pooled_lesion_dice'))} | {_pct(r['normal_fp_share'])} | "
                     f"{r['gate_cleared_lesion']} | {_f(r['auc'])}{_ci(iv.get('auc'))} |")
        for s in r["subgroups"]:
            lines.append(f"| {r['held_out']}: {s['column']} = {s['value']} | | {s['n_lesion']} / {s['n_normal']} | "
                         f"{_f(s['lesion_dice'])} | {_f(s['lesion_iou'])} | {_pct(s['miss_rate'])} | | | "
                         f"{_pct(s['normal_fp_share'])} | | {_f(s['auc'])} |")
    if folds:
        mean = {k: sum(r[k] for r in folds) / len(folds) for k in ("lesion_dice", "lesion_iou", "miss_rate")}
        lines.append(f"| mean over {len(folds)} held-out source(s) | | | {_f(mean['lesion_dice'])} | "
                     f"{_f(mean['lesion_iou'])} | {_pct(mean['miss_rate'])} | | | | | |")
    return "\n".join(lines)


def write_table(out: Path, folds: list[dict]) -> None:
    from dataset import save_json_atomic
    from evaluate import json_safe
    save_json_atomic(out / "loso.json", json_safe({"folds": folds}))
    (out / "loso.md").write_text(format_table(folds) + "\n", encoding="utf-8")


def finished_folds(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out.glob("*/fold.json"))]


def restore_record(kept: Path, fold_json: Path) -> None:
    """A committed fold record copied to fold_json where that is missing (a fresh checkout has no runs/), so the
    fold counts as done."""
    if kept.is_file() and not fold_json.exists():
        fold_json.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kept, fold_json)
        log.info("fold %s: restored from %s", fold_json.parent.name, kept)


def restore_shipped_folds(out: Path, ship_dir: Path) -> None:
    """Fold records shipped earlier (without_<source>.json in ship_dir) back into out/<source>/fold.json: those
    folds are skipped and stay in the table."""
    for rec in sorted(ship_dir.glob("without_*.json")):
        if not rec.name.endswith("_split.json"):
            restore_record(rec, out / rec.stem[len("without_"):] / "fold.json")


def run(cfg: dict) -> list[dict]:
    """Every asked fold, in turn: train, tune, eval (each skipped when done); then the table."""
    from cli import parse_settings
    import train
    recipe_sources = parse_settings(train.__file__, [cfg["recipe"]])["sources"]
    out = Path(cfg["out_dir"] or f"runs/loso/{Path(cfg['recipe']).stem}")
    stages = {s.strip() for s in cfg["stages"].split(",") if s.strip()}
    ship_to = Path(cfg["ship_dir"]) if cfg["ship_dir"] else None
    table_dirs = [out, ship_to] if ship_to else [out]
    if ship_to:
        ship_to.mkdir(parents=True, exist_ok=True)
        restore_shipped_folds(out, ship_to)
    for left_out in fold_names(recipe_sources, cfg["holdout"]):
        fold_dir = out / left_out
        if (fold_dir / "fold.json").exists():
            if tuned_as_asked(json.loads((fold_dir / "fold.json").read_text()), cfg):
                log.info("fold %s: done (%s), skipped", left_out, fold_dir / "fold.json")
                continue
            log.info("fold %s: tuned with tune_gate %s before: tuned and evaluated again", left_out,
                     not cfg["tune_gate"])
        fold_dir.mkdir(parents=True, exist_ok=True)
        Path(cfg["split_dir"]).mkdir(parents=True, exist_ok=True)
        if "train" in stages:
            stage_train(cfg, left_out, fold_dir)
        if not {"tune", "eval"} & stages:
            continue
        tcfg = train_cfg(cfg, left_out, fold_dir)
        if not run_is_finished(Path(tcfg["out_dir"]), tcfg):
            raise train.TrainingError(f"fold {left_out}: no finished training run in {tcfg['out_dir']}; run the "
                                      f"train stage first")
        minutes = sum(float(r["seconds"]) for r in train.read_log(Path(tcfg["out_dir"]) / "log.csv")) / 60
        chosen = stage_tune(cfg, left_out, fold_dir)
        if "eval" not in stages:
            continue
        ev = stage_eval(cfg, left_out, fold_dir, recipe_sources)
        record = fold_record(left_out, tcfg, chosen, minutes, ev)
        (fold_dir / "fold.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
        if ship_to:
            shutil.copyfile(fold_dir / "model.safetensors", ship_to / f"without_{left_out}.safetensors")
            shutil.copyfile(fold_dir / "split.json", ship_to / f"without_{left_out}_split.json")
            shutil.copyfile(fold_dir / "fold.json", ship_to / f"without_{left_out}.json")
        for table_dir in table_dirs:
            write_table(table_dir, finished_folds(out))
        log.info("fold %s: lesion Dice %.3f on all of %s; table %s", left_out, record["lesion_dice"], left_out,
                 out / "loso.md")
    folds = finished_folds(out)
    if folds:
        for table_dir in table_dirs:
            write_table(table_dir, folds)
        print(format_table(folds))
    return folds


def run_cli(script: str, run_fn, argv: list[str] | None, doc: str, positional: str | None = None) -> int:
    """The command line of loso.py and ablation.py: settings from script's block, run_fn(cfg), errors a user
    can act on logged in one line (exit status 1)."""
    from cli import RecipeError, parse_settings
    from dataset import DataError
    from model import CheckpointError, WeightsUnavailableError
    from train import TrainingError
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        run_fn(parse_settings(script, argv, doc, positional=positional))
    except (RecipeError, DataError, CheckpointError, WeightsUnavailableError, TrainingError) as e:
        log.error("%s", e)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(__file__, run, argv, __doc__, positional="recipe")


if __name__ == "__main__":
    sys.exit(main())
