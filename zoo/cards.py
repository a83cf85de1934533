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
    """Store ``x`` and ``model(x)`` (the packed model's output) next to the checkpoint. A float batch of
    images in [0, 1] is first rounded to 8-bit levels (k/255) and stored as its uint8 codes, a quarter of
    float32's bytes; the output is the model's on exactly those values. Other inputs are stored as they are."""
    x = x.detach()
    codes = None
    if x.is_floating_point() and x.numel() and x.min() >= 0 and x.max() <= 1:
        codes = (x.float() * 255).round().to(torch.uint8)
        x = codes.float() / 255
    with torch.no_grad():
        y = model(x)
    path = Path(directory) / GOLDEN
    inputs = {"input_u8": codes.contiguous()} if codes is not None else {"input": x.contiguous()}
    save_file({**inputs, "output": y.contiguous()}, str(path))
    return path


def read_golden(directory: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, output) of a release's golden pair; 8-bit stored images come back as float32 k/255."""
    t = load_file(str(Path(directory) / GOLDEN))
    x = t["input_u8"].float() / 255 if "input_u8" in t else t["input"]
    return x, t["output"]


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

    def same_but_bits(a, b):
        return bool(a) and bool(b) and {k: v for k, v in a.items() if k != "bits"} == {k: v for k, v in b.items() if k != "bits"}

    line = f"weights {spec(q['weight'])}; activations {spec(q['act'])}"
    short = []  # layers that differ from the default only in bit widths (mixed precision): W/A compactly
    for glob, lq in (q.get("overrides") or {}).items():
        sites = (lq or {}).get("act_sites", 1)
        if lq and sites == 1 and same_but_bits(lq["weight"], q["weight"]) and same_but_bits(lq["act"], q["act"]):
            short.append(f"`{glob}` W{lq['weight']['bits']}A{lq['act']['bits']}")
            continue
        line += f"; `{glob}`: " + ("float" if not lq else f"weights {spec(lq['weight'])}, activations {spec(lq['act'])}")
        if sites > 1:
            line += f" x {sites} (one set of activation parameters per call in a forward: per level)"
    if short:
        line += "; per-layer bits (same quantizers): " + ", ".join(short)
    return line


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


def low_bit_cell(directory: str | Path) -> str:
    """``1/<ratio> (W<bits>)``: the narrowest packed layers' bytes against their float32 weights, for the
    summary tables ("—" for a float checkpoint)."""
    layers = packed_layer_bytes(directory)
    if not layers:
        return "—"
    low = min(layers)
    return f"1/{layers[low][1] / layers[low][0]:.1f} (W{low})"


