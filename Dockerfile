# The router as a small container image: built in the Rust image, run as a non-root
# user in a slim Debian image with only the binary (and CA certificates for the
# Kubernetes API).
#
#   docker build -t llm-router .
#   docker run --rm -p 8000:8000 llm-router --sim 4          # the simulated fleet
#   docker run --rm -p 8000:8000 llm-router --replicas http://vllm-0:8000,http://vllm-1:8000

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY benches ./benches
COPY crates ./crates
RUN cargo build --release --locked --bin router \
    && strip target/release/router

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 router \
    && useradd --system --uid 10001 --gid router --no-create-home --shell /usr/sbin/nologin router
COPY --from=build /src/target/release/router /usr/local/bin/router
USER 10001:10001
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/router"]
CMD ["--sim", "4"]
