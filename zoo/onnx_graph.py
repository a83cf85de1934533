"""Graph passes on an exported ONNX model (``zoo.export.onnx`` runs them in :func:`run_passes`' order):
the exact int8 codes as initializers, BatchNorm folded into the weight scales, integer Clips, quantizers
moved before nearest resizes and concats, float weights for convs that no integer kernel can run, and
int32 biases. Each takes an ``onnx.ModelProto``, edits it in place and returns how many places it
changed; the module docstring of :mod:`zoo.export` says what the graph is and where it differs from the
reference."""
from __future__ import annotations


def run_passes(model, int8_kernels: bool = True) -> None:
    """Every pass, in order (``int8_kernels``: :func:`int32_biases` too)."""
    int8_weights(model)
    fold_batchnorm(model)
    integer_clips(model)
    quantize_before_resize_and_concat(model)
    float_weights_for_float_convs(model)
    if int8_kernels:
        int32_biases(model)


def _consts(graph) -> dict:
    import onnx.numpy_helper as nh

    import onnx.helper as oh

    out = {i.name: nh.to_array(i) for i in graph.initializer}
    for n in graph.node:  # in graph order: an Identity or Cast of a constant is a constant
        if n.op_type == "Constant":
            out[n.output[0]] = nh.to_array(n.attribute[0].t)
        elif n.op_type == "Identity" and n.input[0] in out:
            out[n.output[0]] = out[n.input[0]]
        elif n.op_type == "Cast" and n.input[0] in out:
            to = next(a.i for a in n.attribute if a.name == "to")
            out[n.output[0]] = out[n.input[0]].astype(oh.tensor_dtype_to_np_dtype(to))
    return out


def _links(g) -> tuple[dict, dict]:
    """(tensor name -> the node producing it, tensor name -> the nodes reading it)."""
    producer = {o: n for n in g.node for o in n.output}
    users = {}
    for n in g.node:
        for i in n.input:
            users.setdefault(i, []).append(n)
    return producer, users


def _axis(node) -> int:
    return next((a.i for a in node.attribute if a.name == "axis"), 1)


def int8_weights(model) -> int:
    """QuantizeLinear of a constant weight -> the int8 initializer it computes (exact codes); returns
    how many weights were replaced."""
    import numpy as np
    import onnx.numpy_helper as nh

    g = model.graph
    consts = _consts(g)
    done, keep = 0, []
    for n in g.node:
        if n.op_type == "QuantizeLinear" and n.input[0] in consts and n.input[1] in consts:
            w, s = consts[n.input[0]].astype(np.float32), consts[n.input[1]].astype(np.float32)
            zp = consts[n.input[2]] if len(n.input) > 2 and n.input[2] in consts else np.zeros((), np.uint8)
            if s.ndim:
                shape = [1] * w.ndim
                shape[_axis(n) % w.ndim] = -1
                s, zpb = s.reshape(shape), zp.reshape(shape)
            else:
                zpb = zp
            info = np.iinfo(zp.dtype)
            q = np.clip(np.round(w / s) + zpb.astype(np.int64), info.min, info.max).astype(zp.dtype)
            g.initializer.append(nh.from_array(q, n.output[0] + "_codes"))
            for m in g.node:
                for i, name in enumerate(m.input):
                    if name == n.output[0]:
                        m.input[i] = n.output[0] + "_codes"
            done += 1
        else:
            keep.append(n)
    _set_nodes(g, keep)
    return done


