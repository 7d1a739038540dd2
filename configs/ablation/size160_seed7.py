"""Ablation arm: size160 with another seed (7): is the best arm's gain above the seed-to-seed spread?"""
base = "configs/ablation/size160.py"
seed = 7
