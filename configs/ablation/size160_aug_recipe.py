"""Ablation arm: 160 px with the original recipe's augmentation ranges (the best arm of each fold's low-noise side, together)."""
base = "configs/ablation/size160.py"
augment = "recipe"