def integer_clips(model) -> int:
    """Clip(x, lo, hi) -> QuantizeLinear  ==>  QuantizeLinear -> Clip(codes) on the (u)int8 codes (the same
    codes: clamp(round(x / s) + zp, qmin, qmax)), so the float op before the Clip can fuse with the
    QuantizeLinear into an integer kernel (QLinearConv) and the Clip runs on integers. Returns how
    many were rewritten."""
    import numpy as np
    import onnx.helper as oh
    import onnx.numpy_helper as nh

    g = model.graph
    consts = _consts(g)
    _, users = _links(g)
    out, done = [], 0
    pending = {}
    for n in g.node:
        if n.op_type == "Clip" and len(n.input) == 3 and all(i in consts for i in n.input[1:]) \
                and len(users.get(n.output[0], [])) == 1 and users[n.output[0]][0].op_type == "QuantizeLinear":
            q = users[n.output[0]][0]
            if q.input[1] in consts and len(q.input) > 2 and q.input[2] in consts and consts[q.input[1]].ndim == 0:
                pending[id(q)] = n
                continue  # the Clip moves after its QuantizeLinear
        out.append(n)
        clip = pending.pop(id(n), None)
        if clip is not None:
            s, zp = float(consts[n.input[1]]), consts[n.input[2]]
            lo, hi = (np.array(np.round(float(consts[i]) / s) + int(zp), dtype=zp.dtype) for i in clip.input[1:])
            codes = n.output[0]
            n.input[0] = clip.input[0]
            n.output[0] = codes + "_unclipped"
            g.initializer.extend([nh.from_array(lo, codes + "_min"), nh.from_array(hi, codes + "_max")])
            out.append(oh.make_node("Clip", [n.output[0], codes + "_min", codes + "_max"], [codes],
                                    name=(clip.name or codes) + "_codes"))
            done += 1
    _set_nodes(g, out)
    return done


def int32_biases(model) -> int:
    """The float bias of a Conv between a DequantizeLinear activation (scale s_a) and per-channel
    DequantizeLinear weights (s_w) -> an int32 initializer round(b / (s_a s_w)) with its
    DequantizeLinear, as an integer kernel adds it (onnxruntime would otherwise do this itself and, on
    the way, requantize float weights it finds there). Returns how many were converted."""
    import numpy as np
    import onnx.helper as oh
    import onnx.numpy_helper as nh

    g = model.graph
    consts = _consts(g)
    producer = {o: n for n in g.node for o in n.output}
    out, done = [], 0
    for n in g.node:
        a = producer.get(n.input[0]) if n.op_type == "Conv" else None
        w = producer.get(n.input[1]) if a is not None else None
        if (a is not None and w is not None and len(n.input) > 2 and n.input[2] in consts
                and a.op_type == w.op_type == "DequantizeLinear" and a.input[1] in consts and w.input[1] in consts
                and consts[a.input[1]].ndim == 0 and w.input[0] in consts):
            scale = (float(consts[a.input[1]]) * consts[w.input[1]].astype(np.float32)).astype(np.float32)
            b = consts[n.input[2]].astype(np.float64)
            scale = np.broadcast_to(scale, b.shape).astype(np.float32)
            codes = np.round(b / scale.astype(np.float64))
            if np.all(np.abs(codes) < 2 ** 31 - 1) and np.all(scale > 0):
                name = n.output[0] + "_bias_int32"  # unique per conv (biases may be shared)
                g.initializer.extend([nh.from_array(codes.astype(np.int32), name),
                                      nh.from_array(scale, name + "_scale")])
                out.append(oh.make_node("DequantizeLinear", [name, name + "_scale"], [name + "_dq"], axis=0,
                                        name=name + "_dq"))
                n.input[2] = name + "_dq"
                done += 1
        out.append(n)
    _set_nodes(g, out)
    return done


def _feeds_quantizer_only(name: str, users: dict) -> bool:
    """Whether every consumer of ``name`` is a QuantizeLinear, directly or through one Relu whose own
    consumers all are (what onnxruntime's QDQ selector needs to fuse ``DQ -> Conv -> Q``: its
    ``QLinearConv`` ends in the next layer's codes, and a Relu before a zero-point-0 Q is dropped)."""
    us = users.get(name, [])
    if not us:
        return False
    for u in us:
        if u.op_type == "Relu" and len(users.get(u.output[0], [])) >= 1:
            if not all(v.op_type == "QuantizeLinear" for v in users[u.output[0]]):
                return False
        elif u.op_type != "QuantizeLinear":
            return False
    return True


