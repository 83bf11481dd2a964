# syntax=docker/dockerfile:1
# The one podipc image: /podipc-controller (controller + webhook), /podipc-sidecar (the
# injected data plane) and /podipc (the CLI, also the helm test). The chart and the
# webhook pick the binary with `command`; the entrypoint is the controller.
#
# There is no Docker engine in CI: hack/image builds the same image as a docker-archive
# tarball from the same binaries (`make image`), and test/image checks that this file and
# that builder agree on binaries, paths, user and entrypoint.

FROM --platform=$BUILDPLATFORM golang:1.26 AS build
ARG TARGETOS=linux
ARG TARGETARCH=amd64
ARG VERSION=dev
WORKDIR /src
COPY go.mod go.sum ./
RUN --mount=type=cache,target=/root/go/pkg/mod go mod download
COPY . .
# Static (no libc in the final image), reproducible (trimpath), stripped; the sidecar reports
# VERSION as podipc_build_info{version}.
RUN --mount=type=cache,target=/root/go/pkg/mod --mount=type=cache,target=/root/.cache/go-build \
    CGO_ENABLED=0 GOOS=$TARGETOS GOARCH=$TARGETARCH \
    go build -trimpath -ldflags "-s -w -X github.com/podipc/podipc/pkg/sidecar.Version=${VERSION}" -o /out/ \
      ./cmd/podipc-controller ./cmd/podipc-sidecar ./cmd/podipc

# Nothing but the binaries: no shell, no package manager, no libc. The processes need no
# CA bundle of their own (they trust the cluster's CA from the service-account mount).
FROM scratch
COPY --from=build /out/podipc-controller /out/podipc-sidecar /out/podipc /
# distroless "nonroot"; the chart and the injected sidecar set the same numeric user, so
# runAsNonRoot is verifiable without /etc/passwd.
USER 65532:65532
ENTRYPOINT ["/podipc-controller"]
