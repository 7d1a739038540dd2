"""The multi-source model (checkpoints/multi_unet_efficientnet_lite0.safetensors): the BUSI-only EfficientNet-Lite0
trained 5 more epochs on BUSI + BUS-UCLM (each source split on its own, BUS-UCLM by patient), every source drawn
equally often, expansion 1, AdamW 1e-4 one-cycle. 20 min on 2 cores (fp32)."""
base = "configs/busi_effl0.py"
data_dir = ""
sources = "busi=data/BUSI;uclm=data/BUS-UCLM/manifest.csv"
split_file = "checkpoints/multi_split_busi_bus-uclm.json"
init_from = "runs/busi_effl0/last.safetensors"
encoder_weights = ""
out_dir = "runs/multi_effl0"
balance_sources = True
expand = 1
epochs = 5
lr = 0.0001
