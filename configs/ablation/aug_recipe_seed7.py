"""Ablation arm: aug_recipe with another seed (7): is its gain above the seed-to-seed spread?"""
base = "configs/ablation/aug_recipe.py"
seed = 7
