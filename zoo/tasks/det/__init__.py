"""Object detection (``task=det``): torchvision FCOS / RetinaNet on a narrow ResNet-18 + FPN
(``zoo.models.det``), COCO mAP / mAP50 / mAP75."""
