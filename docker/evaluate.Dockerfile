# Runs the baseline evaluation / simulation CLI on the CPU build of torch.
# Build from the repository root: docker build -f docker/evaluate.Dockerfile -t fedrec .
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
# TORCH_SPEC lets a build pick a CPU-only wheel source; torch is pinned before the project.
ARG TORCH_SPEC="torch==2.13.0"
RUN pip install --no-cache-dir "${TORCH_SPEC}" \
    && pip install --no-cache-dir .

RUN useradd --create-home --uid 10001 fedrec && mkdir -p /var/cache/fedrec /data \
    && chown fedrec /var/cache/fedrec /data
USER 10001
VOLUME ["/var/cache/fedrec", "/data"]
ENTRYPOINT ["fedrec"]
CMD ["evaluate", "baselines"]
