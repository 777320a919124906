# syntax=docker/dockerfile:1
# finhub-sidecar image: build with the Rust toolchain, ship only the binary on distroless.
#   docker build -t ghcr.io/example/finhub-sidecar:0.1.0 .
# Runtime: gcr.io/distroless/cc-debian12:nonroot = glibc + libgcc + CA certificates, no shell or
# package manager, user 65532. The binary uses rustls (no OpenSSL at run time) and links
# dynamically only against glibc and libgcc_s (both in distroless/cc, same Debian 12 as the
# builder). Pin both images by digest in your own pipeline.

ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS build
# Nothing to install: the C compiler (for ring) is in the rust image, and Pingora's flate2 uses
# its Rust backend (vendor/PATCHES.md), so no cmake.
WORKDIR /src
COPY . .
# BuildKit caches keep the crate registry and target/ between builds; the binary is copied out
# of the cached target/ in the same step.
# --no-default-features: no `demo` feature, so no FinHub emulator or certificate generator
# (crates/finhub-testkit) in the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p finhub-sidecar --bin finhub-sidecar --no-default-features \
 && install -D -m 0755 target/release/finhub-sidecar /out/finhub-sidecar

FROM ${RUNTIME_IMAGE}
COPY --from=build /out/finhub-sidecar /usr/local/bin/finhub-sidecar
USER 65532:65532
# 8080: proxy listener (apps, plain HTTP); 9901: admin (/live, /ready, /metrics, /status).
EXPOSE 8080 9901
ENTRYPOINT ["/usr/local/bin/finhub-sidecar"]
CMD ["run", "--config", "/etc/finhub/proxy.toml"]
