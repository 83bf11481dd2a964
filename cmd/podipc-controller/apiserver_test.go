package main

import (
	"context"
	"errors"
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
	if err := waitForAPIServer(ctx, &rest.Config{Host: srv.URL}); err != nil {
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
	if err := waitForAPIServer(ctx, &rest.Config{Host: srv.URL}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("waitForAPIServer with the API server down returned %v, want the context's error", err)
	}
}
