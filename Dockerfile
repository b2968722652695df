# syntax=docker/dockerfile:1
# agentwire container image: multi-stage, non-root, made for a read-only root file system.
# Build and run: docs/OPERATIONS.md, "Running in a container".
#
#   docker build -t agentwire:0.1.0 .
#   docker run --rm --read-only --cap-drop ALL --security-opt no-new-privileges \
#     -p 8080:8080 -e AGENTWIRE_JWT_SECRET="$(openssl rand -base64 48)" agentwire:0.1.0
#
# The image listens on 0.0.0.0:8080. Without a JWT key (AGENTWIRE_JWT_SECRET, or
# AGENTWIRE_JWT_PUBLIC_KEY_FILE with AGENTWIRE_JWT_ALGORITHM) the binary would start in dev
# mode, which it refuses on a non-loopback address: the container exits at once with an
# error unless you pass --dev (AGENTWIRE_DEV=true), which you should do only to try it out.

# Builder: Debian 12 (bookworm), the same glibc as the runtime stage. Any stable Rust at or
# above Cargo.toml's rust-version (1.85) builds it; pin a version with
# --build-arg RUST_VERSION=1.95.
ARG RUST_VERSION=1
FROM rust:${RUST_VERSION}-bookworm AS builder
WORKDIR /src
# aws-lc-sys 0.47 (jsonwebtoken's crypto backend) compiles its C with the image's gcc
# through the cc crate: no cmake or clang needed on x86_64/aarch64 Linux.
COPY . .
# --locked: exactly the versions in Cargo.lock (the audited ones).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin agentwire \
 && install -D -m 0755 target/release/agentwire /out/agentwire

# Runtime: the binary links only glibc and libgcc_s (`ldd target/release/agentwire`), which
# distroless cc-debian12 provides; no shell, no package manager. The :nonroot tag runs as
# uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /out/agentwire /usr/local/bin/agentwire
USER 65532:65532
ENV AGENTWIRE_LISTEN=0.0.0.0:8080 \
    RUST_LOG=info
EXPOSE 8080
# SIGTERM drains: clients are told, output is flushed for shutdown_grace_ms (5000 ms by
# default), then exit 0. Give `docker stop -t` / terminationGracePeriodSeconds more than that.
STOPSIGNAL SIGTERM
# No HEALTHCHECK: distroless has no curl or shell to run one. Probe GET /health over HTTP
# from the orchestrator instead (200 healthy or degraded, 503 draining).
ENTRYPOINT ["/usr/local/bin/agentwire"]
CMD ["serve"]
