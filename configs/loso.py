"""The leave-one-source-out recipe at full budget: python loso.py configs/loso.py (each fold about 30 min on 2 cores).

The ablation arm `size160_head01` (checkpoints/ablation.md) at four times the ablation's budget: the baseline
(configs/ablation/base.py: EfficientNet-Lite0, BCE + soft Dice of the union of the lesion channels, scanner
augmentation, AdamW one-cycle) at 160 px with a classification head of weight 0.1. Why this arm: among the arms
that give the label from a head (needed for the malignancy AUC and the normal gate) it has the best mean over
both folds (0.602); 160 px beat the baseline on both folds with two seeds; the head cost nothing on the quiet
fold (BUS-UCLM left out, 0.637) and lifted the label's AUC (0.788 against 0.690 from the channels); its gate
cleared no lesion image. The recipe's augmentation ranges, steady alone, lost when stacked on 160 px (with or
without the head: size160_aug_recipe 0.596, size160_aug_head01 0.561), so they stay out.
"""
base = "configs/ablation/base.py"
image_size = 160
head = True
head_weight = 0.1
epochs = 10
draws_per_epoch = 2000
