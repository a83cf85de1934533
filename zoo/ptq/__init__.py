"""Post-training quantization: calibrate a float model into a packed low-bit one without training.

    import zoo, zoo.ptq
    q = zoo.ptq.calibrate(float_model, zoo.ptq.ptq_config(4, keep={"stem": 8, "fc": 8}), images, "mse")
    zoo.save(q, "my_release")
    images = zoo.ptq.synthesize(float_model, "dsg", n=256, seed=0)   # data-free calibration images
    zoo.ptq.ddaq.adversarial(q, float_model, generator)               # DDAQ's second stage (see zoo.ptq.ddaq)
"""
from . import ddaq
from .calibrate import batches, calibrate, ptq_config
from .estimators import ESTIMATORS, RangeObserver, estimate_range
from .synthesize import METHODS, correlation_loss, dsg_loss, synthesize, zeroq_loss

__all__ = ["calibrate", "ptq_config", "batches", "estimate_range", "RangeObserver", "ESTIMATORS", "synthesize",
           "zeroq_loss", "dsg_loss", "correlation_loss", "METHODS", "ddaq"]
