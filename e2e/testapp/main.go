// Command testapp is the workload of the e2e suite: a tiny static program, packed into an image
// by hack/image, whose behaviour the suites check through pod logs, exit codes and (stream) an
// HTTP report read through the API server, never exec:
//
//	testapp print LINE       print LINE, then run until SIGTERM
//	testapp exit LINE        print LINE and exit 0 (a Job)
//	testapp serve ADDR       answer each line received on TCP ADDR with "echo: LINE"
//	testapp dial ADDR LINE   send LINE to ADDR (retrying while the server starts), print the
//	                         answer, then run until SIGTERM
//	testapp apiserver        GET /version from the API server through the kubernetes Service
//	                         with the pod's service account token, print it, run until SIGTERM
//	testapp talk BCAST ANY PEERS N
//	                         a podipc member app; see talk.go
//	testapp hello ADDR NS NAME UID CHANNELS
//	                         dial a sidecar's peer port in plaintext, replay a member's HELLO,
//	                         print the answer (refused: REASON), then run until SIGTERM; see hello.go
//	testapp stream BCAST ANY RATE REPORT
//	                         the fault suite's member app: numbered lines at a fixed rate,
//	                         what arrived served on REPORT; see stream.go
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"
)

const saDir = "/var/run/secrets/kubernetes.io/serviceaccount"

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	err := run(ctx, os.Args[1:])
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "testapp:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	if len(args) == 0 {
		return errors.New("usage: testapp print|exit|serve|dial|talk|stream|flood|apiserver …")
	}
	switch cmd, rest := args[0], args[1:]; {
	case cmd == "print" && len(rest) == 1:
		fmt.Println(rest[0])
	case cmd == "exit" && len(rest) == 1:
		fmt.Println(rest[0])
		return nil
	case cmd == "serve" && len(rest) == 1:
		return serve(ctx, rest[0])
	case cmd == "dial" && len(rest) == 2:
		if err := dial(ctx, rest[0], rest[1]); err != nil {
			return err
		}
	case cmd == "talk" && len(rest) == 4:
		if err := talk(ctx, rest); err != nil {
			return err
		}
	case cmd == "hello" && len(rest) == 5:
		if err := hello(ctx, rest); err != nil {
			return err
		}
	case cmd == "stream" && len(rest) == 4:
		return stream(ctx, rest)
	case cmd == "flood" && len(rest) == 4:
		return flood(ctx, rest)
	case cmd == "apiserver" && len(rest) == 0:
		if err := apiserverVersion(ctx); err != nil {
			return err
		}
	default:
		return fmt.Errorf("bad arguments %q", args)
	}
	<-ctx.Done()
	return nil
}

func serve(ctx context.Context, addr string) error {
	var lc net.ListenConfig
	ln, err := lc.Listen(ctx, "tcp", addr)
	if err != nil {
		return err
	}
	fmt.Println("listening on", ln.Addr())
	go func() {
		<-ctx.Done()
		_ = ln.Close()
	}()
	for {
		conn, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil //nolint:nilerr // Accept fails because the shutdown closed the listener
			}
			return err
		}
		go func() {
			defer func() { _ = conn.Close() }()
			sc := bufio.NewScanner(conn)
			for sc.Scan() {
				fmt.Printf("served %q from %s\n", sc.Text(), conn.RemoteAddr())
				if _, err := fmt.Fprintf(conn, "echo: %s\n", sc.Text()); err != nil {
					return
				}
			}
		}()
	}
}

func dial(ctx context.Context, addr, line string) error {
	var d net.Dialer
	deadline := time.Now().Add(2 * time.Minute)
	for {
		conn, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			defer func() { _ = conn.Close() }()
			if _, err := fmt.Fprintln(conn, line); err != nil {
				return err
			}
			reply, err := bufio.NewReader(conn).ReadString('\n')
			if err != nil {
				return err
			}
			fmt.Print("reply: ", reply)
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return err
		}
		time.Sleep(time.Second)
	}
}

// apiserverVersion does what an in-cluster client does: KUBERNETES_SERVICE_HOST/PORT (the
// Service IP, made to work by kube-proxy), the mounted CA and service account token.
func apiserverVersion(ctx context.Context) error {
	host, port := os.Getenv("KUBERNETES_SERVICE_HOST"), os.Getenv("KUBERNETES_SERVICE_PORT")
	ca, err := os.ReadFile(saDir + "/ca.crt")
	if err != nil {
		return err
	}
	token, err := os.ReadFile(saDir + "/token")
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(ca)
	client := &http.Client{
		Timeout:   10 * time.Second,
		Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}},
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+net.JoinHostPort(host, port)+"/version", nil)
	if err != nil {
		return err
	}
	req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(token)))
	resp, err := client.Do(req)
	if err != nil {
		return err
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET /version: %s: %s", resp.Status, body)
	}
	var v struct {
		GitVersion string `json:"gitVersion"`
	}
	if err := json.Unmarshal(body, &v); err != nil {
		return err
	}
	fmt.Printf("apiserver %s via %s\n", v.GitVersion, net.JoinHostPort(host, port))
	return nil
}
