//go:build race

package sidecar_test

// scale divides the heavy line counts under the race detector.
const scale = 20

// raceFlags build the sidecar processes with the race detector too, so a data race in
// the sidecar under test fails the test that provoked it.
var raceFlags = []string{"-race"}
