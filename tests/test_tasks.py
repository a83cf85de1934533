import torch

import zoo
from zoo.quantizers import QuantConv2d
from zoo.quantizers.binary import IRNetWeight
from zoo.tasks import ClassificationTask

CONTRACT = {"channels": 1, "size": [16, 16], "mean": [0.5], "std": [0.25], "classes": list("abcd")}
ARGS = {"in_chans": 1, "num_classes": 4, "width": 4}


def test_configure_model_is_idempotent_and_quantizes():
    q = zoo.QuantConfig(weight=zoo.LSQ(4), act=zoo.LSQ(4)).to_dict()
    t = ClassificationTask("resnet20", ARGS, CONTRACT, quant=q)
    t.configure_model()
    model = t.model
    conv = model.net.layers[0].conv1
    t.configure_model()
    assert t.model is model and model.net.layers[0].conv1 is conv
    assert isinstance(conv, QuantConv2d)


def test_init_from_float_checkpoint_and_teacher(tmp_path):
    fp = ClassificationTask("resnet20", ARGS, CONTRACT)
    fp.configure_model()
    zoo.save(fp.model, tmp_path / "fp")
    q = zoo.QuantConfig(weight=zoo.IRNet(), act=zoo.IRNet()).to_dict()
    t = ClassificationTask("resnet20", {**ARGS, "act": "hardtanh", "per_conv_shortcut": True}, CONTRACT,
                           quant=q, init_from=str(tmp_path / "fp"), distill=0.5)
    t.configure_model()
    assert torch.equal(t.model.net.layers[0].conv1.weight, fp.model.net.layers[0].conv1.weight)
    assert t.teacher is not None and not any(p.requires_grad for p in t.teacher.parameters())
    # the teacher is not part of the saved/optimised module tree
    assert not any(k.startswith("_teacher") for k in t.state_dict())
    x = torch.rand(4, 1, 16, 16)
    student = t.model(x)
    assert t.distill_loss(student, x).item() >= 0
    # a quantized release cannot be a QAT starting point
    zoo.save(t.model, tmp_path / "q")
    bad = ClassificationTask("resnet20", ARGS, CONTRACT, quant=q, init_from=str(tmp_path / "q"))
    try:
        bad.configure_model()
    except ValueError as e:
        assert "quantized checkpoint" in str(e)
    else:
        raise AssertionError("expected a ValueError")


def test_progress_drives_ede_schedule():
    q = zoo.QuantConfig(weight=zoo.IRNet(), act=zoo.IRNet()).to_dict()
    t = ClassificationTask("resnet20", ARGS, CONTRACT, quant=q)
    t.configure_model()
    zoo.quantizers.set_progress(t.model, 1.0)
    wq = [m for m in t.model.modules() if isinstance(m, IRNetWeight)]
    assert wq and all(abs(m.t.item() - 10.0) < 1e-5 and m.k.item() == 1.0 for m in wq)
