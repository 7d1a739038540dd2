"""loso.py and ablation.py on three tiny synthetic sources: the held-out source never trains, validates or tunes;
the table has one row per held-out source; a resumed run skips finished folds."""
from __future__ import annotations

import json

import pytest

import loso
from cli import settings_with
from conftest import ROOT


@pytest.fixture(scope="module")
def three_sources(tmp_path_factory):
    from phantom import write_busi_tree
    root = tmp_path_factory.mktemp("loso")
    trees = {n: write_busi_tree(root / n, per_class=4, height=80, width=96, seed=10 * i)
             for i, n in enumerate(("alpha", "beta", "gamma"))}
    recipe = root / "recipe.py"
    recipe.write_text('base = "configs/ablation/base.py"\n'
                      f'sources = "{";".join(f"{n}={p}" for n, p in trees.items())}"\n'
                      'encoder_weights = ""\nimage_size = 64\nepochs = 1\ndraws_per_epoch = 8\nbatch_size = 4\n'
                      'head = True\n')
    return root, recipe


@pytest.fixture(scope="module")
def loso_run(three_sources):
    root, recipe = three_sources
    cfg = settings_with(ROOT / "loso.py", recipe=str(recipe), out_dir=str(root / "out"),
                        split_dir=str(root / "splits"), bootstrap=20)
    return root, cfg, loso.run(cfg)


def test_one_row_per_held_out_source(loso_run):
    root, _, folds = loso_run
    assert [f["held_out"] for f in folds] == ["alpha", "beta", "gamma"]
    table = (root / "out" / "loso.md").read_text()
    for name in ("alpha", "beta", "gamma"):
        assert table.count(f"| **{name}** |") == 1
    saved = json.loads((root / "out" / "loso.json").read_text())
    assert [f["held_out"] for f in saved["folds"]] == ["alpha", "beta", "gamma"]
    for f in folds:
        assert f["n_images"] == 12 and f["n_lesion"] == 8 and f["n_normal"] == 4  # all of the held-out source
        assert f["intervals"]["lesion_dice"] is not None and "gate_cleared_lesion" in f
        assert f["n_found"] + f["n_missed"] == f["n_lesion"]  # the breakdown of the lesion Dice is in the record
        assert all(k in f for k in loso.BREAKDOWN)
    assert "| pooled Dice |" in table


def test_the_held_out_source_never_trains_validates_or_tunes(loso_run):
    import model
    root, _, folds = loso_run
    for f in folds:
        out = f["held_out"]
        fold_dir = root / "out" / out
        split = json.loads((root / "splits" / f"without_{out}.json").read_text())
        keys = [k for part in ("train", "val") for k in split[part]]
        assert keys and not any(k.startswith(f"{out}/") for k in keys)
        meta = model.read_checkpoint_meta(fold_dir / "model.safetensors")
        assert out not in meta["train_config"]["sources"] and meta["storage"] == "fp16"
        tuned = json.loads((fold_dir / "tuned.json").read_text())
        assert out not in tuned["tuned_on"]
        val_rows = (fold_dir / "eval_val" / "per_image.csv").read_text().splitlines()[1:]
        assert val_rows and not any(r.startswith(f"{out}/") for r in val_rows)
        held_rows = (fold_dir / "eval_heldout" / "per_image.csv").read_text().splitlines()[1:]
        assert len(held_rows) == 12 and all(r.startswith(f"{out}/") for r in held_rows)


def test_a_resumed_run_skips_finished_folds(loso_run, monkeypatch):
    import train
    _, cfg, folds = loso_run

    def no_training(*a, **k):
        raise AssertionError("a finished fold was trained again")
    monkeypatch.setattr(train, "train_model", no_training)
    monkeypatch.setattr(loso, "stage_tune", no_training)
    monkeypatch.setattr(loso, "stage_eval", no_training)
    assert [f["lesion_dice"] for f in loso.run(cfg)] == [f["lesion_dice"] for f in folds]


