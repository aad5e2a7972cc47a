# The federation server: Flower's SuperLink (TLS, SuperNode authentication, state database,
# no run-time installs) plus this project's ServerApp, run and followed by `fedrec server start`.
# Build from the repository root: docker build -f docker/server.Dockerfile -t fedrec-server .
# State (certificates, registrations, checkpoints, artifacts) lives in the /state volume:
# create it once with `fedrec server init --state-dir /state --host <name devices use>`.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    FLWR_TELEMETRY_ENABLED=0 \
    ORT_DISABLE_TELEMETRY=1 \
    FEDREC_CACHE_DIR=/var/cache/fedrec

WORKDIR /app
COPY pyproject.toml README.md ./
COPY fedrec ./fedrec
COPY shared ./shared
COPY server ./server
COPY client ./client
COPY simulation ./simulation
# torch pinned before the project, from PyTorch's CPU index (PyPI's Linux wheel is the
# multi-GB CUDA build; --build-arg TORCH_INDEX_URL=https://pypi.org/simple takes that one)
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
RUN pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==2.13.0" \
    && pip install --no-cache-dir .

RUN useradd --create-home --uid 10001 fedrec && mkdir -p /state /ca /bundle /var/cache/fedrec \
    && chown fedrec /state /ca /var/cache/fedrec
USER 10001
VOLUME ["/state"]
EXPOSE 9093
ENTRYPOINT ["fedrec"]
CMD ["server", "start", "--state-dir", "/state", "--bundle", "/bundle/deploy-bundle.pt", "--host", "0.0.0.0", "--port", "9093"]
