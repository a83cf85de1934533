"""save -> load -> same output (diffusers-style tester mixin), and every way a checkpoint can be bad."""
import json
import os

import pytest
import torch

import zoo
from zoo.checkpoint import CheckpointError, packed_copy, sha256_file
from zoo.quantizers import IRNet, LayerQuant, LSQ, MinMax, QuantConfig, UL2Q, XNOR

CONTRACT = {"channels": 1, "size": [16, 16], "mean": [0.5], "std": [0.25], "classes": list("abcd")}


def make(quant: QuantConfig | None, **model_args):
    args = {"in_chans": 1, "num_classes": 4, "width": 8, **model_args}
    net = zoo.create_model("resnet20", **args)
    if quant is not None:
        zoo.quantize(net, quant)
    model = zoo.ZooModel(net, "resnet20", args, "cls", CONTRACT, quant)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.rand(8, 1, 16, 16))
    return model.eval()


KEEP = {"stem": LayerQuant(MinMax(8, "channel"), MinMax(8)), "fc": LayerQuant(MinMax(8, "channel"), MinMax(8))}


class SaveLoadTesterMixin:
    """Subclasses set ``quant`` (and ``model_args``); checks save -> load -> same output."""

    quant = None
    model_args: dict = {}

    def test_save_load_same_output(self, tmp_path):
        torch.manual_seed(0)
        model = make(self.quant, **self.model_args)
        x = torch.rand(4, 1, 16, 16)
        expected = packed_copy(model)(x)  # the model as released (a float one rounded to float16)
        zoo.save(model, tmp_path / "ck", metrics={"acc": 0.5})
        loaded = zoo.load(tmp_path / "ck")
        assert not loaded.training
        out = loaded(x)
        assert (out - expected).abs().max() <= 1e-4 * expected.abs().max()
        cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
        assert cfg["metrics"] == {"acc": 0.5}
        assert cfg["weights"]["sha256"] == sha256_file(tmp_path / "ck" / "model.safetensors")
        # saving the loaded (packed) model again gives the same weights
        zoo.save(loaded, tmp_path / "again")
        assert torch.equal(zoo.load(tmp_path / "again")(x), out)


class TestFloat(SaveLoadTesterMixin):
    quant = None


class TestLSQ4(SaveLoadTesterMixin):
    quant = QuantConfig(weight=LSQ(4, "channel"), act=LSQ(4), overrides=KEEP)


class TestUL2Q2(SaveLoadTesterMixin):
    quant = QuantConfig(weight=UL2Q(2), act=UL2Q(2), overrides=KEEP)


class TestIRNet(SaveLoadTesterMixin):
    quant = QuantConfig(weight=IRNet(), act=IRNet(), overrides=KEEP)
    model_args = {"act": "hardtanh", "per_conv_shortcut": True}


def test_float_release_stores_float16_and_computes_in_float32(tmp_path):
    """A float model's tensors are stored as float16 (one out of float16's range stays float32) and
    come back as float32 tensors holding exactly the float16 values; a quantized model's float
    tensors stay float32."""
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = make(None)
    model.net.bn.running_var[0] = 1e5  # beyond float16's 65504: this tensor must stay float32
    x = torch.rand(4, 1, 16, 16)
    zoo.save(model, tmp_path / "fp")
    stored = load_file(str(tmp_path / "fp" / "model.safetensors"))
    assert stored["net.bn.running_var"].dtype == torch.float32
    assert stored["net.stem.weight"].dtype == torch.float16
    assert torch.equal(stored["net.stem.weight"], model.net.stem.weight.detach().half())
    cfg = json.loads((tmp_path / "fp" / "config.json").read_text())
    assert cfg["weights"]["float_dtype"] == "float16"
    loaded = zoo.load(tmp_path / "fp")
    assert loaded.net.stem.weight.dtype == torch.float32
    assert torch.equal(loaded.net.stem.weight, model.net.stem.weight.detach().half().float())
    assert torch.equal(loaded.net.bn.running_var, model.net.bn.running_var)
    assert torch.equal(loaded(x), packed_copy(model)(x))
    ref = model(x)  # float16 rounding of the weights: a relative change of the order of 1e-3
    assert 0 < (loaded(x) - ref).abs().max() <= 1e-2 * ref.abs().max()
    q = make(QuantConfig(weight=LSQ(4, "channel"), act=LSQ(4), overrides=KEEP))
    zoo.save(q, tmp_path / "q")
    stored = load_file(str(tmp_path / "q" / "model.safetensors"))
    assert {v.dtype for v in stored.values()} >= {torch.float32} and torch.float16 not in {v.dtype for v in stored.values()}
    assert json.loads((tmp_path / "q" / "config.json").read_text())["weights"]["float_dtype"] == "float32"