def test_the_tuning_follows_tune_gate_and_a_fold_tuned_otherwise_is_redone(loso_run, tmp_path, monkeypatch):
    import shutil
    from model import read_checkpoint_meta
    root, cfg, folds = loso_run
    assert not cfg["tune_gate"] and all(f["tune_gate"] is False and f["setting"]["normal_gate"] == 1.0 for f in folds)
    fold_dir = tmp_path / "alpha"
    shutil.copytree(root / "out" / "alpha", fold_dir)
    gated = loso.stage_tune({**cfg, "tune_gate": True}, "alpha", fold_dir)  # tuned again: the policy changed
    assert gated["tune_gate"] is True and json.loads((fold_dir / "tuned.json").read_text()) == gated
    off = loso.stage_tune(cfg, "alpha", fold_dir)
    assert off["tune_gate"] is False and off["normal_gate"] == 1.0
    assert read_checkpoint_meta(fold_dir / "model.safetensors")["normal_gate"] == 1.0
    redone = []
    monkeypatch.setattr(loso, "stage_tune", lambda c, left_out, d: redone.append(left_out) or 1 / 0)
    with pytest.raises(ZeroDivisionError):  # the finished fold is not skipped under the other policy
        loso.run({**cfg, "tune_gate": True, "holdout": "beta"})
    assert redone == ["beta"]


def test_an_unfinished_fold_resumes_its_training(three_sources, monkeypatch):
    root, recipe = three_sources
    cfg = settings_with(ROOT / "loso.py", recipe=str(recipe), out_dir=str(root / "resume"),
                        split_dir=str(root / "splits"), holdout="alpha", stages="train", train_args="--epochs 2")
    import train
    real = train.train_model
    calls = []

    def interrupted_once(tcfg):
        calls.append(tcfg["resume"])
        return real({**tcfg, "max_steps": 2} if len(calls) == 1 else tcfg)  # killed after epoch 1 of 2
    monkeypatch.setattr(train, "train_model", interrupted_once)
    with pytest.raises(train.TrainingError, match="stopped before its last epoch"):
        loso.run(cfg)
    loso.run(cfg)
    assert calls == [False, True]
    rows = train.read_log(root / "resume" / "alpha" / "run" / "log.csv")
    assert [int(r["epoch"]) for r in rows] == [1, 2]


def test_unknown_held_out_source_is_refused(three_sources):
    from dataset import DataError
    root, recipe = three_sources
    with pytest.raises(DataError, match="--holdout delta: not a source of the recipe"):
        loso.run(settings_with(ROOT / "loso.py", recipe=str(recipe), out_dir=str(root / "x"), holdout="delta"))


def test_ablation_table_compares_arms_on_the_same_folds(loso_run, tmp_path):
    import ablation
    root, _, _ = loso_run
    out = tmp_path / "abl"
    for arm, shift in (("base", 0.0), ("head01", 0.1)):
        for fold in ("alpha", "beta"):
            (out / arm / fold).mkdir(parents=True)
            rec = json.loads((root / "out" / fold / "fold.json").read_text())
            rec["lesion_dice"] = 0.5 + shift
            (out / arm / fold / "fold.json").write_text(json.dumps(rec))
    rows = ablation.arm_rows(out, ["base", "head01"], ["alpha", "beta"])
    text = ablation.format_table(rows, ["alpha", "beta"])
    assert text.splitlines()[2].startswith("| `head01` |") and "+0.100" in text
    assert [r["complete"] for r in rows] == [True, True]


def test_ablation_copies_the_table_and_every_fold_record(loso_run, tmp_path):
    import ablation
    root, _, _ = loso_run
    out = tmp_path / "abl"
    (out / "base" / "alpha").mkdir(parents=True)
    (out / "base" / "alpha" / "fold.json").write_text((root / "out" / "alpha" / "fold.json").read_text())
    cfg = settings_with(ROOT / "ablation.py", out_dir=str(out), copy_table=str(tmp_path / "ck" / "ablation.md"))
    ablation.write_table(cfg, ablation.arm_rows(out, ["base"], ["alpha"]), ["alpha"])
    assert (tmp_path / "ck" / "ablation.md").read_text().count("| `base` |") == 1
    assert json.loads((tmp_path / "ck" / "ablation" / "base" / "alpha.json").read_text())["held_out"] == "alpha"
    fresh = tmp_path / "fresh"  # a new checkout: the committed record makes the fold count as done
    ablation.restore_records({**cfg, "out_dir": str(fresh)}, "base", ["alpha", "beta"])
    assert (fresh / "base" / "alpha" / "fold.json").is_file() and not (fresh / "base" / "beta").exists()


