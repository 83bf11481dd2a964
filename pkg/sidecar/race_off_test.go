//go:build !race

package sidecar_test

// scale divides the heavy line counts under the race detector.
const scale = 1

// raceFlags are the extra build flags of the sidecar processes: none without -race.
var raceFlags []string
