# megagpt on NVIDIA's PyTorch container (CUDA, NCCL, cuDNN and a matching torch).
#   docker build -t megagpt .
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/megagpt/runs megagpt \
#       megagpt train --config gpt2-124m data.path=... data.tokenizer=...
FROM nvcr.io/nvidia/pytorch:25.06-py3

WORKDIR /workspace/megagpt
COPY . .
# Keep the container's own torch build: pin it so pip cannot replace it from PyPI.
RUN python -c "import torch; print(f'torch=={torch.__version__}')" > /tmp/keep-torch.txt \
    && pip install --no-cache-dir -c /tmp/keep-torch.txt -e ".[data,export]"

CMD ["megagpt", "--help"]
