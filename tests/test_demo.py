"""`make demo` (issue 19): trains configs/demo.py in fp32 on phantoms, evaluates it per class, then predicts the six
real samples with the shipped default model and names the overlays. Whether the recipe learns is measured by the
demo itself (its per-class lesion Dice, stated in the README); these checks take milliseconds."""
from __future__ import annotations

import re
import shlex

from conftest import ROOT

from cli import parse_settings, read_recipe, read_settings

RECIPE = ROOT / "configs" / "demo.py"


def demo_commands() -> list[list[str]]:
    """The demo target's commands (continuation lines joined, leading @ dropped), each split like a shell."""
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    body = text.split("\ndemo: install\n", 1)[1]
    lines = []
    for line in body.splitlines():
        if not line.startswith("\t"):
            break
        lines.append(line.strip())
    joined = "\n".join(lines).replace("\\\n", " ")
    return [shlex.split(cmd.lstrip("@"), comments=False) for cmd in joined.splitlines()]


def python_commands() -> list[list[str]]:
    """The demo's commands that run a script of this repository: [script, args...]."""
    return [c[1:] for c in demo_commands() if c and c[0] == "$(BIN)/python" and c[1] != "-c"]


def test_recipe_parses_against_train_settings_and_is_fp32():
    settings = read_settings(ROOT / "train.py")
    recipe = read_recipe(RECIPE, settings)
    assert recipe["cpu_bf16"] is False                 # fp32: most CPUs have no AMX, bf16 would be slower there
    assert not {"data_dir", "out_dir", "loss_graph_dir", "overwrite", "resume"} & set(recipe)  # given by make
    cfg = parse_settings(ROOT / "train.py", [str(RECIPE), "--data_dir", "x", "--out_dir", "y"])
    assert cfg["config"] == str(RECIPE) and cfg["cpu_bf16"] is False and cfg["data_dir"] == "x"
    assert cfg["loss"] in ("bce+dice", "bce+union_dice") and cfg["lr_schedule"] == "onecycle"


def test_recipe_weights_install_with_pip():
    """A fresh clone has no network at run time: ImageNet weights must come with requirements-dev.txt."""
    from model import OFFLINE_IMAGENET
    recipe = read_recipe(RECIPE, read_settings(ROOT / "train.py"))
    if recipe.get("encoder_weights") == "imagenet":
        package = OFFLINE_IMAGENET[recipe["encoder"]][2].split()[-1]
        assert package in (ROOT / "requirements-dev.txt").read_text(encoding="utf-8")


def test_training_budget_stays_small():
    """The demo's training time on 2 cores (fp32) was measured for at most this many images seen at 128 px;
    a larger budget needs a new timing."""
    cfg = parse_settings(ROOT / "train.py", [str(RECIPE)])
    phantoms = next(c for c in python_commands() if c[0] == "phantom.py")
    per_class = int(phantoms[phantoms.index("--per-class") + 1])
    n_train = round(3 * per_class * (1 - cfg["val_fraction"]))
    seen = cfg["epochs"] * (cfg["draws_per_epoch"] or n_train * cfg["expand"])
    assert seen <= 1000 and cfg["image_size"] <= 128, (seen, cfg["image_size"])


def test_make_demo_trains_the_recipe_evaluates_per_class_and_ends_with_the_samples():
    scripts = python_commands()
    names = [c[0] for c in scripts]
    train = scripts[names.index("train.py")]
    assert train[1] == "configs/demo.py" and "--cpu_bf16" not in train
    run_dir = train[train.index("--out_dir") + 1]
    evaluate = scripts[names.index("evaluate.py")]
    assert evaluate[evaluate.index("--checkpoint") + 1].startswith(run_dir + "/")
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8").split("\ndemo: install\n", 1)[1].split("\n\n")[0]
    assert "dice_benign_a" in makefile and "dice_malignant_a" in makefile  # the per-class Dice is printed
    # the last script run: predict.py on its default input (the six real samples) with the shipped default model
    last = scripts[-1]
    args = last[1:]
    positional = [a for i, a in enumerate(args)
                  if not a.startswith("--") and (i == 0 or not args[i - 1].startswith("--"))]
    assert last[0] == "predict.py" and not positional
    assert "--checkpoint" not in last and "--path_to_image" not in last
    out = last[last.index("--out_dir") + 1]
    assert out.startswith("runs/"), "the demo must not overwrite the tracked sample_predictions/"
    predict_defaults = read_settings(ROOT / "predict.py")
    assert predict_defaults["path_to_image"][0] == "samples"
    assert len(list((ROOT / "samples").glob("*.png"))) == 6
    # and it ends by naming the overlays to open
    tail = demo_commands()[-2:]
    assert any(re.search(re.escape(out) + r"/\*_overlay\.png", " ".join(c)) for c in tail)
