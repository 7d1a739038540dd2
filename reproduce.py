"""One command per shipped model, from its recipe files to the shipped file, its evaluations and its card.

    make reproduce MODEL=default                   # = python reproduce.py default
    python reproduce.py busi_unet_resnet18 --stages eval,card

Stages, in order (a stage whose output is there is skipped, so a killed run continues where it stopped):
  train  train.py with each recipe of the model in turn (a later stage starts from the earlier one's weights by
         its recipe's init_from); resumed from resume.pt when the run is unfinished;
  ship   the last stage's last (or best) weights as fp16 into checkpoints/, its split copied beside it;
  tune   threshold, minimum area and normal gate chosen on the validation images (evaluate.tune: highest
         all-image Dice (b), at most 2% of lesion images erased), stored in the shipped file;
  review the uncertainty review cut-off chosen on the validation images (evaluate.py --uncertainty), stored;
  eval   every evaluation of the model (its validation images, other sources), into a folder beside the file;
  card   the model card <file>.md from the file and those summaries (model_card.py).
No value is copied by hand from one step to the next. The data are read from data/BUSI, data/BUS-UCLM and
data/BUS-BRA (a symbolic link to wherever they are will do). MODELS below is the list of shipped files; the
tests check that every .safetensors in checkpoints/ is in it.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("reproduce")
REPO = Path(__file__).resolve().parent
BUSI, UCLM, BRA = "data/BUSI", "data/BUS-UCLM/manifest.csv", "data/BUS-BRA/manifest.csv"
STAGES = ("train", "ship", "tune", "review", "eval", "card")


@dataclass(frozen=True)
class Model:
    file: str                     # the shipped file, relative to the repository
    recipes: tuple[str, ...]      # train.py recipe files, trained in this order
    summary: str                  # one line: what it is
    weights: str = "last"         # which weights of the last run are shipped: last or best (lowest validation loss)
    tune: bool = True             # choose threshold / min_area / gate on the validation images
    tune_gate: bool = True        # the tuning may choose a normal gate (models with a head); False: none
    uncertainty: bool = False     # choose the uncertainty review cut-off on the validation images
    # evaluation folder in checkpoints/ -> (what it is, evaluate.py settings)
    evals: dict = field(default_factory=dict)
    loso_table: str = ""          # a LOSO table (Markdown) of this recipe, shown in the card


MODELS = {
    "all_unet_efficientnet_lite0": Model(
        "checkpoints/all_unet_efficientnet_lite0.safetensors", ("configs/all_sources.py",),
        "EfficientNet-Lite0 UNet with a classification head, trained on BUSI, BUS-UCLM and BUS-BRA (the LOSO "
        "recipe); the default of predict.py, evaluate.py and app.py.", uncertainty=True,
        tune_gate=False,  # as the LOSO folds: a gate chosen on validation erased lesions on new scanners
        evals={"eval_all_busi": ("BUSI validation patients (in-domain)",
                                 {"sources": f"busi={BUSI}", "split": "val", "uncertainty": True}),
               "eval_all_bus-uclm": ("BUS-UCLM validation patients (in-domain)",
                                     {"sources": f"bus-uclm={UCLM}", "split": "val", "subgroups": "doppler,marks",
                                      "uncertainty": True}),
               "eval_all_bus-bra": ("BUS-BRA validation patients (in-domain)",
                                    {"sources": f"bus-bra={BRA}", "split": "val", "subgroups": "device",
                                     "uncertainty": True})},
        loso_table="checkpoints/loso/loso.md"),
    "busi_unet_efficientnet_lite0": Model(
        "checkpoints/busi_unet_efficientnet_lite0.safetensors", ("configs/busi_effl0.py",),
        "EfficientNet-Lite0 UNet with a classification head, trained on BUSI only; the default of predict.py, "
        "evaluate.py and app.py before the all-source model.", uncertainty=True,
        evals={"eval_efficientnet_lite0": ("BUSI validation (grouped split)",
                                           {"data_dir": BUSI, "split": "val", "uncertainty": True}),
               "eval_efficientnet_lite0_bus-uclm": ("BUS-UCLM, all images (never seen)",
                                                    {"manifest": UCLM, "split": "all", "subgroups": "doppler,marks",
                                                     "uncertainty": True})}),
    "multi_unet_efficientnet_lite0": Model(
        "checkpoints/multi_unet_efficientnet_lite0.safetensors", ("configs/busi_effl0.py", "configs/multi_effl0.py"),
        "The BUSI-only EfficientNet-Lite0 trained further on BUSI + BUS-UCLM (each split by patient).",
        evals={"eval_multi_busi": ("BUSI validation", {"sources": f"busi={BUSI}", "split": "val"}),
               "eval_multi_bus-uclm": ("BUS-UCLM validation patients (in-domain)",
                                       {"sources": f"uclm={UCLM}", "split": "val", "subgroups": "doppler,marks"})}),
    "busi_unet_resnet18": Model(
        "checkpoints/busi_unet_resnet18.safetensors",
        ("configs/resnet18_stage1.py", "configs/resnet18_stage2.py", "configs/resnet18_retrained.py"),
        "The original recipe's network (ResNet18-UNet, no pretrained weights, pixel-wise BCE) on BUSI, "
        "retrained from its previous weights.", weights="best", tune=False,
        evals={"eval": ("BUSI validation (its first split, near-duplicates of training images included)",
                        {"data_dir": BUSI, "split": "val"}),
               "eval_resnet18_busi_oldval_leakfree": ("BUSI validation without near-duplicates of its training images",
                                                      {"data_dir": BUSI, "split": "val", "split_file":
                                                       "checkpoints/busi_split_oldval_leakfree.json"}),
               "eval_resnet18_bus-uclm": ("BUS-UCLM, all images (never seen)",
                                          {"manifest": UCLM, "split": "all", "subgroups": "doppler,marks"})}),
}


def resolve(name: str) -> str:
    """A key of MODELS; 'default' is predict.py's default checkpoint."""
    if name == "default":
        import predict
        name = Path(predict.checkpoint).stem
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; shipped models: default, {', '.join(sorted(MODELS))}")
    return name


