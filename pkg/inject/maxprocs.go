package inject

import (
	"fmt"
	"strconv"
)

// AnnotationMaxProcs overrides, for one pod, how many OS threads its sidecar runs Go code on
// (GOMAXPROCS; Config.MaxProcs, the chart's sidecar.maxProcs). A pod whose lines need more
// than one core's worth of forwarding asks for more, with a CPU limit to match.
const AnnotationMaxProcs = "podipc.dev/sidecar-max-procs"

// EnvMaxProcs carries the number to the sidecar (its --max-procs default).
const EnvMaxProcs = "PODIPC_MAX_PROCS"

// maxProcs is the number the pod's sidecar runs on: the pod's annotation, else the
// controller's. 0 leaves the Go runtime's choice (the container's CPU limit, else every CPU
// of the node).
func (c Config) maxProcs(annotations map[string]string) (int, error) {
	value, ok := annotations[AnnotationMaxProcs]
	if !ok {
		return c.MaxProcs, nil
	}
	n, err := strconv.Atoi(value)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("annotation %s=%q is not a whole number of 0 or more (0: the Go runtime's choice, the CPU limit or else every CPU)", AnnotationMaxProcs, value)
	}
	return n, nil
}
