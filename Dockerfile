# kubetrail's container image.
#
#   docker build -t kubetrail:0.1.0 .        (or: buildah bud, podman build, kaniko)
#
# The same image is built without any container engine by `scripts/image build` (an OCI archive
# for `ctr images import` / `skopeo copy oci-archive:...`): both run deploy/image/build.py's
# `app` step, so the application layout, pinned dependencies and launcher are the same. The
# runtime stage is Debian bookworm with Debian's python3 (3.11), no compilers, user 65532.

ARG DEBIAN_RELEASE=bookworm

# --- builder: kubetrail's wheel, the native extension (Rust), the pinned dependencies ---------
FROM rust:1-${DEBIAN_RELEASE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY requirements/ci.txt requirements/ci.txt
RUN python3 -m venv /venv \
 && /venv/bin/pip install --no-cache-dir "$(grep -i '^maturin==' requirements/ci.txt)"
COPY pyproject.toml README.md ./
COPY kubetrail kubetrail
COPY native native
COPY deploy/image/build.py deploy/image/build.py
RUN /venv/bin/python deploy/image/build.py app /out --wheels /tmp/wheels \
 && mkdir -p /out/etc/kubetrail \
 && cp kubetrail/cli/default.conf /out/etc/kubetrail/kubetrail.conf

# --- runtime: Debian's python3, kubetrail under /opt/kubetrail --------------------------------
FROM debian:${DEBIAN_RELEASE}-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-minimal libpython3.11-stdlib ca-certificates tzdata \
 && rm -rf /var/lib/apt/lists/* /usr/share/doc /usr/share/man \
 && echo 'kubetrail:x:65532:65532:kubetrail:/nonexistent:/usr/sbin/nologin' >> /etc/passwd \
 && echo 'kubetrail:x:65532:' >> /etc/group
COPY --from=build /out/ /
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="kubetrail" \
      org.opencontainers.image.description="Kubernetes Events, audit records and container logs, delivered with nothing lost and nothing repeated" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="debian:bookworm-slim"
ENV PYTHONUNBUFFERED=1
# Non-root by default. The node-log DaemonSet of the Helm chart runs as uid 0 with every
# capability dropped but DAC_READ_SEARCH, to read the kubelet's root-owned 0640 log files.
USER 65532:65532
EXPOSE 2020
ENTRYPOINT ["/usr/local/bin/kubetrail"]
CMD ["run", "-c", "/etc/kubetrail/kubetrail.conf"]
