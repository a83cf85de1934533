"""The ONNX form of a torchvision detector (``zoo.export.onnx``, ``backend="onnxruntime"``): the graph holds
the backbone and the heads on the transformed image batch, and outputs the heads' raw tensors (one per
head key); the transform before it (normalisation, resize) and what follows it (anchors, box decoding,
score threshold, NMS: ``postprocess_detections``, then the resize back) run in torch, with the
detector's own functions, so the detections come from the exported heads exactly as torchvision forms
them from its own."""
from __future__ import annotations

import torch
from torch import nn

from ...export import ImageForm


class _Heads(nn.Module):
    def __init__(self, net, keys):
        super().__init__()
        self.backbone, self.head, self.keys = net.backbone, net.head, keys

    def forward(self, images):
        out = self.head(list(self.backbone(images).values()))
        return tuple(out[k] for k in self.keys)


class DetectorForm(ImageForm):
    def __init__(self, model):
        super().__init__(model)
        net = model.net
        size = model.input_contract["size"]
        with torch.no_grad():  # the heads' keys and the feature map sizes, from one blank image
            images, _ = net.transform([torch.zeros(model.input_contract["channels"], *size)])
            feats = list(net.backbone(images.tensors).values())
            self.keys = tuple(sorted(net.head(feats)))
        self.levels = [tuple(f.shape[-2:]) for f in feats]
        self.output_names = self.keys

    @staticmethod
    def blocker(model) -> str | None:
        net = model.net
        if not all(hasattr(net, a) for a in ("transform", "backbone", "head", "anchor_generator")):
            return ("ONNX export covers torchvision detectors (FCOS, RetinaNet); this one "
                    f"({type(net).__name__}) is not exported")
        if not model.input_contract.get("size"):
            return "ONNX export of a detector needs its fixed input size"
        return None

    def graph(self, export_model: nn.Module) -> nn.Module:
        return _Heads(export_model.net, self.keys).eval()

    def feed(self, x: torch.Tensor):
        m = self.model
        images, _ = m.net.transform(list((x - m.mean.to(x.device)) / m.std.to(x.device)))
        return images.tensors, (images, [tuple(i.shape[-2:]) for i in x])

    def result(self, outputs, context):
        images, original = context
        net, head = self.model.net, dict(zip(self.keys, outputs))
        maps = [torch.empty(1, 1, h, w) for h, w in self.levels]  # the anchor generator reads their sizes
        anchors = net.anchor_generator(images, maps)
        per_location = [h * w for h, w in self.levels]
        a = head["cls_logits"].shape[1] // sum(per_location)  # anchors per location (RetinaNet: 9, FCOS: 1)
        split = [n * a for n in per_location]
        heads = {k: list(v.split(split, dim=1)) for k, v in head.items()}
        with torch.no_grad():
            det = net.postprocess_detections(heads, [list(t.split(split)) for t in anchors], images.image_sizes)
            return net.transform.postprocess(det, images.image_sizes, original)
