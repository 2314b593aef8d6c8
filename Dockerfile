# GPU image: CUDA runtime, PyTorch with CUDA, the project with the xformers extra.
#   docker build -t sdserve .
#   docker run --gpus all -p 8000:8000 -v sdserve-cache:/cache -v sdserve-data:/data sdserve
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface \
    SDSERVE_CACHE_DIR=/cache/sdserve \
    SDSERVE_OUTPUT_DIR=/data/outputs \
    SDSERVE_REGISTRY_PATH=/data/registry.yaml \
    SDSERVE_DATA_DIR=/data \
    SDSERVE_SYSTEM_PYTHON=1 \
    PORT=8000

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /app
# Dependencies first, so code edits do not re-download PyTorch.
ARG TORCH_SPEC="torch"
COPY pyproject.toml README.md ./
COPY api api
COPY models models
COPY training training
# hadolint ignore=DL3013
RUN pip install --upgrade pip \
    && pip install ${TORCH_SPEC} \
    && pip install ".[gpu]"

COPY run_api.sh accelerate_config.yaml ./
COPY scripts scripts

VOLUME ["/cache", "/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"]
CMD ["./run_api.sh"]
