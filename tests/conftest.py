import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FMNIST = "/usr/share/datasets/fashion-mnist"


def has_fmnist() -> bool:
    return os.path.isfile(os.path.join(FMNIST, "t10k-images-idx3-ubyte.gz")) or os.path.isfile(
        os.path.join(FMNIST, "t10k-images-idx3-ubyte"))


needs_fmnist = pytest.mark.skipif(not has_fmnist(), reason="apt-get install -y dataset-fashion-mnist")
