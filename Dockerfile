# syntax=docker/dockerfile:1
#
# tollgate container image.
#   docker build -t tollgate .
#   docker run --rm -e TOLLGATE_REDIS_URL=... -e TOLLGATE_DATABASE_URL=... -p 8080:8080 -p 8081:8081 tollgate
# `serve` applies pending migrations, then serves the data plane (:8080) and admin (:8081).

FROM rust:1-bookworm AS build
WORKDIR /src
# The workspace (tollgate + loadtest) is small, so copy it whole; the cache mounts keep the
# crate registry and build artifacts between builds (BuildKit).
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p tollgate \
 && install -m 0755 target/release/tollgate /usr/local/bin/tollgate

FROM debian:bookworm-slim
# ca-certificates tracks the Debian release; pinning its version would break on security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 tollgate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin tollgate
COPY --from=build /usr/local/bin/tollgate /usr/local/bin/tollgate
ENV TOLLGATE_LISTEN=0.0.0.0:8080 \
    TOLLGATE_ADMIN_LISTEN=0.0.0.0:8081 \
    TOLLGATE_LOG_FORMAT=json
USER 10001:10001
EXPOSE 8080 8081
ENTRYPOINT ["/usr/local/bin/tollgate"]
CMD ["serve"]