def test_ablation_in_a_fresh_checkout_keeps_every_committed_arm_in_the_table(loso_run, tmp_path):
    """Running one arm must not drop the arms whose records were committed by earlier sessions."""
    import ablation
    root, _, _ = loso_run
    ck = tmp_path / "ck"
    for arm in ("base", "head01"):
        (ck / "ablation" / arm).mkdir(parents=True)
        (ck / "ablation" / arm / "bus-uclm.json").write_text((root / "out" / "alpha" / "fold.json").read_text())
    cfg = settings_with(ROOT / "ablation.py", out_dir=str(tmp_path / "fresh"), copy_table=str(ck / "ablation.md"),
                        arms="head01", holdout="bus-uclm", split_dir=str(tmp_path / "splits"))
    ablation.run(cfg)  # head01's only fold is committed: restored and skipped, nothing trains
    table = (ck / "ablation.md").read_text()
    assert "| `base` |" in table and "| `head01` |" in table


def _record(dice: float, no_gate: dict | None, cleared: int = 0) -> dict:
    return {"lesion_dice": dice, "lesion_iou": dice - 0.1, "miss_rate": 0.1, "normal_fp_share": 0.5, "auc": 0.7,
            "gate_cleared_lesion": cleared, "n_lesion": 100, "train_minutes": 1.0, "eval_minutes": 1.0,
            "no_gate": no_gate}


def test_ablation_gate_off_row_uses_each_folds_own_figures_where_no_gate_was_chosen(tmp_path):
    """gate off vs gate under the recall floor: a fold whose tuning chose no gate is its own gate-off figure."""
    import ablation
    out = tmp_path / "abl"
    ungated = {"lesion_dice": 0.7, "lesion_iou": 0.6, "miss_rate": 0.05, "normal_fp_share": 0.8, "auc": 0.7}
    for arm, recs in (("head01", {"alpha": _record(0.6, ungated, cleared=9), "beta": _record(0.5, None)}),
                      ("base", {"alpha": _record(0.55, None), "beta": _record(0.5, None)})):
        for fold, rec in recs.items():
            (out / arm / fold).mkdir(parents=True)
            (out / arm / fold / "fold.json").write_text(json.dumps(rec))
    rows = {r["arm"]: r for r in ablation.arm_rows(out, ["base", "head01"], ["alpha", "beta"])}
    assert set(rows) == {"base", "head01", "head01, gate off"}  # base has no gate: no gate-off row
    off = rows["head01, gate off"]
    assert off["folds"]["alpha"]["lesion_dice"] == 0.7 and off["folds"]["beta"]["lesion_dice"] == 0.5
    assert abs(off["mean_lesion_dice"] - 0.6) < 1e-9 and abs(rows["head01"]["mean_lesion_dice"] - 0.55) < 1e-9
    table = ablation.format_table(list(rows.values()), ["alpha", "beta"])
    assert "| 9/100, 0/100 |" in table and "| 0/100, 0/100 |" in table


def test_shipped_folds_are_restored_in_a_fresh_checkout_and_stay_in_the_table(loso_run, tmp_path, monkeypatch):
    import shutil
    import train
    root, cfg, folds = loso_run
    ship = tmp_path / "ship"
    loso.run({**cfg, "ship_dir": str(ship)})  # every fold is done: only the table goes to ship_dir
    assert not list(ship.glob("without_*.json"))
    for f in folds:  # what --ship_dir leaves after each fold
        shutil.copyfile(root / "out" / f["held_out"] / "fold.json", ship / f"without_{f['held_out']}.json")
        shutil.copyfile(root / "out" / f["held_out"] / "split.json", ship / f"without_{f['held_out']}_split.json")

    def no_training(*a, **k):
        raise AssertionError("a shipped fold was trained again")
    monkeypatch.setattr(train, "train_model", no_training)
    fresh = {**cfg, "ship_dir": str(ship), "out_dir": str(tmp_path / "fresh_runs")}
    assert [f["held_out"] for f in loso.run(fresh)] == ["alpha", "beta", "gamma"]
    for table in (tmp_path / "fresh_runs" / "loso.md", ship / "loso.md"):
        assert all(table.read_text().count(f"| **{n}** |") == 1 for n in ("alpha", "beta", "gamma"))
