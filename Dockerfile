# Treaty's release binaries in a small runtime image (no failpoints, no Admin service).
#
#   docker build -t treaty .
#   docker compose -f deploy/compose.yaml up
#
# Stage 1 builds with the same toolchain the project pins in Cargo.toml (rust-version); stage 2 is
# Debian slim with the three binaries, CA certificates (for TLS to PostgreSQL) and an unprivileged
# user. No compiler, no sources, no cargo registry in the runtime image.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bins \
 && mkdir -p /out \
 && cp target/release/treaty target/release/treaty-coordinator target/release/treaty-participant /out/

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/treaty --create-home treaty
COPY --from=build /out/ /usr/local/bin/
USER treaty
WORKDIR /var/lib/treaty
# The coordinator's decision log and the participant's state live here: mount a volume on it.
VOLUME ["/var/lib/treaty"]
# 7600: coordinator gRPC; 7700: participant gRPC (both set with --listen).
EXPOSE 7600 7700
# tini forwards SIGTERM, so a stop drains and closes cleanly instead of being killed.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["treaty-coordinator", "--help"]
