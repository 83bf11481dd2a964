// Command podipc is the podipc command line: send lines to a channel, tail it, list its
// members, check injection. See `podipc --help`; the logic lives in pkg/cli.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"

	"github.com/podipc/podipc/pkg/cli"
)

func main() {
	// The first signal cancels the context (tail and send stop cleanly); stopping the
	// notification then restores the default action, so a second signal exits at once.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	go func() { <-ctx.Done(); stop() }()
	code := cli.Run(ctx, os.Args[1:], cli.Streams{In: os.Stdin, Out: os.Stdout, Err: os.Stderr})
	stop()
	os.Exit(code)
}
