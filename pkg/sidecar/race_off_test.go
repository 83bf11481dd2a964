//go:build !race

package sidecar_test

// scale divides the heavy line counts under the race detector.
const scale = 1

// raceFlags are the extra build flags of the sidecar processes: none without -race.
var raceFlags []string

// raceMemory multiplies the memory bounds of the attack tests: the race detector's
// shadow memory makes every goroutine and allocation of the sidecar larger.
const raceMemory = 1
