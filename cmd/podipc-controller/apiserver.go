package main

import (
	"context"
	"errors"
	"net"
	"net/http"
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
//
// Meanwhile it answers the kubelet's probes on probeAddr (unless empty or "0"): /healthz ok
// (the process is alive and doing what it should), /readyz not ready. The manager, which
// serves them afterwards, does not exist yet; without this the liveness probe failed during
// a long outage and the kubelet killed the waiting controller into the same back-off (three
// restarts in a 60 s outage, leading again 92 s after it: docs/reliability.md).
func waitForAPIServer(ctx context.Context, cfg *rest.Config, probeAddr string) error {
	if probeAddr != "" && probeAddr != "0" {
		stop, err := serveWaitingProbes(ctx, probeAddr)
		if err != nil {
			return err
		}
		defer stop()
	}
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

// serveWaitingProbes serves /healthz (ok) and /readyz (503) on addr until stop, which
// returns once the address is free again for the manager's probe server.
func serveWaitingProbes(ctx context.Context, addr string) (stop func(), err error) {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return nil, err
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok")) })
	mux.HandleFunc("GET /readyz", func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "waiting for the API server", http.StatusServiceUnavailable)
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			ctrl.Log.Error(err, "Serving the probes while waiting for the API server")
		}
	}()
	return func() {
		_ = srv.Close()
		<-done
	}, nil
}
