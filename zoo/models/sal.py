"""segmentation-models-pytorch's U-Net, LinkNet and UNet++ (salient-object detection), unchanged.

The factories only choose arguments: a ResNet-18/34 encoder with random initialisation
(``encoder_weights=None``: nothing is downloaded) and, by default, a CPU-sized network: the first
``encoder_depth=3`` stages of the encoder (down to stride 8) and a narrow decoder; ``task=sal``
builds them with ``encoder_depth=4`` (stride 16, its ``task.model_args``). Pass ``encoder_depth=5``
and smp's default ``decoder_channels`` for the full-size models. smp is imported
only when one of these is built.
"""
from __future__ import annotations

from ..registry import register_model

# decoder widths (from the deepest stage up) for each encoder depth, U-Net and UNet++
DECODER_CHANNELS = {3: (64, 32, 16), 4: (128, 64, 32, 16), 5: (256, 128, 64, 32, 16)}


def import_smp():
    try:
        import segmentation_models_pytorch as smp
    except ImportError as e:
        raise ImportError("the saliency architectures need segmentation-models-pytorch: "
                          "pip install -c constraints.txt -e '.[sal]'") from e
    return smp


def _build(cls_name: str, encoder: str, encoder_depth: int, in_chans: int, classes: int,
           decoder_channels, **kwargs):
    smp = import_smp()
    if encoder_depth not in DECODER_CHANNELS:
        raise ValueError(f"encoder_depth={encoder_depth!r}; valid: {sorted(DECODER_CHANNELS)}")
    kwargs.setdefault("encoder_weights", None)
    if kwargs["encoder_weights"] is not None:
        raise ValueError("encoder_weights must be None: nothing is downloaded at run time "
                         "(train from scratch or load a zoo float checkpoint with init_from=)")
    if cls_name != "Linknet":  # LinkNet's decoder widths follow its encoder
        kwargs["decoder_channels"] = tuple(decoder_channels or DECODER_CHANNELS[encoder_depth])
    elif decoder_channels is not None:
        raise ValueError("linknet has no decoder_channels argument (its widths follow the encoder)")
    net = getattr(smp, cls_name)(encoder_name=encoder, encoder_depth=encoder_depth,
                                 in_channels=in_chans, classes=classes, **kwargs)
    # smp builds all four ResNet stages whatever the depth and skips the unused ones in forward;
    # drop them so they are neither stored, quantized nor handed to the optimizer
    for stage in range(encoder_depth, 5):
        delattr(net.encoder, f"layer{stage}")
    return net


def _factory(name: str, cls_name: str, encoder: str):
    def factory(encoder_depth: int = 3, in_chans: int = 3, classes: int = 1, decoder_channels=None,
                **kwargs):
        return _build(cls_name, encoder, encoder_depth, in_chans, classes, decoder_channels, **kwargs)

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = (f"smp.{cls_name} with a randomly initialised {encoder} encoder "
                       f"(default: CPU-sized, encoder_depth=3).")
    return register_model(factory)


unet_r18 = _factory("unet_r18", "Unet", "resnet18")
unet_r34 = _factory("unet_r34", "Unet", "resnet34")
linknet_r18 = _factory("linknet_r18", "Linknet", "resnet18")
linknet_r34 = _factory("linknet_r34", "Linknet", "resnet34")
unetpp_r18 = _factory("unetpp_r18", "UnetPlusPlus", "resnet18")
unetpp_r34 = _factory("unetpp_r34", "UnetPlusPlus", "resnet34")
