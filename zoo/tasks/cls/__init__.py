"""Image classification (``task=cls``): Fashion-MNIST or an ImageFolder tree, top-1 accuracy."""
