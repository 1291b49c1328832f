# syntax=docker/dockerfile:1
# clickpulse container image: `docker build -t clickpulse .` (any architecture the base image has).
# tests/test_deploy.py lints this file with hadolint and cross-checks it against the code.

# One pinned base for both stages: the virtual environment built in the first stage links to this
# image's Python, so the runtime stage must be the very same image.
ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# --- build: install the package (without the test extra) into a self-contained virtualenv ------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/clickpulse
WORKDIR /src
# Only what `pip install .` reads; .dockerignore keeps everything else out of the build context.
COPY pyproject.toml README.md ./
COPY clickpulse/ clickpulse/
# Dependencies come from pyproject.toml's ranges; wheels exist for amd64 and arm64, so no compiler.
RUN /opt/clickpulse/bin/pip install --no-cache-dir .

# --- runtime ------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
LABEL org.opencontainers.image.title="clickpulse" \
      org.opencontainers.image.description="HTTP event collector that batches analytical events into ClickHouse" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

# A fixed numeric UID/GID, so Kubernetes' runAsNonRoot can verify it and k8s/deployment.yaml can
# name the same one. The spool directory is created and owned here because a new named volume
# mounted on it starts as a copy of it, ownership included.
RUN groupadd --system --gid 10001 clickpulse \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin clickpulse \
    && install -d -o 10001 -g 10001 -m 0750 /var/lib/clickpulse /var/lib/clickpulse/spool

COPY --from=build /opt/clickpulse /opt/clickpulse

# PYTHONDONTWRITEBYTECODE: the root filesystem may be read-only (Kubernetes); pip compiled already.
# SPOOL_DIR: accepted events are written here before they are acknowledged (see the VOLUME below).
ENV PATH="/opt/clickpulse/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SPOOL_DIR=/var/lib/clickpulse/spool

WORKDIR /var/lib/clickpulse
USER 10001:10001
VOLUME ["/var/lib/clickpulse/spool"]
EXPOSE 8080

# Liveness of the HTTP server with nothing but the standard library (the slim image has no curl).
# It reads HTTP_PORT like the service does, so `-e HTTP_PORT=9000` needs no other change; urlopen
# raises on a refused connection, a time-out or any non-2xx answer, which exits non-zero.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % (os.environ.get('ADMIN_PORT') or os.environ.get('HTTP_PORT', '8080')), timeout=4)"]

# python is PID 1: clickpulse installs its own SIGTERM/SIGINT handlers (drain, then exit), and it
# starts no child processes, so it needs no init process to forward signals or reap zombies.
ENTRYPOINT ["python", "-m", "clickpulse"]
