// Package cli is the podipc command line: send lines to a channel, tail a channel, show a
// channel's status, list its members and check that the injector works. cmd/podipc only
// wires it to the process's streams and signals.
//
// send and tail talk to the sidecar's app-facing line port exactly like an app does: from
// outside the cluster through a port-forward into a ready member pod (the API server's
// pods/portforward, as kubectl port-forward), inside a member pod on 127.0.0.1. status
// reads every member sidecar's /metrics through the API server's pod proxy. members,
// status and check-injection talk to the API server through the user's kubeconfig (or
// the in-cluster service account).
package cli

import (
	"context"
	"io"

	"github.com/spf13/cobra"
)

// Streams are the command's standard streams; tests replace them.
type Streams struct {
	In  io.Reader
	Out io.Writer
	Err io.Writer
}

// NewCommand returns the podipc root command with every subcommand.
func NewCommand(streams Streams) *cobra.Command {
	root := &cobra.Command{
		Use:   "podipc",
		Short: "Talk to podipc channels and inspect their members",
		Long: `podipc is the command line of podipc, line-protocol IPC between Kubernetes pods.

A Channel (podipc.dev/v1alpha1) groups pods annotated podipc.dev/inject: "true" and
podipc.dev/channels: "<name>". Inside each member pod the injected podipc-sidecar serves
the channel on 127.0.0.1:<Channel.spec.localPort>: every line written there reaches the
other members. send and tail use that port like an app would, from your machine through
a port-forward into a member pod; status reads every member's sidecar metrics; members
and check-injection ask the API server.`,
		Example: `  # from your machine: follow channel orders in namespace shop, and send it a line
  podipc tail orders -n shop
  podipc send orders -n shop 'hello from my laptop'

  # is every member reaching every other, and is anything dropped?
  podipc status orders -n shop

  # who is on channel orders?
  podipc members orders -n shop

  # inside a member pod: the sidecar's port on localhost
  podipc send 7000 'hello from the shell'`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	root.SetIn(streams.In)
	root.SetOut(streams.Out)
	root.SetErr(streams.Err)
	root.AddCommand(
		newSendCommand(streams),
		newTailCommand(streams),
		newMembersCommand(streams),
		newStatusCommand(streams),
		newCheckInjectionCommand(streams),
	)
	return root
}

// Run executes the command line args and returns the process exit code, printing a
// failure to streams.Err.
func Run(ctx context.Context, args []string, streams Streams) int {
	cmd := NewCommand(streams)
	cmd.SetArgs(args)
	if err := cmd.ExecuteContext(ctx); err != nil {
		_, _ = io.WriteString(streams.Err, "podipc: "+err.Error()+"\n")
		return 1
	}
	return 0
}
