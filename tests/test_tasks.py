import pytest
import torch

import zoo
from zoo.checkpoint import round_to_storage
from zoo.quantizers import QuantConv2d
from zoo.quantizers.binary import IRNetWeight
from zoo.tasks.cls.task import ClassificationTask

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
    round_to_storage(fp.model)  # the float values its release stores (float16), so equality is exact
    zoo.save(fp.model, tmp_path / "fp")
    q = zoo.QuantConfig(weight=zoo.IRNet(), act=zoo.IRNet()).to_dict()
    t = ClassificationTask("resnet20", {**ARGS, "act": "hardtanh", "per_conv_shortcut": True}, CONTRACT,
                           quant=q, init_from=str(tmp_path / "fp"), distill=0.5)
    t.configure_model()
    assert torch.equal(t.model.net.layers[0].conv1.weight, fp.model.net.layers[0].conv1.weight)
    assert t.teacher is not None and not any(p.requires_grad for p in t.teacher.parameters())
    # the teacher is the float checkpoint in its own architecture (ReLU, plain blocks), not the
    # binary student's hardtanh / per-conv-shortcut blocks with the float weights
    assert t.teacher.model_args == ARGS and t.teacher.quant is None
    x = torch.rand(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(t.teacher(x), fp.model.eval()(x))
    # the teacher is not part of the saved/optimised module tree
    assert not any(k.startswith("_teacher") for k in t.state_dict())
    student = t.model(x)
    p_t = torch.softmax(fp.model(x), -1)  # KL(teacher || student), temperature 1
    kl = (p_t * (p_t.log() - torch.log_softmax(student, -1))).sum(-1).mean()
    torch.testing.assert_close(t.distill_loss(student, x), kl)
    # a quantized release is a fine-tuning starting point: its training form comes back exactly
    zoo.save(t.model, tmp_path / "q")
    student_args = {**ARGS, "act": "hardtanh", "per_conv_shortcut": True}
    ft = ClassificationTask("resnet20", student_args, CONTRACT, quant=q, init_from=str(tmp_path / "q"))
    ft.configure_model()
    released = zoo.load(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(ft.model.eval()(x), released(x), rtol=1e-5, atol=1e-5)
    # built with other model arguments: refused, naming them
    with pytest.raises(ValueError, match=r"other model_args: act='hardtanh' in the release, None here"):
        ClassificationTask("resnet20", ARGS, CONTRACT, quant=q, init_from=str(tmp_path / "q")).configure_model()


def test_progress_drives_ede_schedule():
    q = zoo.QuantConfig(weight=zoo.IRNet(), act=zoo.IRNet()).to_dict()
    t = ClassificationTask("resnet20", ARGS, CONTRACT, quant=q)
    t.configure_model()
    zoo.quantizers.set_progress(t.model, 1.0)
    wq = [m for m in t.model.modules() if isinstance(m, IRNetWeight)]
    assert wq and all(abs(m.t.item() - 10.0) < 1e-5 and m.k.item() == 1.0 for m in wq)


class _Trainer:
    """The attributes of a Lightning Trainer that QuantTask's schedules read."""

    def __init__(self, max_epochs, total, global_step=0):
        self.max_epochs, self.estimated_stepping_batches, self.global_step = max_epochs, total, global_step


@pytest.mark.parametrize("two_stage", [False, True])
def test_stages_lr_schedules_and_weight_quantizers(two_stage):
    q = zoo.QuantConfig(weight=zoo.IRNet(), act=zoo.IRNet()).to_dict()
    t = ClassificationTask("resnet20", ARGS, CONTRACT, quant=q, lr=0.1, two_stage=two_stage, schedule="linear")
    t.configure_model()
    t._trainer = _Trainer(max_epochs=4, total=40)  # 10 steps per epoch
    start = 20 if two_stage else 0
    assert t.stage_start() == start
    sched = t.configure_optimizers()["lr_scheduler"]["scheduler"]
    factor = sched.lr_lambdas[0]
    for step in (0, 5, 19, 20, 30, 39):
        s0, n = (0, 20) if two_stage and step < 20 else (start, 40 - start)
        assert t.stage_progress(step) == (not two_stage or step >= 20, (step - s0) / n)
        assert factor(step) == pytest.approx(1 - (step - s0) / n)  # ReActNet: linear to 0 per stage
        t._trainer.global_step = step
        t.on_train_batch_start(None, 0)
        conv = t.model.net.layers[0].conv1
        w_irnet = [m for m in t.model.modules() if isinstance(m, IRNetWeight)][0]
        assert conv.weight_quant_enabled == (not two_stage or step >= 20)
        assert (conv.quant_weight() is conv.weight) == (two_stage and step < 20)  # stage 1: float weights
        assert w_irnet.t.item() == pytest.approx(0.1 * 100 ** ((step - s0) / n))  # EDE restarts per stage
    t.on_fit_end()
    assert conv.weight_quant_enabled


def test_cosine_schedule_warms_up_then_decays():
    t = ClassificationTask("resnet20", ARGS, CONTRACT, lr=0.1)
    t.configure_model()
    t._trainer = _Trainer(max_epochs=2, total=100)
    factor = t.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    import math

    assert factor(0) == pytest.approx(0.1) and factor(5) == pytest.approx(0.55)
    assert factor(10) == pytest.approx(1.0)
    assert factor(55) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factor(100) == pytest.approx(0.01)
    with pytest.raises(ValueError, match=r"unknown schedule 'step'; valid: \['cosine', 'linear'\]"):
        ClassificationTask("resnet20", ARGS, CONTRACT, schedule="step")