def recipe_cfg(recipe: str) -> dict:
    import train
    from cli import parse_settings
    return parse_settings(train.__file__, [recipe])


def stage_train(spec: Model) -> Path:
    """Train each recipe in turn (skip finished runs, resume unfinished ones); the last run's folder."""
    import train
    from loso import run_is_finished
    out = None
    for recipe in spec.recipes:
        cfg = recipe_cfg(recipe)
        out = Path(cfg["out_dir"])
        if run_is_finished(out, cfg):
            log.info("%s: finished run in %s, skipped", recipe, out)
            continue
        cfg.update(resume=(out / "resume.pt").exists(), overwrite=not (out / "resume.pt").exists())
        log.info("%s: training into %s%s", recipe, out, " (resumed)" if cfg["resume"] else "")
        train.train_model(cfg)
        if not run_is_finished(out, cfg):
            raise train.TrainingError(f"{out}: stopped before its last epoch; run this again to resume it")
    return out


def _evaluate(spec: Model, settings: dict) -> dict:
    import evaluate
    from cli import settings_with
    return evaluate.run(settings_with(evaluate.__file__, checkpoint=spec.file, gallery=0, **settings))


def stage_ship_and_tune(spec: Model, run_dir: Path, stages: set[str]) -> None:
    """ship (fp16 + split), tune (post-processing on validation), review (uncertainty cut-off on validation)."""
    from ship_checkpoint import ship, tune_and_ship
    split = recipe_cfg(spec.recipes[-1])["split_file"] or str(run_dir / "split.json")
    if "ship" in stages:
        ship(str(run_dir / f"{spec.weights}.safetensors"), spec.file, split)
    if "tune" in stages and spec.tune:
        tune_and_ship(spec.file, spec.file, split, tune_gate=spec.tune_gate)
    if "review" in stages and spec.uncertainty:
        summary = _evaluate(spec, {"split": "val", "uncertainty": True, "uncertainty_cutoff": -1.0,
                                   "out_dir": str(run_dir / "eval_review")})
        cutoff = summary["readout"]["uncertainty"]["cutoff"]
        ship(spec.file, spec.file, split, uncertainty_cutoff=round(float(cutoff), 4))


def stage_eval(spec: Model) -> None:
    for folder, (_, settings) in spec.evals.items():
        _evaluate(spec, {**settings, "out_dir": str((REPO / spec.file).parent / folder)})


def reproduce(name: str, stages: set[str]) -> None:
    from model_card import write_card
    spec = MODELS[name]
    run_dir = stage_train(spec) if "train" in stages else Path(recipe_cfg(spec.recipes[-1])["out_dir"])
    if stages & {"ship", "tune", "review"}:
        stage_ship_and_tune(spec, run_dir, stages)
    if "eval" in stages:
        stage_eval(spec)
    if "card" in stages:
        print(f"wrote {write_card(name, spec)}")


def main(argv: list[str] | None = None) -> int:
    from cli import RecipeError
    from dataset import DataError
    from model import CheckpointError, WeightsUnavailableError
    from train import TrainingError
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help=f"default, all, or one of: {', '.join(sorted(MODELS))}")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {', '.join(STAGES)}")
    a = ap.parse_args(argv)
    stages = {s.strip() for s in a.stages.split(",") if s.strip()}
    unknown = stages - set(STAGES)
    try:
        if unknown:
            raise KeyError(f"unknown stage(s) {sorted(unknown)}; stages: {', '.join(STAGES)}")
        for name in sorted(MODELS) if a.model == "all" else [resolve(a.model)]:
            reproduce(name, stages)
    except (KeyError, RecipeError, DataError, CheckpointError, WeightsUnavailableError, TrainingError) as e:
        log.error("%s", e.args[0] if isinstance(e, KeyError) else e)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
