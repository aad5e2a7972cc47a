# A device: the `fedrec client start` daemon (local HTTP API, encrypted store, sealed models)
# with its Flower SuperNode (TLS to the server, authenticated with the device key).
# Build from the repository root: docker build -f docker/client.Dockerfile -t fedrec-client .
# The device state lives in the /device volume: create it once with
# `fedrec client init --state-dir /device` and register the printed key on the server.
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

RUN useradd --create-home --uid 10001 fedrec && mkdir -p /device /bundle /var/cache/fedrec \
    && chown fedrec /device /var/cache/fedrec
USER 10001
VOLUME ["/device"]
EXPOSE 8765
ENTRYPOINT ["fedrec"]
CMD ["client", "start", "--state-dir", "/device", "--server", "server:9093", "--root-cert", "/ca/ca.pem", "--bundle", "/bundle/deploy-bundle.pt", "--host", "0.0.0.0", "--port", "8765", "--config", "allow-remote=true"]
