# GPU image: Python 3.11 (the locks' interpreter), PyTorch's CUDA wheel from PyPI (it carries the CUDA runtime, so
# no CUDA base image is needed; the host needs the NVIDIA driver and container toolkit), then exactly
# requirements.lock.
#   docker build -t sdserve .
#   docker run --gpus all -p 8000:8000 -v sdserve-cache:/cache -v sdserve-data:/data sdserve
# For Ray Serve (README "Scaling out"): the same image with requirements-ray.lock (the server's pins plus ray[serve]
# and psycopg, as the cluster tests ran them); its command is then `serve run serve_config.yaml` or a RayService's.
#   docker build --build-arg LOCK=requirements-ray.lock -t sdserve-ray .
FROM python:3.11-slim-bookworm

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface \
    SDSERVE_CACHE_DIR=/cache/sdserve \
    SDSERVE_OUTPUT_DIR=/data/outputs \
    SDSERVE_REGISTRY_PATH=/data/registry.yaml \
    SDSERVE_DATA_DIR=/data \
    SDSERVE_SYSTEM_PYTHON=1 \
    HOST=0.0.0.0 \
    PORT=8000

RUN python -m venv /opt/venv

WORKDIR /app
# Dependencies first, so code edits do not re-download PyTorch. TORCH_SPEC: the pin of requirements-torch.txt
# (PyPI's Linux wheel of it is the CUDA build); another build of the same release can be named at build time.
ARG TORCH_SPEC=""
ARG LOCK=requirements.lock
COPY requirements-torch.txt ${LOCK} ./
# The torch pin is read from requirements-torch.txt, which hadolint cannot see.
# hadolint ignore=DL3013,SC2046,SC2086
RUN pip install ${TORCH_SPEC:-$(grep -v '^#' requirements-torch.txt)} \
    && pip install --require-hashes --no-deps -r "${LOCK}"

COPY pyproject.toml README.md ./
COPY api api
COPY models models
COPY training training
RUN pip install --no-deps --no-build-isolation . \
    && pip check

COPY run_api.sh accelerate_config.yaml serve_config.yaml ./
COPY scripts scripts

VOLUME ["/cache", "/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"]
CMD ["./run_api.sh"]
