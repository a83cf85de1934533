"""Model cards and golden input/output pairs for release checkpoints.

``python -m zoo.cards DIR [DIR ...]`` (re)writes ``README.md`` of each checkpoint directory from its
``config.json``; the numbers in a card are the ones the training command measured and stored there.
``python -m zoo.cards --table checkpoints/cls`` prints the summary table of the top-level README.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

GOLDEN = "golden.safetensors"


def write_golden(model, x: torch.Tensor, directory: str | Path) -> Path:
    """Store ``x`` and ``model(x)`` (the packed model's output) next to the checkpoint."""
    with torch.no_grad():
        y = model(x)
    path = Path(directory) / GOLDEN
    save_file({"input": x.contiguous(), "output": y.contiguous()}, str(path))
    return path


def read_golden(directory: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    t = load_file(str(Path(directory) / GOLDEN))
    return t["input"], t["output"]


def float_reference_bytes(cfg: dict) -> int:
    """Size of the same architecture's float32 weights saved as safetensors."""
    from .registry import create_model

    net = create_model(cfg["arch"], **cfg.get("model_args", {}))
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "fp32.safetensors"
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(p))
        return p.stat().st_size


def _quant_line(q: dict | None) -> str:
    if not q:
        return "none (float32)"

    def spec(s):
        if not s:
            return "float"
        extra = ", ".join(f"{k}={v}" for k, v in s.items() if k not in ("type", "bits"))
        return f"{s['type']} {s['bits']}-bit" + (f" ({extra})" if extra else "")

    line = f"weights {spec(q['weight'])}; activations {spec(q['act'])}"
    for glob, lq in (q.get("overrides") or {}).items():
        line += f"; `{glob}`: " + ("float" if not lq else f"weights {spec(lq['weight'])}, activations {spec(lq['act'])}")
    return line


def _cls_lines(cfg: dict, m: dict, train: dict) -> list[str]:
    lines = [f"- **Data:** {train.get('data', '?')} (train 55,000 / validation 5,000 held out of the "
             f"train split; test: the {m.get('test_images', '?')}-image test split)"]
    if m.get("test_acc") is not None:
        lines.append(f"- **Test top-1 (packed model, as loaded by `zoo.load`):** {100 * m['test_acc']:.2f}% "
                     f"(training form: {100 * m.get('test_acc_training_form', float('nan')):.2f}%)")
    return lines


def _sr_lines(cfg: dict, m: dict, train: dict) -> list[str]:
    from .tasks.data.sr import BUILTIN_TEST, BUILTIN_TRAIN, BUILTIN_VAL

    s = cfg["input_contract"].get("scale", "?")
    data = train.get("data", "?")
    if data == "sr_images":
        data = (f"sr_images: photos bundled with scikit-image/scikit-learn, LR by MATLAB-style bicubic "
                f"x1/{s}; train {', '.join(BUILTIN_TRAIN)}; validation {', '.join(BUILTIN_VAL)}; "
                f"test {', '.join(BUILTIN_TEST)} (never trained or validated on)")
    lines = [f"- **Scale:** x{s}", f"- **Data:** {data}"]
    if m.get("test_psnr") is not None:
        lines.append(
            f"- **Test PSNR / SSIM** (Y channel, border {s} cropped, mean over {m.get('test_images', '?')} "
            f"images; packed model as loaded by `zoo.load`): **{m['test_psnr']:.2f} dB / "
            f"{m['test_ssim']:.4f}**; bicubic on the same images: {m['test_bicubic_psnr']:.2f} dB / "
            f"{m['test_bicubic_ssim']:.4f} (model {m['test_psnr'] - m['test_bicubic_psnr']:+.2f} dB)")
        depths = sorted((k for k in m if k.startswith("test_psnr_depth")),
                        key=lambda k: -int(k.rsplit("depth", 1)[1]))
        if depths:
            lines.append("- **DQA, fewer quantized blocks at inference** (`zoo.load(..., depth=d)`): "
                         + "; ".join(f"depth {k.rsplit('depth', 1)[1]}: {m[k]:.2f} dB" for k in depths))
    return lines


def packed_layer_bytes(directory: str | Path) -> dict[int, tuple[int, int]]:
    """{weight bits: (bytes the packed layers of that width take in the weights file, bytes of the
    same layers' float32 weight and bias)} for a quantized checkpoint; {} for a float one."""
    from safetensors import safe_open

    from .quantizers import QuantConfig
    from .registry import create_model

    directory = Path(directory)
    cfg = json.loads((directory / "config.json").read_text())
    if not cfg.get("quant"):
        return {}
    qcfg = QuantConfig.from_dict(cfg["quant"])
    float_params = dict(create_model(cfg["arch"], **cfg.get("model_args", {})).named_parameters())
    out: dict[int, list[int]] = {}
    with safe_open(str(directory / cfg["weights"]["file"]), "pt") as f:
        keys = list(f.keys())
        layers = [k[: -len(".qweight")] for k in keys if k.endswith(".qweight")]
        for layer in layers:
            bits = qcfg.for_layer(layer.removeprefix("net.")).weight.bits
            packed = sum(_nbytes(f, k) for k in keys if k.startswith(layer + "."))
            fp = sum(4 * p.numel() for n, p in float_params.items()
                     if n in (layer.removeprefix("net.") + ".weight", layer.removeprefix("net.") + ".bias"))
            acc = out.setdefault(bits, [0, 0])
            acc[0] += packed
            acc[1] += fp
    return {b: (p, fp) for b, (p, fp) in sorted(out.items())}


def _nbytes(f, key: str) -> int:
    t = f.get_tensor(key)
    return t.numel() * t.element_size()


def _sal_lines(cfg: dict, m: dict, train: dict) -> list[str]:
    from .tasks.data.sr import BUILTIN_TEST, BUILTIN_TRAIN, BUILTIN_VAL

    size = cfg["input_contract"].get("train_size")
    data = train.get("data", "?")
    if data == "sal_composites":
        data = (f"sal_composites: 1-3 Fashion-MNIST items (exact masks) pasted over crops of bundled "
                f"photos, {size[0]}x{size[1]}; train: items 0-49,999 over {', '.join(BUILTIN_TRAIN)}; "
                f"validation: items 50,000-59,999 over {', '.join(BUILTIN_VAL)}; test: the Fashion-MNIST "
                f"test items over {', '.join(BUILTIN_TEST)} (no item or photo shared between splits)")
    lines = [f"- **Data:** {data}"]
    if m.get("test_mae") is not None:
        lines.append(f"- **Test** ({m.get('test_images', '?')} images; packed model as loaded by `zoo.load`): "
                     f"**MAE {m['test_mae']:.4f}, max F-measure {m['test_maxf']:.4f}, "
                     f"S-measure {m['test_smeasure']:.4f}** (training form: MAE "
                     f"{m.get('test_mae_training_form', float('nan')):.4f})")
    return lines


TASK_LINES = {"cls": _cls_lines, "sr": _sr_lines, "sal": _sal_lines}


def card_text(directory: str | Path) -> str:
    directory = Path(directory)
    cfg = json.loads((directory / "config.json").read_text())
    name = directory.name
    train = cfg.get("train", {})
    m = cfg.get("metrics", {})
    wbytes = cfg["weights"]["bytes"]
    fbytes = float_reference_bytes(cfg)
    lines = [
        f"# {name}",
        "",
        f"Task `{cfg['task']}`, architecture `{cfg['arch']}` with `{json.dumps(cfg.get('model_args', {}))}`.",
        "",
        f"- **Quantization:** {_quant_line(cfg.get('quant'))}",
    ]
    lines += TASK_LINES.get(cfg["task"], lambda *a: [])(cfg, m, train)
    lines += [
        f"- **Weights file:** {wbytes:,} bytes; the same net in float32: {fbytes:,} bytes "
        f"({fbytes / wbytes:.1f}x smaller)",
    ]
    for bits, (pb, fb) in packed_layer_bytes(directory).items():
        lines.append(f"- **{bits}-bit layers:** {pb:,} bytes packed (codes, scales, zero points, bias, "
                     f"activation parameters) vs {fb:,} bytes of float32 weights and biases "
                     f"(1/{fb / pb:.1f})")
    lines += [
        f"- **Trained on:** {train.get('hardware', '?')}, {train.get('epochs', '?')} epochs, "
        f"{train.get('global_step', '?')} steps, "
        + (f"{train['train_seconds']} s" if train.get("train_seconds") is not None
           else "resumed from its last checkpoint, so the training time was not recorded")
        + f"; released weights: {train.get('selected', 'last epoch')}; torch {train.get('torch', '?')}; "
        f"{cfg.get('created', '')}",
        "",
        "Reproduce (from the repository root):",
        "",
        "```bash",
        train.get("command", "?"),
        "```",
        "",
        "Use:",
        "",
        "```python",
        "import zoo",
        f'model = zoo.load("{name}")  # images in [0, 1], N x {cfg["input_contract"]["channels"]} x H x W',
        "```",
        "",
    ]
    if cfg["task"] == "sr":
        lines += ["or `python -m zoo.predict " + name + " photo.png --out upscaled/`.", ""]
    if cfg["task"] == "sal":
        lines += ["or `python -m zoo.predict " + name + " photos/ --out masks/` (a mask and an overlay "
                  "per image).", ""]
    if (directory / "sample.png").is_file() and cfg["task"] == "sal":
        lines += ["Fixed test composites: image | ground truth | this model's saliency map:", "",
                  "![image | ground truth | prediction](sample.png)", ""]
    elif (directory / "sample.png").is_file():
        lines += ["Centre crop of the first test image: bicubic | this model | ground truth:", "",
                  "![bicubic | model | HR](sample.png)", ""]
    lines += [f"`{GOLDEN}` holds an input batch and the packed model's output; `tests/test_shipped.py` checks it.",
              ""]
    return "\n".join(lines)


def write_card(directory: str | Path) -> Path:
    path = Path(directory) / "README.md"
    path.write_text(card_text(directory))
    return path


def summary_table(root: str | Path) -> str:
    """Markdown table of the checkpoints under ``root`` from their config.json (the numbers their
    training commands measured on the packed models)."""
    cfgs = [(p.parent, json.loads(p.read_text())) for p in sorted(Path(root).glob("*/config.json"))]
    if cfgs and cfgs[0][1]["task"] == "sr":
        return _sr_table(cfgs)
    if cfgs and cfgs[0][1]["task"] == "sal":
        return _sal_table(cfgs)
    rows, fp = [], None
    for cfg_path, cfg in ((d / "config.json", c) for d, c in cfgs):
        acc = cfg.get("metrics", {}).get("test_acc")
        if cfg.get("quant") is None:
            fp = acc
        rows.append((cfg_path.parent, acc, cfg["weights"]["bytes"], float_reference_bytes(cfg)))
    out = ["| model | test top-1 % | vs FP32 (points) | weights file bytes | vs FP32 file |",
           "|---|---|---|---|---|"]
    for path, acc, wb, fb in rows:
        gap = f"{100 * (acc - fp):+.2f}" if fp is not None and acc is not None else "n/a"
        top1 = f"{100 * acc:.2f}" if acc is not None else "n/a"
        out.append(f"| [{path.name}]({path}/README.md) | {top1} | {gap} | {wb:,} | 1/{fb / wb:.1f} |")
    return "\n".join(out)


def _sr_table(cfgs) -> str:
    fp = {(c["arch"], c["input_contract"]["scale"]): c["metrics"].get("test_psnr")
          for _, c in cfgs if not c.get("quant")}
    out = ["| model | scale | PSNR dB | vs FP32 (same arch) dB | vs bicubic dB | SSIM | weights file bytes | vs FP32 file |",
           "|---|---|---|---|---|---|---|---|"]
    key = lambda dc: (-dc[1]["input_contract"]["scale"], dc[1]["arch"], bool(dc[1].get("quant")),  # noqa: E731
                      dc[0].name)
    for path, cfg in sorted(cfgs, key=key):
        m, s = cfg.get("metrics", {}), cfg["input_contract"]["scale"]
        psnr, ref = m.get("test_psnr"), fp.get((cfg["arch"], s))
        gap = f"{psnr - ref:+.2f}" if psnr is not None and ref is not None else "n/a"
        bic = f"{psnr - m['test_bicubic_psnr']:+.2f}" if psnr is not None else "n/a"
        wb, fb = cfg["weights"]["bytes"], float_reference_bytes(cfg)
        out.append(f"| [{path.name}]({path}/README.md) | x{s} | {psnr:.2f} | {gap} | {bic} | "
                   f"{m.get('test_ssim', float('nan')):.4f} | {wb:,} | 1/{fb / wb:.1f} |")
    return "\n".join(out)


def _sal_table(cfgs) -> str:
    fp = {c["arch"]: c["metrics"].get("test_mae") for _, c in cfgs if not c.get("quant")}
    out = ["| model | MAE | vs FP32 (same arch) | max F | S-measure | weights file bytes | vs FP32 file "
           "| low-bit layers vs FP32 |", "|---|---|---|---|---|---|---|---|"]
    key = lambda dc: (dc[1]["arch"], bool(dc[1].get("quant")), dc[0].name)  # noqa: E731
    for path, cfg in sorted(cfgs, key=key):
        m = cfg.get("metrics", {})
        ref = fp.get(cfg["arch"])
        gap = f"{m['test_mae'] - ref:+.4f}" if cfg.get("quant") and ref is not None else "—"
        wb, fb = cfg["weights"]["bytes"], float_reference_bytes(cfg)
        layers = packed_layer_bytes(path)
        low = min(layers) if layers else None
        lb = f"1/{layers[low][1] / layers[low][0]:.1f} (W{low})" if low is not None else "—"
        out.append(f"| [{path.name}]({path}/README.md) | {m['test_mae']:.4f} | {gap} | {m['test_maxf']:.4f} | "
                   f"{m['test_smeasure']:.4f} | {wb:,} | 1/{fb / wb:.1f} | {lb} |")
    return "\n".join(out)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:
        print(summary_table(sys.argv[2]))
    else:
        for d in sys.argv[1:]:
            print(write_card(d))
