"""The default model (issue 23): the LOSO recipe (configs/loso.py) trained on all three sources.

BUSI, BUS-UCLM and BUS-BRA, each split by patient and near-duplicate group (20% of each source's patients held back
for its in-domain figures); the six committed sample scans (samples/) always land in validation, so
sample_predictions/ shows images the model never trained on. Its figure for a new scanner is the LOSO table of
the same recipe (checkpoints/loso/loso.md). Run: python reproduce.py all_unet_efficientnet_lite0
"""
base = "configs/loso.py"
sources = "busi=data/BUSI;bus-uclm=data/BUS-UCLM/manifest.csv;bus-bra=data/BUS-BRA/manifest.csv"
split_file = "checkpoints/all_sources_split.json"
val_always = "samples/*.png"
out_dir = "runs/all_sources"
