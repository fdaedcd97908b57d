# optim-service: CPU torch by default; for CUDA:
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t optim-service .
# Run: docker run -e OPTIM_DATABASE_URL=postgresql+psycopg://user:pw@db/optim -p 8000:8000 optim-service
FROM python:3.11-slim

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OPTIM_DATA_DIR=/data \
    OPTIM_DATABASE_URL=sqlite:////data/optim.db

WORKDIR /app
# torch first, from the chosen index (CPU or CUDA wheels), so the layer is reused across code changes
RUN pip install --index-url "$TORCH_INDEX" "torch==2.14.1" "torchvision==0.29.1"
COPY pyproject.toml constraints.txt README.md alembic.ini ./
COPY optim_core ./optim_core
COPY schemas ./schemas
COPY service ./service
COPY optim_client ./optim_client
COPY migrations ./migrations
# constraints.txt pins the tested versions; torch is already installed from the index above.
# Editable: the service finds alembic.ini and migrations/ beside its package, in /app.
RUN grep -v -E '^(torch|torchvision|triton|nvidia-|cuda-)' constraints.txt > /tmp/constraints.txt \
 && pip install -c /tmp/constraints.txt -e . \
 && useradd --create-home --uid 10001 optim \
 && mkdir -p /data && chown optim /data

USER optim
VOLUME ["/data"]
EXPOSE 8000
# Alembic owns the schema and the server refuses a database that is not at head: migrate, then serve.
CMD ["sh", "-c", "optim-service migrate && exec optim-service serve --host 0.0.0.0 --port 8000"]
