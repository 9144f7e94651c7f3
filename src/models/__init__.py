"""Model builders: CIFAR-style ResNet/VGG, torchvision and timm wrappers adapted to the dataset."""
