# One image for the three services (entry point `arcsim`: coordinator | worker | adversary).
#
#   docker build -t arcsim .                                  # CPU torch, from PyPI
#   docker build --build-arg VARIANT=cuda -t arcsim:cuda .    # CUDA torch wheels; the driver comes from the host
#   make wheelhouse && docker build --network none \
#       --build-arg BASE_IMAGE=arcsim-base --build-arg WHEELHOUSE=wheelhouse -t arcsim .   # air-gapped
#
# Build arguments: BASE_IMAGE (any Debian-like image with python3 >= 3.11 and venv), VARIANT (cpu|cuda),
# TORCH_SPEC, TORCH_INDEX_URL (default: PyTorch's cpu or cu126 index), PIP_INDEX_URL, WHEELHOUSE (a
# folder of the build context holding every wheel, arcsim's included: then nothing is downloaded).
ARG BASE_IMAGE=python:3.11-slim-bookworm

FROM ${BASE_IMAGE} AS build
ARG VARIANT=cpu
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=
ARG PIP_INDEX_URL=https://pypi.org/simple
ARG WHEELHOUSE=
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1 PIP_ROOT_USER_ACTION=ignore
RUN python3 -m venv /opt/arcsim
COPY . /src
RUN set -eu; \
    pip=/opt/arcsim/bin/pip; \
    if [ -n "$WHEELHOUSE" ]; then \
        $pip install --no-index --find-links "/src/$WHEELHOUSE" "$TORCH_SPEC" && \
        $pip install --no-index --find-links "/src/$WHEELHOUSE" arcsim; \
    else \
        case "$VARIANT" in cpu) flavour=cpu ;; cuda) flavour=cu126 ;; *) echo "VARIANT must be cpu or cuda" >&2; exit 2 ;; esac; \
        $pip install --index-url "${TORCH_INDEX_URL:-https://download.pytorch.org/whl/$flavour}" \
            --extra-index-url "$PIP_INDEX_URL" "$TORCH_SPEC" && \
        $pip install --index-url "$PIP_INDEX_URL" /src; \
    fi; \
    /opt/arcsim/bin/python -c "import arcsim.cli, arcsim.coordinator.service, arcsim.workers.service, arcsim.adversaries.service"

FROM ${BASE_IMAGE} AS runtime
COPY --from=build /opt/arcsim /opt/arcsim
RUN (useradd --system --uid 10001 --create-home --home-dir /home/arcsim arcsim 2>/dev/null || \
     adduser --system --uid 10001 --home /home/arcsim arcsim) && \
    mkdir -p /runs /data && chown arcsim /runs
ENV PATH=/opt/arcsim/bin:$PATH \
    OMP_NUM_THREADS=1 \
    PYTHONUNBUFFERED=1 \
    ARCSIM_DATA=/data
USER 10001
WORKDIR /home/arcsim
VOLUME ["/runs"]
EXPOSE 50051 50052
# The coordinator sets ARCSIM_HEALTH_ADDRESS and is checked over gRPC health; the other services
# are healthy while their process runs.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 CMD ["arcsim", "health"]
ENTRYPOINT ["arcsim"]
CMD ["--help"]
