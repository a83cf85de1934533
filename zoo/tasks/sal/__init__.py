"""Salient-object detection (``task=sal``): smp's U-Net / LinkNet / UNet++, MAE / max F / S-measure."""
