# The service image (the HTTP service arrives with issue 3). CPU torch by default;
# build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 for CUDA.
FROM python:3.11-slim
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml constraints.txt README.md ./
COPY optim_core ./optim_core
RUN pip install --index-url "$TORCH_INDEX" "torch==2.14.1" "torchvision==0.29.1" \
 && pip install .
RUN useradd --create-home --uid 10001 optim
USER optim
CMD ["python", "-m", "optim_core"]