def seed_cell(cfg: dict, key: str, scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std (n)`` of test metric ``key`` over the seeds a ``zoo.seeds`` release records
    (times ``scale``), or an empty string for a single run."""
    s = cfg.get("seeds")
    if not s or key not in s.get("mean", {}):
        return ""
    return f"{scale * s['mean'][key]:.{digits}f} ± {scale * s['std'][key]:.{digits}f} ({len(s['runs'])})"


def seeds_lines(cfg: dict) -> list[str]:
    """Card lines for a release trained with several seeds (``python -m zoo.seeds``)."""
    s = cfg.get("seeds")
    if not s:
        return []
    key, runs = s["metric"], s["runs"]
    per_seed = ", ".join(f"seed {seed}: {m[key]:.4f}" for seed, m in runs.items())
    stats = "; ".join(f"{k} {s['mean'][k]:.4f} ± {s['std'][k]:.4f}" for k in s["mean"]
                      if not k.endswith("_training_form") and k != "test_images")
    secs = s.get("train_seconds") or {}
    timing = ", ".join(f"{v} s" if v is not None else "resumed (not timed)" for v in secs.values())
    return [f"- **Over {len(runs)} seeds** (mean ± sample std): {stats}"
            + (f"; training time per seed: {timing}" if timing else ""),
            f"- **This checkpoint** is seed {s['selected']}, the median by {key} ({per_seed}); every "
            f"seed's run is in `{s['runs_dir']}/seed*/`"]


def made_by(cfg: dict) -> dict:
    """How a release was made: its training record, or its post-training quantization record."""
    return cfg.get("train") or cfg.get("ptq") or {}


def ptq_lines(ptq: dict) -> list[str]:
    """Card lines for a post-training quantized release (``python -m zoo.ptq``)."""
    c = ptq.get("calibration", {})
    source = (f"{c.get('n', '?')} real training samples (model inputs as training feeds them: whole images, or "
              f"the training crops of a task that trains on crops)" if c.get("data") == "real"
              else f"{c.get('n', '?')} images synthesised by {c.get('data')} from the float model alone "
                   f"({json.dumps({k: v for k, v in (c.get('synthesis') or {}).items() if k not in ('name', 'n')})})")
    then = " (then fine-tuned without labels, below)" if c.get("distill") or c.get("trained") else " (no training)"
    return [f"- **Post-training quantization{then}** of `{ptq.get('init_from', '?')}`: calibrated on "
            f"{source}; activation ranges by the {c.get('estimator', '?')} estimator; bias correction "
            f"{'on' if c.get('bias_correction') else 'off'}; weight rounding {_rounding(c)}; "
            f"{ptq.get('seconds', '?')} s on "
            f"{ptq.get('hardware', '?')} (calibration data {c.get('data_seconds', '?')} s); torch "
            f"{ptq.get('torch', '?')}"] + method_lines(c.get("method")) + generator_lines(c) + \
        distill_lines(c.get("distill")) + mixed_lines(ptq.get("mixed"))


def method_lines(m: dict | None) -> list[str]:
    """Card lines for the ViT methods of ``python -m zoo.ptq method=...`` (``zoo/ptq/vit.py``)."""
    if not m or (m.get("name") == "base" and m.get("softmax") == "uniform"):
        return []
    what = {"log2": "the log2 softmax quantizer (baseline)",
            "repq": f"RepQ-ViT: per-channel grids of the {len(m.get('reparameterised', []))} post-LayerNorm inputs "
                    f"folded into LayerNorm's affine and the next Linear (per-tensor at inference), log-sqrt(2) softmax "
                    f"quantizer",
            "apq": f"APQ-ViT: block-wise calibration of every activation range (multipliers {m.get('grid')}, "
                   f"{m.get('rounds')} rounds) on the squared-gradient-weighted block output error with the smallest "
                   f"{100 * (m.get('eliminate') or 0):.0f}% of errors eliminated, Matthew-effect preserving (MPQ) "
                   f"softmax quantizer"}.get(m.get("name"), f"{m.get('name')}, softmax {m.get('softmax')}")
    line = f"- **Method:** {what}"
    if m.get("weight_clip"):
        c = m["weight_clip"]
        line += (f"; weights clipped per output channel by RepQ-ViT's range search (quantiles "
                 f"{'/'.join(str(p) for p in c['percentiles'])}, least squared error; {c['layers']} layers)")
    if m.get("blocks"):
        drop = [1 - v["after"] / v["before"] for v in m["blocks"].values() if v["before"] > 0]
        line += f"; block loss {100 * sum(drop) / max(1, len(drop)):.0f}% below the starting ranges on average"
    return [line]


def generator_lines(c: dict) -> list[str]:
    """Card lines for a release trained on a generator's samples (``calib=ddaq|coleq``)."""
    a = c.get("trained")
    if not a:
        return []
    s = c.get("synthesis") or {}
    head = (f"the calibration images come from a generator warmed up {s.get('warmup')} steps on the float "
            f"model's BatchNorm statistics (and its cross-entropy on the sampled class); then {a.get('steps')} steps")
    q = a.get("quantized_loss", ["?", "?"])
    tail = f"quantized-model loss {q[0]} -> {q[1]}; {a.get('seconds')} s. The grid below shows the final generator's samples"
    if a.get("method") == "coleq":
        return [f"- **Then trained on generated data, no real data (CoLeQ)**: {head}, each a generator step "
                f"(statistics + {s.get('lam')} x MoCo InfoNCE against a queue of {s.get('queue')} earlier "
                f"samples, tau {s.get('tau')}) and a quantized-model step distilling the float model on the batch "
                f"plus {s.get('recover')} samples recovered from the queue by the encoder's tied-weight decoder "
                f"(`recovered.png`; lr {s.get('lr_q')}, cosine); {tail}"]
    w = a.get("layer_weights") or []
    prior = (f"layers weighted by their average Hessian trace ({min(w):.2f}..{max(w):.2f}, mean 1)"
             if s.get("layer_importance") and w else "layers weighted equally")
    return [f"- **Then trained adversarially, no real data (DDAQ)**: {head}, each a generator step (match the "
            f"statistics, maximise the float/quantized discrepancy x {s.get('beta')}) and a quantized-model step "
            f"(minimise it; lr {s.get('lr_q')}, cosine), {prior}; {tail}"]


def distill_lines(d: dict | None) -> list[str]:
    if not d:
        return []
    return [f"- **Then fine-tuned without labels** (DSG's QAT use of its data): {d.get('steps')} Adam steps "
            f"(lr {d.get('lr')}, cosine, batch {d.get('batch_size')}) on the calibration images, distilling the "
            f"float model's outputs (KL at T={d.get('temperature')}; loss {d.get('first_loss')} -> "
            f"{d.get('last_loss')}), activation ranges and BatchNorm statistics frozen; {d.get('seconds')} s"]


def _rounding(c: dict) -> str:
    r = c.get("reconstruction")
    if c.get("rounding") != "learned" or not r:
        return "to nearest"
    mse = r.get("unit_mse", {})
    drop = [1 - min(v[0], v[1]) / v[0] for v in mse.values() if v[0] > 0]
    learned = sum(1 for v in mse.values() if v[2] == "learned")
    return (f"learned by block-wise output reconstruction (AdaRound/BRECQ, {r.get('iters')} Adam steps per unit; "
            f"{learned} of {len(mse)} units keep the learned rounding, the rest nearest; unit output error "
            f"{100 * sum(drop) / max(1, len(drop)):.0f}% below nearest rounding on average)")


def mixed_lines(mixed: dict | None) -> list[str]:
    """Card lines for a mixed-precision release (``quant.overrides_from=`` a ``python -m zoo.mixed`` file)."""
    if not mixed:
        return []
    pt, b = mixed.get("point", {}), mixed.get("budget", {})
    budget = ", ".join(f"{k} <= {v}" for k, v in b.items() if v is not None) or "none (HTQ's trade-off point)"
    return [f"- **Mixed precision:** per-layer bits by {str(mixed.get('method', '?')).upper()} sensitivity on "
            f"{mixed.get('calibration', {}).get('n', '?')} images, exact Pareto front of "
            f"{mixed.get('front_size', '?')} configurations, budget {budget} ({mixed.get('size_measure', 'packed')} "
            f"size); chosen point: {pt.get('size', 0):,} bytes, {pt.get('bops', 0):,} BOPs per image; search "
            f"{mixed.get('seconds', '?')} s"]


def card_text(directory: str | Path) -> str:
    from .tasks import get_task

    directory = Path(directory)
    cfg = json.loads((directory / "config.json").read_text())
    task = get_task(cfg["task"])
    name = directory.name
    ptq = cfg.get("ptq")
    train = made_by(cfg)
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
    lines += task.card_lines(cfg, m, train) + data_lines(train, task.sample_unit) + seeds_lines(cfg)
    if task.domain(cfg):
        lines.append(f"- **Domain:** {task.domain(cfg)}")
    stored = " (float16 values; loaded into float32, computes in float32)" \
        if cfg["weights"].get("float_dtype") == "float16" else ""
    lines += [
        f"- **Weights file:** {wbytes:,} bytes{stored}; the same net in float32: {fbytes:,} bytes "
        f"({fbytes / wbytes:.1f}x smaller)",
    ]
    if cfg.get("reexported"):
        r = cfg["reexported"]
        lines.append(f"- **Re-exported** {r['date'][:10]} in the current format with `{r['command']}`: the test "
                     f"metrics are re-measured on the stored weights; the training was not repeated")
    for bits, (pb, fb) in packed_layer_bytes(directory).items():
        lines.append(f"- **{bits}-bit layers:** {pb:,} bytes packed (codes, scales, zero points, bias, "
                     f"activation parameters) vs {fb:,} bytes of float32 weights and biases "
                     f"(1/{fb / pb:.1f})")
    lines += ptq_lines(ptq) if ptq else [
        f"- **Trained on:** {train.get('hardware', '?')}, {train.get('epochs', '?')} epochs, "
        f"{train.get('global_step', '?')} steps, "
        + (f"{train['train_seconds']} s" + (" (summed over the interrupted run and its resume)"
                                             if train.get("resumed") else "")
           if train.get("train_seconds") is not None
           else "resumed from its last checkpoint, so the training time was not recorded")
        + f"; released weights: {train.get('selected', 'last epoch')}; torch {train.get('torch', '?')}; "
        f"{cfg.get('created', '')}"]
    lines += [
        "",
        "Reproduce (from the repository root):",
        "",
        "```bash",
        *([ptq["mixed"]["command"]] if ptq and (ptq.get("mixed") or {}).get("command") else []),
        train.get("command", "?"),
        "```",
        "",
        "Use:",
        "",
        "```python",
        "import zoo",
        *task.card_snippet(name, cfg),
        "```",
        "",
    ]
    lines += task.card_usage(name)
    for file, caption, alt in task.card_images:
        if (directory / file).is_file():
            lines += [caption, "", f"![{alt}]({file})", ""]
    if (directory / "synthetic.png").is_file():
        lines += ["Synthetic calibration images (the first 64; no real data was used):", "",
                  "![synthetic calibration images](synthetic.png)", ""]
    if (directory / "recovered.png").is_file():
        lines += ["Samples recovered from CoLeQ's queue by the tied-weight decoder (old-knowledge recovery):", "",
                  "![recovered samples](recovered.png)", ""]
    lines += [f"`{GOLDEN}` holds an input batch and the packed model's output; the shipped-checkpoint "
              "tests (`tests/test_shipped*.py`) check it.", ""]
    return "\n".join(lines)


def data_lines(train: dict, unit: str = "images") -> list[str]:
    """The data a release was trained on, as the run measured it: samples (``unit``) per split and the root."""
    splits = train.get("splits")
    if not splits:
        return []
    names = {"train": "train", "val": "validation", "test": "test"}
    sizes = " / ".join(f"{names.get(k, k)} {v:,}" for k, v in splits.items())
    root = f" from `{train['data_root']}`" if train.get("data_root") else ""
    return [f"- **Splits ({train.get('data', '?')}{root}):** {sizes} {unit}"]


def write_card(directory: str | Path) -> Path:
    path = Path(directory) / "README.md"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(card_text(directory))
    tmp.replace(path)
    return path


def summary_table(root: str | Path) -> str:
    """Markdown table(s) of the checkpoints under ``root`` from their config.json (the numbers their
    training commands measured on the packed models), one table per task, each in its task's layout."""
    from .tasks import get_task

    cfgs = [(p.parent, json.loads(p.read_text())) for p in sorted(Path(root).glob("*/config.json"))]
    tasks = sorted({c["task"] for _, c in cfgs})
    return "\n\n".join(get_task(t).summary_table([(d, c) for d, c in cfgs if c["task"] == t]) for t in tasks)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:
        print(summary_table(sys.argv[2]))
    else:
        for d in sys.argv[1:]:
            print(write_card(d))
