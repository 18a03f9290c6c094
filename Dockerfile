# One image per Herald binary, from one build: `docker build --build-arg BIN=herald-gateway .`
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --workspace --bins

FROM debian:bookworm-slim
ARG BIN
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/${BIN} /usr/local/bin/service
COPY examples /etc/herald/examples
# The example configs name their files relative to the repository root.
WORKDIR /etc/herald
USER 65534
ENTRYPOINT ["/usr/local/bin/service"]
