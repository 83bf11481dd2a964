package main

import (
	"context"
	"errors"
	"net"
	"net/http"
	"net/http/httptest"
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/client-go/rest"
)

// TestWaitForAPIServerWaitsInsteadOfFailing: while the API server does not answer (here it
// refuses /readyz three times), the controller's start waits for it rather than exiting into
// the kubelet's restart back-off, and goes on once it answers.
func TestWaitForAPIServerWaitsInsteadOfFailing(t *testing.T) {
	var calls atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/readyz" {
			http.NotFound(w, r)
			return
		}
		if calls.Add(1) <= 3 {
			http.Error(w, "etcd not ready", http.StatusServiceUnavailable)
			return
		}
		_, _ = w.Write([]byte("ok"))
	}))
	defer srv.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
	defer cancel()
	if err := waitForAPIServer(ctx, &rest.Config{Host: srv.URL}, ""); err != nil {
		t.Fatalf("waitForAPIServer: %v", err)
	}
	if n := calls.Load(); n != 4 {
		t.Fatalf("asked /readyz %d times, want 4 (three refusals, then ready)", n)
	}
}

// TestWaitForAPIServerEndsWithItsContext: a controller told to stop while it waits stops.
func TestWaitForAPIServerEndsWithItsContext(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		http.Error(w, "down", http.StatusServiceUnavailable)
	}))
	defer srv.Close()
	ctx, cancel := context.WithTimeout(t.Context(), time.Second)
	defer cancel()
	if err := waitForAPIServer(ctx, &rest.Config{Host: srv.URL}, ""); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("waitForAPIServer with the API server down returned %v, want the context's error", err)
	}
}

// TestWaitForAPIServerStaysLive: while the controller waits for the API server, the kubelet's
// liveness probe (/healthz on the probe address) is answered ok and its readiness probe not
// ready; once it returns, the address is free for the manager's own probe server.
func TestWaitForAPIServerStaysLive(t *testing.T) {
	up := make(chan struct{})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		select {
		case <-up:
			_, _ = w.Write([]byte("ok"))
		default:
			http.Error(w, "down", http.StatusServiceUnavailable)
		}
	}))
	defer srv.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	_ = ln.Close()
	done := make(chan error, 1)
	go func() { done <- waitForAPIServer(t.Context(), &rest.Config{Host: srv.URL}, addr) }()
	get := func(path string) int {
		resp, err := http.Get("http://" + addr + path)
		if err != nil {
			return 0
		}
		_ = resp.Body.Close()
		return resp.StatusCode
	}
	for deadline := time.Now().Add(30 * time.Second); get("/healthz") != http.StatusOK; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("/healthz never answered ok while waiting for the API server: the liveness probe would kill the controller")
		}
	}
	if code := get("/readyz"); code != http.StatusServiceUnavailable {
		t.Fatalf("/readyz while waiting = %d, want 503", code)
	}
	close(up)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	ln, err = net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("the probe address is still taken after the wait: %v", err)
	}
	_ = ln.Close()
}
