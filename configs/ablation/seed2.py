"""Ablation arm: the baseline with another seed (weights, order, augmentation): the seed-to-seed spread."""
base = "configs/ablation/base.py"
seed = 7
