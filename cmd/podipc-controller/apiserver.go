package main

import (
	"context"
	"time"

	"k8s.io/client-go/discovery"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
)

// apiServerRetryCap bounds the wait between two attempts to reach the API server.
const apiServerRetryCap = 5 * time.Second

// waitForAPIServer returns once the API server answers /readyz, retrying (0.5 s, doubling
// up to apiServerRetryCap) rather than failing: the controller exits when it loses its
// leader lease (an API server outage longer than the lease's renew deadline), and a
// controller that then also exited at each start while the API server was still away would
// meet the kubelet's growing restart back-off (10 s, 20 s, 40 s …) and stay in
// CrashLoopBackOff for minutes after the API server came back. Waiting in the process makes
// that one prompt restart, and the controller leads again within seconds of the API server's
// return (docs/reliability.md measures it). It returns ctx.Err() if ctx ends first.
func waitForAPIServer(ctx context.Context, cfg *rest.Config) error {
	cfg = rest.CopyConfig(cfg)
	cfg.Timeout = apiServerRetryCap
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		return err
	}
	client := dc.RESTClient()
	delay := 500 * time.Millisecond
	for logged := false; ; logged = true {
		_, err := client.Get().AbsPath("/readyz").DoRaw(ctx)
		if err == nil {
			if logged {
				ctrl.Log.Info("The API server answers again")
			}
			return nil
		}
		if !logged {
			ctrl.Log.Info("Waiting for the API server", "error", err.Error())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(delay):
		}
		delay = min(2*delay, apiServerRetryCap)
	}
}
