# One image for every Herald binary, from one build. compose.yaml builds it once (as
# herald:0.1.0) and picks the binary per service with `entrypoint`:
#   docker build -t herald:0.1.0 . && docker run herald:0.1.0 herald-gateway --help
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --workspace --bins \
    && mkdir /out \
    && find target/release -maxdepth 1 -type f -executable -name 'herald*' -exec cp {} /out/ ';'

FROM debian:12.11-slim
# curl runs the compose healthchecks (GET /ready on each service's admin port).
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/ /usr/local/bin/
# The example configs name their files relative to the repository root, so /etc/herald mirrors
# it: every path copied here keeps its place.
COPY examples /etc/herald/examples
WORKDIR /etc/herald
USER 65534
