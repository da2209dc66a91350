"""Model architectures: the bundled pretrained digits CNN and weight-free ResNet skeletons."""
