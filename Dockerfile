# The Remote Kernel Operator's image: the project's wheel and its `operator` extra in a venv,
# run as an unprivileged user. Wheels come from the build context (`make operator-image`
# fetches them), so the build itself needs no network.
#
#   BASE_IMAGE  any Debian-like image with python3 (3.10 or newer, matching the wheels),
#               python3-venv and useradd; `make operator-image` uses a local Debian bookworm
#               made with debootstrap, since no registry is reachable there.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}
COPY build/operator-image/wheels /tmp/wheels
RUN python3 -m venv /opt/operator \
 && /opt/operator/bin/pip install --no-index --no-cache-dir --find-links /tmp/wheels \
      'remote-kernel-operator[operator]' \
 && rm -rf /tmp/wheels \
 && useradd --system --uid 10001 --user-group --no-create-home --home-dir /nonexistent rko
ENV PATH=/opt/operator/bin:/usr/local/bin:/usr/bin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
# 8877: the response listener launchers report to; 8080: probes and metrics (RKO_HTTP_BIND).
EXPOSE 8877 8080
ENTRYPOINT ["remote-kernel-operator"]
