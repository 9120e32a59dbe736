# megatron_minitron on NVIDIA's PyTorch container, which brings CUDA, cuDNN, NCCL, Transformer
# Engine and apex (never install those two from pip). Python 3.12, so megatron-core 0.19.2
# installs with its declared requirements.
#
#   docker build -t megatron-minitron .
#   docker run --rm megatron-minitron                                  # prints `minitron --help`
#   docker run --rm --gpus all --ipc=host -v /data:/data megatron-minitron \
#     torchrun --standalone --nproc-per-node 8 -m megatron_minitron eval --load /data/ckpt ...
#
# SLURM with pyxis/enroot: `enroot import dockerd://megatron-minitron` makes a .sqsh file to pass
# as CONTAINER_IMAGE to launch/slurm/*.sbatch (the launch scripts are in /opt/megatron_minitron).
FROM nvcr.io/nvidia/pytorch:25.09-py3

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

# The image pins its own torch (a pip constraint file), so these installs leave torch, TE and
# apex as they are.
RUN pip install --no-cache-dir "megatron-core==0.19.2"

WORKDIR /opt/megatron_minitron
COPY setup.py ./
COPY megatron_minitron ./megatron_minitron
# The package itself, from this folder (its requirements are in setup.py).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[hf]"
COPY launch ./launch
COPY examples ./examples

CMD ["minitron", "--help"]
