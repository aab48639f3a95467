# Redis and Prometheus from Debian's packages, for the compose stack on a machine with no access
# to Docker Hub (redis:7.2 and prom/prometheus images): the offline podman run
# (deploy/compose/compose.podman.yaml, tests/test_compose.py). One image serves both services.
#   podman build --network host --build-arg BASE_IMAGE=localhost/evc-base:bookworm-py311 \
#     -f deploy/compose/services.Dockerfile -t localhost/evc-services:bookworm deploy/compose
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

# Debian package versions are not pinned: a pin breaks the build at the next security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends redis-server prometheus \
    && rm -rf /var/lib/apt/lists/* \
    && install -d -o 10001 -g 10001 -m 0750 /data /prometheus

USER 10001:10001
WORKDIR /data
CMD ["redis-server"]
