//go:build race

package sidecar_test

// scale divides the heavy line counts under the race detector.
const scale = 20

// raceFlags build the sidecar processes with the race detector too, so a data race in
// the sidecar under test fails the test that provoked it.
var raceFlags = []string{"-race"}

// raceMemory multiplies the memory bounds of the attack tests: the race detector's
// shadow memory makes every goroutine and allocation of the sidecar larger.
const raceMemory = 4
