# Runs the baseline evaluation / simulation CLI on the CPU build of torch.
# Build from the repository root: docker build -f docker/evaluate.Dockerfile -t fedrec .
# It works in the /data volume: `fedrec simulate` writes runs/ there, and relative paths
# (--data-dir, -o, --export) are read and written there.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
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

RUN useradd --create-home --uid 10001 fedrec && mkdir -p /var/cache/fedrec /data \
    && chown fedrec /var/cache/fedrec /data
USER 10001
VOLUME ["/var/cache/fedrec", "/data"]
# /app is root's: `fedrec simulate` could not create its runs/ folder there
WORKDIR /data
ENTRYPOINT ["fedrec"]
CMD ["evaluate", "baselines"]
