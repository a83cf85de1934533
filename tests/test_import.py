import subprocess
import sys


def test_import_zoo_pulls_no_triton_lightning_or_cuda():
    code = (
        "import sys, zoo, torch\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('triton', 'lightning', 'pytorch_lightning', 'basicsr', "
        "'skimage', 'segmentation_models_pytorch', 'timm')]\n"
        "assert not bad, bad\n"
        "assert not torch.cuda.is_initialized()\n"
        "m = zoo.create_model('resnet20')\n"
        "zoo.quantize(m, zoo.QuantConfig(weight=zoo.LSQ(4), act=zoo.LSQ(4)))\n"
        "zoo.to_packed(m.eval())(torch.rand(1, 3, 32, 32))  # backend 'auto' on CPU: reference\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('triton', 'segmentation_models_pytorch')]\n"
        "assert not bad, bad\n"
        "assert not torch.cuda.is_initialized()\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_public_api():
    import zoo

    for name in ("load", "save", "quantize", "QuantConfig", "create_model", "list_models",
                 "register_model", "LSQ", "UL2Q", "IRNet", "XNOR", "ReAct", "DoReFa", "PACT", "MinMax", "RLQ", "PAMS"):
        assert hasattr(zoo, name), name
