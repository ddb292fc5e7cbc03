# syntax=docker/dockerfile:1
# partner-bridge on distroless (glibc and CA certificates; no shell, no package manager).
# Build from the repository root:
#   docker build -t partner-bridge:local .
# The image runs as the non-root user 65532, keeps its state (the SQLite ledger) in the volume
# /var/lib/partner-bridge, and reports health through `partner-bridge healthcheck` (there is no shell or curl).

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Only what the binary needs (see .dockerignore): editing tests, docs or deploy/ does not rebuild the image.
COPY Cargo.toml Cargo.lock ./
COPY src ./src
# The registry and target caches survive between builds, so a code change recompiles only this crate. The binary is
# copied out of the cache mount in the same step. The state directory is made here because distroless has no shell.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --bin partner-bridge \
    && install -D -m 0755 target/release/partner-bridge /out/partner-bridge \
    && install -d -m 0750 -o 65532 -g 65532 /out/state

# The same binary on distroless' debug variant, which adds a busybox shell at /busybox/sh, for troubleshooting.
# Build it with --target debug; the default is the last stage.
FROM gcr.io/distroless/cc-debian12:debug-nonroot AS debug
COPY --from=build /out/partner-bridge /usr/local/bin/partner-bridge
COPY --from=build --chown=65532:65532 /out/state /var/lib/partner-bridge
USER 65532:65532
WORKDIR /var/lib/partner-bridge

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="partner-bridge" \
      org.opencontainers.image.description="Moves Didit B2B Reusable KYC share tokens between partner businesses over RabbitMQ" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/partner-bridge /usr/local/bin/partner-bridge
COPY --from=build --chown=65532:65532 /out/state /var/lib/partner-bridge
USER 65532:65532
WORKDIR /var/lib/partner-bridge
VOLUME ["/var/lib/partner-bridge"]
# 9464: admin (/metrics, /livez, /readyz). 8080: Didit webhook intake (issuer.webhook.listen), when configured.
EXPOSE 9464 8080
# SIGTERM starts the graceful drain (shutdown.grace_s, 20 s by default): give the runtime more than that before
# SIGKILL (docker stop -t 30, compose stop_grace_period, Kubernetes terminationGracePeriodSeconds).
STOPSIGNAL SIGTERM
# Checks /readyz on the default admin port; with another admin.listen, override it (compose `healthcheck`,
# `partner-bridge healthcheck --url ...`). Kubernetes ignores it and uses the manifests' probes.
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/partner-bridge", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/partner-bridge"]
CMD ["run", "--config", "/etc/partner-bridge/config.toml"]
