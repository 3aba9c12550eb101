# The vqlog image: sweep workers, the one-shot init, the table watcher and optuna-dashboard of
# docker-compose.yml. A worker on another host runs the same image (README, "Add a worker on another host").
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    MPLBACKEND=Agg \
    MLFLOW_DISABLE_TELEMETRY=true

# The CPU build of torch first, from PyTorch's CPU index: from PyPI it would bring several GB of
# CUDA libraries. `pip install .` below keeps it (it satisfies pyproject's torch range).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY vqlog ./vqlog
# The `dashboard` extra is optuna-dashboard, for the compose `dashboard` service.
RUN pip install ".[dashboard]" \
    && rm -rf build \
    && useradd --create-home --uid 1000 vqlog \
    && mkdir -p /app/results \
    && chown vqlog /app/results

USER vqlog
CMD ["vqlog-sweep", "--help"]
