"""The shipped ResNet18-UNet, stage 3 of 3, the variant "retrained from previous weights": 16 more epochs at
256x256 from stage 2's best weights, Adam 1e-4, plateau x0.1 after 2 epochs. Shipped: the epoch with the lowest
validation loss (epoch 10)."""
base = "configs/resnet18_stage2.py"
init_from = "runs/resnet18_stage2/best.safetensors"
out_dir = "runs/resnet18_retrained"
epochs = 16
