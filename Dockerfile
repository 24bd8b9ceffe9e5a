# One image with the three programs: ptth_relay (the default command), ptth_server and
# ptth_proxy. Build from the repository's root:
#
#   docker build -t ptth .
#
# docs/deploy.md ("Containers") explains how to run it, with an example of a relay behind Caddy
# in docs/docker/. CI lints this file with hadolint (.ci/test), and its build command is the
# release build that the README documents and .ci/test runs (tests/tests/packaging.rs checks
# that they stay the same).

# The oldest Rust the workspace supports (rust-version in Cargo.toml). The image has the C
# compiler that ring needs.
FROM rust:1.88-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ptth_relay -p ptth_server -p ptth_proxy

FROM debian:bookworm-slim
# ca-certificates: the roots that ptth_server and ptth_proxy check an https:// relay against.
# Not pinned to a version: Debian replaces it in place with security updates, so a pinned
# version would soon stop building.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin ptth
COPY --from=build /src/target/release/ptth_relay /src/target/release/ptth_server /src/target/release/ptth_proxy /usr/local/bin/
# A numeric user, so that a runtime can tell it is not root without reading /etc/passwd.
# A key file mounted into the container must be owned by this uid with mode 0600.
USER 10001:10001
# relay.toml (and a server's or proxy's configuration and key) are mounted here, read-only.
WORKDIR /etc/ptth
# The relay listens where relay.toml says; 4000 in docs/docker/relay.toml.
EXPOSE 4000
# The configuration is given by flag, not by a PTTH_CONFIG in the image, so that ptth_server and
# ptth_proxy run in this image never read relay.toml by mistake. To run them instead:
#   docker run ... ptth ptth_server --config /etc/ptth/server.toml
CMD ["ptth_relay", "--config", "/etc/ptth/relay.toml"]
