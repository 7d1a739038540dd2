"""Ablation arm: the candidate recipe: 160 px, the recipe's augmentation ranges and a head of weight 0.1 (each gained on the quiet fold alone)."""
base = "configs/ablation/size160_aug_recipe.py"
head = True
head_weight = 0.1
