"""Mixed precision: per-layer sensitivity (HAWQ, HTQ), the exact 3-D Pareto front over (perturbation,
packed size, BOPs), HTQ's automatic trade-off point or a budget, and the per-layer bit widths as a
``QuantConfig`` (``apply_bits``) or a file for ``quant.overrides_from=``.

    import zoo, zoo.mixed
    s = zoo.mixed.sensitivity(float_model, batches, "htq", layers)
    table = zoo.mixed.layer_table(float_model, (1, 28, 28), layers)
    front = zoo.mixed.pareto_front(zoo.mixed.layer_options(s, table, (2, 3, 4, 8), (2, 3, 4, 8)))
    bits = front.bits(zoo.mixed.within_budget(front, size=140_000))
    cfg = zoo.mixed.apply_bits(zoo.ptq.ptq_config(4, keep={"stem": 8, "fc": 8}), bits)

From the command line: ``python -m zoo.mixed`` (see ``zoo/configs/mixed.yaml``).
"""
from .search import (Front, all_options, apply_bits, layer_options, layer_table, load_bits, nondominated,
                     pareto_front, plot_front, save_bits, tradeoff_point, uniform_point, within_budget)
from .measure import METHODS, Sensitivity, sensitivity, spearman

__all__ = ["sensitivity", "Sensitivity", "spearman", "METHODS", "layer_table", "layer_options", "all_options",
           "nondominated", "pareto_front", "Front", "tradeoff_point", "within_budget", "uniform_point",
           "apply_bits", "save_bits", "load_bits", "plot_front"]
