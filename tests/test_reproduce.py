"""reproduce.py and the model cards: every shipped file has a recipe and a card whose figures are its evaluations'
summaries; the whole chain (train, ship, tune, eval, card) runs on phantoms with no value copied by hand."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import model
import reproduce
from conftest import ROOT
from model_card import card_text

CK = ROOT / "checkpoints"


def test_every_shipped_file_is_a_reproducible_model():
    assert sorted(p.stem for p in CK.glob("*.safetensors")) == sorted(reproduce.MODELS)
    for name, spec in reproduce.MODELS.items():
        assert (ROOT / spec.file).is_file() and all((ROOT / r).is_file() for r in spec.recipes)
        meta = model.read_checkpoint_meta(ROOT / spec.file)
        assert meta["recipe"]["file"] == spec.recipes[-1] and (ROOT / meta["recipe"]["file"]).is_file()
        assert (ROOT / spec.recipes[-1]).read_text() in meta["recipe"]["text"]
        assert reproduce.resolve(name) == name
    assert reproduce.resolve("default") in reproduce.MODELS


@pytest.mark.parametrize("name", sorted(reproduce.MODELS))
def test_the_card_is_generated_from_the_summaries(name):
    spec = reproduce.MODELS[name]
    card = (CK / f"{name}.md").read_text(encoding="utf-8")
    assert card == card_text(name, spec), f"checkpoints/{name}.md is out of date: python reproduce.py {name} --stages card"
    for folder in spec.evals:
        f = json.loads((CK / folder / "summary.json").read_text())["figures"]
        assert f"{f['lesion_dice']:.3f}" in card and f"{f['n_lesion']} / {f['n_normal']}" in card
    for section in ("## Intended use", "## Out-of-scope use", "## Training data", "## Evaluation",
                    "## Known failure modes", "## How to reproduce", "not a diagnosis".capitalize()):
        assert section in card


def test_reproduce_runs_the_whole_chain_on_phantoms(phantom_tree, tmp_path, monkeypatch):
    recipe = tmp_path / "phantom.py"
    recipe.write_text(f'data_dir = "{phantom_tree}"\nout_dir = "{tmp_path / "run"}"\nloss_graph_dir = "{tmp_path}"\n'
                      'encoder = "efficientnet-lite0"\nhead = True\nloss = "bce+union_dice"\nimage_size = 64\n'
                      'epochs = 1\nexpand = 1\nbatch_size = 4\nprogress = False\n')
    spec = reproduce.Model(str(tmp_path / "ck" / "phantom_model.safetensors"), (str(recipe),), "a phantom model",
                           uncertainty=True,
                           evals={"eval_val": ("phantom validation", {"split": "val"}),
                                  "eval_all": ("all phantoms", {"data_dir": str(phantom_tree), "split": "all"})})
    monkeypatch.setitem(reproduce.MODELS, "phantom_model", spec)
    assert reproduce.main(["phantom_model"]) == 0
    meta = model.read_checkpoint_meta(spec.file)
    assert meta["storage"] == "fp16" and meta["recipe"]["file"] == str(recipe)
    assert {"threshold", "min_area", "normal_gate", "gate_keep", "uncertainty_cutoff"} <= set(meta)
    card = Path(spec.file).with_suffix(".md").read_text()
    for folder in ("eval_val", "eval_all"):
        f = json.loads((tmp_path / "ck" / folder / "summary.json").read_text())
        assert f["checkpoint"] == spec.file and f"{f['figures']['lesion_dice']:.3f}" in card
    assert reproduce.main(["phantom_model", "--stages", "card"]) == 0  # train etc. not run again
    from dataclasses import replace
    monkeypatch.setitem(reproduce.MODELS, "phantom_model", replace(spec, tune_gate=False))
    assert reproduce.main(["phantom_model", "--stages", "tune,card"]) == 0
    assert model.read_checkpoint_meta(spec.file)["normal_gate"] == 1.0
    assert "no normal gate" in Path(spec.file).with_suffix(".md").read_text()
    assert reproduce.main(["nonexistent"]) == 1