def float_weights_for_float_convs(model) -> int:
    """A Conv whose output does not feed a quantizer (a residual block's second conv, before the float
    add; a decoder conv before a Resize or Concat; an output head) cannot become an integer kernel:
    onnxruntime runs it as a float conv, and since it never constant-folds a ``DequantizeLinear``, it
    would dequantize the int8 weight on every run and convolve with a weight it cannot prepack. Such a
    conv gets the dequantized weight as a float32 initializer instead — the same values
    ``DequantizeLinear`` computes, ``float32(q - zp) * float32(s)`` per channel — so onnxruntime prepacks
    it like any float model's weight (its fast blocked float conv). Run before :func:`int32_biases`,
    which then leaves these convs' float biases unrounded. Returns how many weights were replaced."""
    import numpy as np
    import onnx.numpy_helper as nh

    g = model.graph
    consts = _consts(g)
    producer, users = _links(g)
    done = 0
    for n in g.node:
        if n.op_type not in ("Conv", "ConvTranspose") or _feeds_quantizer_only(n.output[0], users):
            continue
        dq = producer.get(n.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or len(users.get(dq.output[0], [])) != 1 \
                or not all(i in consts for i in dq.input if i):
            continue
        q, s = consts[dq.input[0]], consts[dq.input[1]].astype(np.float32)
        zp = consts[dq.input[2]] if len(dq.input) > 2 and dq.input[2] else np.zeros((), q.dtype)
        if s.ndim:  # per channel along the node's axis
            shape = [1] * q.ndim
            shape[_axis(dq) % q.ndim] = -1
            s, zp = s.reshape(shape), zp.reshape(shape)
        w = (q.astype(np.int32) - zp.astype(np.int32)).astype(np.float32) * s  # float32 product, rounded once
        name = dq.output[0] + "_float"
        g.initializer.append(nh.from_array(w.astype(np.float32), name))
        n.input[1] = name
        done += 1
    used = {i for m in g.node for i in m.input} | {o.name for o in g.output}
    _set_nodes(g, [n for n in g.node if n.op_type != "DequantizeLinear" or n.output[0] in used])
    return done


def quantize_before_resize_and_concat(model) -> int:
    """Concat(Resize_nearest(a), b, ...) -> QuantizeLinear  ==>  Concat(Resize_nearest(Q(a)), Q(b), ...), and
    Resize_nearest(a) -> QuantizeLinear  ==>  Resize_nearest(Q(a)), on the codes: a per-tensor
    QuantizeLinear is elementwise, and a nearest-neighbour resize and a concat only copy elements, so the
    codes are the same. It lets the op before the resize (a U-Net decoder's last conv and its ReLU) end in
    a QuantizeLinear, which onnxruntime fuses into ``QLinearConv``, and the resize and concat move uint8
    codes instead of float32; a ``Shape`` of the resized tensor (the resize's output size) reads the
    codes' shape, the same. Returns how many quantizers were moved."""
    import onnx.helper as oh

    g = model.graph
    consts = _consts(g)
    producer, users = _links(g)

    def nearest(n) -> bool:
        return n.op_type == "Resize" and any(a.name == "mode" and a.s == b"nearest" for a in n.attribute)

    added, dropped, done = {}, set(), 0

    def quantize(t: str, q, name: str, before, resized: bool) -> str:
        """A QuantizeLinear of tensor t with q's scale and zero point, placed before node `before`. For a
        resize's input (``resized``), a Shape of t reads the codes instead (the same shape), so the op
        making t feeds only the quantizer."""
        added.setdefault(id(before), []).append(oh.make_node("QuantizeLinear", [t, *q.input[1:]], [name], name=name))
        for u in users.get(t, []) if resized else []:
            if u.op_type == "Shape":
                u.input[0] = name
        return name

    for q in g.node:
        c = producer.get(q.input[0]) if q.op_type == "QuantizeLinear" else None
        if (c is None or not (c.op_type == "Concat" or nearest(c)) or len(users.get(c.output[0], [])) != 1
                or not all(i in consts for i in q.input[1:]) or consts[q.input[1]].ndim != 0):
            continue
        if c.op_type == "Concat":
            for k, t in enumerate(list(c.input)):
                r = producer.get(t)
                if r is not None and nearest(r) and len(users.get(t, [])) == 1:  # the resize copies codes
                    r.input[0] = quantize(r.input[0], q, f"{q.output[0]}_part{k}", c, True)
                else:
                    c.input[k] = quantize(t, q, f"{q.output[0]}_part{k}", c, False)
        else:
            c.input[0] = quantize(c.input[0], q, q.output[0] + "_input", c, True)
        c.output[0] = q.output[0]
        dropped.add(id(q))
        done += 1
    if not done:
        return 0
    out = []
    for n in g.node:
        if id(n) not in dropped:
            out.extend(added.get(id(n), []))
            out.append(n)
    # topological order: a new QuantizeLinear must come before the Resize that reads it
    _set_nodes(g, _toposort(out, {i.name for i in g.input} | {i.name for i in g.initializer}))
    return done


def _toposort(nodes, ready: set) -> list:
    """The nodes in an order where every input is produced before it is read (stable otherwise)."""
    ready, left, out = set(ready) | {""}, list(nodes), []
    while left:
        rest = []
        for n in left:
            if all(i in ready for i in n.input):
                out.append(n)
                ready.update(n.output)
            else:
                rest.append(n)
        if len(rest) == len(left):
            raise ValueError("the ONNX graph has a cycle or an undefined input: " + str(rest[0].input))
        left = rest
    return out


def fold_batchnorm(model) -> int:
    """Conv(x, DQ(codes, s), b) -> BatchNormalization  ==>  Conv(x, DQ(codes, s * g), b'), with
    g = gamma / sqrt(var + eps), b' = (b - mean) g + beta. Returns how many were folded."""
    import numpy as np
    import onnx.numpy_helper as nh

    g = model.graph
    consts = _consts(g)
    producer, users = _links(g)
    drop, folded = set(), 0
    for bn in g.node:
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1:
            continue
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or len(users.get(conv.output[0], [])) != 1:
            continue
        dq = producer.get(conv.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or dq.input[1] not in consts \
                or len(users.get(dq.output[0], [])) != 1 or _axis(dq) != 0:
            continue
        if not all(i in consts for i in bn.input[1:]):
            continue
        gamma, beta, mean, var = (consts[i].astype(np.float64) for i in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        k = gamma / np.sqrt(var + eps)
        scale = consts[dq.input[1]].astype(np.float64)
        if scale.shape != k.shape:  # only per-output-channel weight scales (what export_form writes)
            continue
        b = consts[conv.input[2]].astype(np.float64) if len(conv.input) > 2 and conv.input[2] else 0.0
        new_s, new_b = dq.output[0] + "_bn_scale", conv.output[0] + "_bn_bias"
        g.initializer.append(nh.from_array((scale * k).astype(np.float32), new_s))
        g.initializer.append(nh.from_array(((b - mean) * k + beta).astype(np.float32), new_b))
        dq.input[1] = new_s
        if len(conv.input) > 2:
            conv.input[2] = new_b
        else:
            conv.input.append(new_b)
        conv.output[0] = bn.output[0]
        drop.add(id(bn))
        folded += 1
    keep = [n for n in g.node if id(n) not in drop]
    _set_nodes(g, keep)
    return folded


def _set_nodes(g, nodes) -> None:
    """Replace the graph's nodes (kept in order) and drop what no node uses any more."""
    del g.node[:]
    g.node.extend(nodes)
    _drop_unused(g)


def _drop_unused(g) -> None:
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    nodes = [n for n in g.node if n.op_type != "Constant" or n.output[0] in used]
    del g.node[:]
    g.node.extend(nodes)
