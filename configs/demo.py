"""The `make demo` recipe: a model that visibly learns every class of phantom in minutes on 2 CPU cores, in fp32.

EfficientNet-Lite0 with its ImageNet weights (they install with pip: no download at run time), 128 px, fp32 (no
bf16: most CPUs have no AMX, where bf16 is no faster), BCE + soft Dice per lesion channel (the demo is judged by
the per-class lesion Dice, so each class's channel is trained to outline its own lesions), AdamW one-cycle at a
high peak lr. 5 epochs of the 96 training phantoms x 2 (960 images seen, 120 steps). Phantoms are all different
but alike in layout, so their perceptual hashes collide: no near-duplicate grouping (it would drop some as
"conflicting labels"). The phantoms' folder and the run's folder are given on the command line (Makefile, demo).
"""
encoder = "efficientnet-lite0"
encoder_weights = "imagenet"
image_size = 128
loss = "bce+dice"
head = False
augment = "recipe"
optimizer = "adamw"
lr = 0.002
weight_decay = 0.01
lr_schedule = "onecycle"
batch_size = 8
epochs = 5
expand = 2
cpu_bf16 = False
seed = 42
group_near_duplicates = False
