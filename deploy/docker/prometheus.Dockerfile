# A Prometheus image for places with no container registry (the e2e test, air-gapped clusters):
# the base image plus a prometheus binary from the build context (e.g. Debian's package, which
# is statically linked but for libc). deploy/e2e-docker.sh builds it as:
#
#   mkdir ctx && cp "$(command -v prometheus)" ctx/ && \
#   docker build --network none --build-arg BASE_IMAGE=arcsim-base \
#       -f deploy/docker/prometheus.Dockerfile -t arcsim-prometheus ctx
#
# It is a drop-in for prom/prometheus in compose.yaml (same entry point, user and data folder):
# ARCSIM_PROMETHEUS_IMAGE=arcsim-prometheus docker compose up -d prometheus
ARG BASE_IMAGE=arcsim-base
FROM ${BASE_IMAGE}
COPY prometheus /bin/prometheus
# /prometheus belongs to nobody so that a fresh named volume mounted there is writable.
RUN mkdir -p /prometheus /etc/prometheus && chown 65534:65534 /prometheus && /bin/prometheus --version
USER 65534
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