def test_packed_weights_are_small(tmp_path):
    fp = make(None)
    w1 = make(QuantConfig(weight=XNOR(), act=XNOR(), overrides=KEEP))
    zoo.save(fp, tmp_path / "fp")
    zoo.save(w1, tmp_path / "w1")
    from zoo.cards import float_reference_bytes

    f = float_reference_bytes(json.loads((tmp_path / "fp" / "config.json").read_text()))  # float32 weights
    b = (tmp_path / "w1" / "model.safetensors").stat().st_size
    assert b * 8 < f
    from safetensors.torch import load_file

    t = load_file(str(tmp_path / "w1" / "model.safetensors"))
    q = t["net.layers.0.conv1.qweight"]
    assert q.dtype == torch.uint8 and q.shape == (8, 8 * 9 // 8)


@pytest.fixture
def saved(tmp_path):
    model = make(QuantConfig(weight=LSQ(4), act=LSQ(4), overrides=KEEP))
    return zoo.save(model, tmp_path / "ck")


def test_corrupted_weights_fail_with_checksum_error(saved):
    p = saved / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[-10] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        zoo.load(saved)


def test_truncated_file_with_matching_checksum_is_reported(saved):
    p = saved / "model.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    cfg = json.loads((saved / "config.json").read_text())
    cfg["weights"]["sha256"] = sha256_file(p)
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        zoo.load(saved)


def test_weights_for_another_architecture(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["model_args"]["width"] = 16
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="do not match architecture 'resnet20'"):
        zoo.load(saved)


def test_bad_config_json_and_missing_dir(saved, tmp_path):
    (saved / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        zoo.load(saved)
    with pytest.raises(ValueError, match="neither a checkpoint directory nor a shipped model"):
        zoo.load("resnet20.no_such_tag")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json not found"):
        zoo.load(tmp_path / "empty")


def test_unknown_format_version(saved):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["format_version"] = 99
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="format_version 99"):
        zoo.load(saved)


def test_interrupted_save_leaves_previous_checkpoint(saved, monkeypatch):
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    (saved / "README.md").write_text("card")
    import zoo.checkpoint as ck

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(ck, "sha256_file", boom)
    with pytest.raises(KeyboardInterrupt):
        zoo.save(make(None), saved)
    monkeypatch.undo()
    after = {p.name: p.read_bytes() for p in saved.iterdir()}
    assert after == {**before, "README.md": b"card"}
    assert not [p for p in saved.parent.iterdir() if p.name.startswith(".")]  # no temp left
    zoo.load(saved)


def test_loaded_model_checks_its_inputs(saved):
    m = zoo.load(saved)
    with pytest.raises(ValueError, match="N x 1 x H x W"):
        m(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match="takes 16 x 16 images"):
        m(torch.rand(2, 1, 20, 20))
    with pytest.raises(TypeError, match="float tensor"):
        m(torch.zeros(2, 1, 16, 16, dtype=torch.uint8))


def test_backend_choices(saved):
    with pytest.raises(ValueError, match="unknown backend 'cuda'; valid"):
        zoo.load(saved, backend="cuda")
    assert zoo.load(saved, backend="reference") is not None


def test_list_models_and_env_override(saved, monkeypatch, tmp_path):
    root = tmp_path / "root" / "cls"
    root.mkdir(parents=True)
    os.replace(saved, root / "resnet20.test_w4a4")
    monkeypatch.setenv("ZOO_CHECKPOINTS", str(tmp_path / "root"))
    assert zoo.list_models() == ["resnet20.test_w4a4"]
    assert zoo.list_models(task="sal") == []
    assert zoo.load("resnet20.test_w4a4").arch == "resnet20"


def test_create_model_errors():
    with pytest.raises(ValueError, match="unknown architecture 'resnet99'; valid: .*resnet20"):
        zoo.create_model("resnet99")
    assert isinstance(zoo.create_model("resnet20.some_tag", num_classes=3).fc, torch.nn.Linear)


@pytest.mark.parametrize("arch, match", [("edsr", "does not describe a buildable model: .*unexpected keyword"),
                                         ("nope", "does not describe a buildable model: unknown architecture 'nope'"),
                                         ("resnet32", "do not match architecture 'resnet32'")])
def test_config_edited_to_another_arch_is_a_checkpoint_error(saved, arch, match):
    cfg = json.loads((saved / "config.json").read_text())
    cfg["arch"] = arch
    (saved / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        zoo.load(saved)


def test_shipped_cards_say_what_data_the_model_knows():
    from zoo.registry import resolve_checkpoint
    from zoo.tasks import get_task

    for name in zoo.list_models():
        d = resolve_checkpoint(name)
        cfg = json.loads((d / "config.json").read_text())
        domain = get_task(cfg["task"]).domain(cfg)
        assert domain, name  # every shipped model is trained on built-in data
        assert f"- **Domain:** {domain}" in (d / "README.md").read_text(), name


def test_golden_pair_stores_images_as_8bit_codes(tmp_path):
    """Images in [0, 1] are stored as their uint8 codes and come back as k/255, with the output the
    model gives on exactly those values; any other input is stored unchanged."""
    from safetensors.torch import load_file

    from zoo.cards import read_golden, write_golden

    torch.manual_seed(0)
    w = torch.randn(3)
    model = lambda x: (x * w.view(1, 3, 1, 1)).sum(1)  # noqa: E731  (a deterministic stand-in)
    x = torch.rand(2, 3, 5, 5)
    x[0, 0, 0, 0], x[0, 0, 0, 1] = 0.0, 1.0
    write_golden(model, x, tmp_path)
    stored = load_file(str(tmp_path / "golden.safetensors"))
    assert set(stored) == {"input_u8", "output"} and stored["input_u8"].dtype == torch.uint8
    xr, y = read_golden(tmp_path)
    expected_x = torch.floor(x * 255 + 0.5) / 255  # nearest 8-bit level (no ties in random data)
    assert torch.equal(xr, expected_x) and xr.dtype == torch.float32
    assert (xr - x).abs().max() <= 0.5 / 255 + 1e-7
    assert torch.equal(y, model(expected_x))

    z = torch.randn(2, 3, 5, 5)  # not an image in [0, 1]: stored as is
    write_golden(model, z, tmp_path)
    assert set(load_file(str(tmp_path / "golden.safetensors"))) == {"input", "output"}
    zr, yz = read_golden(tmp_path)
    assert torch.equal(zr, z) and torch.equal(yz, model(z))
