package cli

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/spf13/cobra"
)

// dialTimeout bounds connecting to the sidecar, which is local: a slow dial means it is
// not there.
const dialTimeout = 5 * time.Second

func newSendCommand(streams Streams) *cobra.Command {
	var o endpointOptions
	cmd := &cobra.Command{
		Use:   "send (CHANNEL | PORT) [LINE...]",
		Short: "Send lines to a channel",
		Long: `send connects to the sidecar's line port for a channel, writes each LINE argument as
one line (or, without LINE arguments, every line read from standard input until EOF),
and closes the connection. The sidecar carries each line to the other members' apps as
Channel.spec.delivery says: Broadcast to every other connection, AnyOne to one member.

From your machine, send port-forwards through the API server (as kubectl port-forward
does) into a ready member pod of the Channel, or the one --pod names, and connects to
its sidecar's line port there: it needs permission to read the Channel and its
EndpointSlices and to create pods/portforward in the namespace.

Inside a member pod (no kubeconfig, in-cluster service account), with a PORT number,
--port or --address, send connects to the sidecar on this machine instead. The
channel's port is --port, or a numeric first argument, or else the named Channel's
spec.localPort. With --port, every argument is a line.`,
		Example: `  # from your machine: one line to channel orders in namespace shop
  podipc send orders -n shop 'order 42 shipped'

  # through a particular member pod, with another kubeconfig context
  podipc send orders -n shop --pod orders-7d9f-x2k4q --context prod 'order 42 shipped'

  # a stream of lines from a file or a program
  tail -f /var/log/orders.log | podipc send orders -n shop

  # inside a member pod: the sidecar's port, known
  podipc send 7000 'order 42 shipped'`,
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			arg, lines := "", args
			if len(args) > 0 {
				arg, lines = args[0], args[1:]
			}
			if o.port != 0 && len(args) > 0 && o.pod == "" {
				// With --port every argument is a line.
				arg, lines = "", args
			}
			t, err := o.resolveTarget(cmd.Context(), streams, arg, cmd.Flags().Changed("address"))
			if err != nil {
				return err
			}
			src := streams.In
			if len(lines) > 0 {
				src = strings.NewReader(strings.Join(lines, "\n") + "\n")
			}
			c, where, err := t.dial(cmd.Context(), false)
			if err != nil {
				return err
			}
			return send(cmd.Context(), c, where, src)
		},
	}
	o.addFlags(cmd.Flags())
	return cmd
}

// send copies the lines of src to c, then closes it. Every line goes out terminated by
// '\n' (an unterminated last line gets one); output is flushed whenever src has nothing
// more buffered, so an interactive or slow source is sent line by line and a file is sent
// in large writes.
func send(ctx context.Context, c conn, where string, src io.Reader) error {
	defer func() { _ = c.Close() }()
	// Stop a blocked write when the context ends (Ctrl-C).
	stop := context.AfterFunc(ctx, func() { _ = c.Close() })
	defer stop()

	r := bufio.NewReaderSize(src, 64<<10)
	w := bufio.NewWriterSize(c, 64<<10)
	for {
		line, rerr := r.ReadString('\n')
		if line != "" {
			if !strings.HasSuffix(line, "\n") {
				line += "\n"
			}
			if _, err := w.WriteString(line); err != nil {
				return fmt.Errorf("sending to %s: %w", where, err)
			}
		}
		if rerr != nil || r.Buffered() == 0 {
			if err := w.Flush(); err != nil {
				return fmt.Errorf("sending to %s: %w", where, err)
			}
		}
		if errors.Is(rerr, io.EOF) {
			break
		}
		if rerr != nil {
			return fmt.Errorf("reading input: %w", rerr)
		}
	}
	// Half-close, so the sidecar sees a clean end of input after the last line.
	if err := c.CloseWrite(); err != nil {
		return fmt.Errorf("closing the connection to %s: %w", where, err)
	}
	return ctx.Err()
}
