//go:build !race

package sidecar_test

// scale divides the heavy line counts under the race detector.
const scale = 1
