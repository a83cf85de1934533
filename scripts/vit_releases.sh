#!/usr/bin/env bash
# The ViT releases of checkpoints/cls/ (issue 17), in the order they were made; each command's time is
# on its card. Needs the float release vit_tiny_p4.fp32_fmnist:
#   python -m zoo.train task=vit quant=none init_from=null epochs=10 optimizer=adamw lr=1e-3 weight_decay=0.05 \
#       release_dir=checkpoints/cls/vit_tiny_p4.fp32_fmnist
set -euo pipefail  # python: the venv's (. .venv/bin/activate)
out=checkpoints/cls
run() { local name=$1; shift; python -m zoo.ptq task=vit "$@" release_dir=$out/vit_tiny_p4.$name; }
run ptq_w8a8_fmnist bits=8
run ptq_w6a6_fmnist bits=6
run ptq_w4a4_fmnist bits=4
run log2_w4a4_fmnist bits=4 algo=log2
run repq_w4a4_fmnist bits=4 algo=repq
run repq_w6a6_fmnist bits=6 algo=repq
run ptq_w4a8_fmnist wbits=4 abits=8
run psaq_w8a8_fmnist bits=8 calib=psaq
run apq_w4a4_fmnist bits=4 algo=apq
python -m zoo.train task=vit quant=ivit bits=8 epochs=1 lr=1e-4 limit_train_batches=100 \
    release_dir=$out/vit_tiny_p4.ivit_w8a8_fmnist
run apq_w6a6_fmnist bits=6 algo=apq
run psaq_w4a8_fmnist wbits=4 abits=8 calib=psaq
