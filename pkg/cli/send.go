package cli

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
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
		Short: "Send lines to a channel through the local sidecar",
		Long: `send connects to the sidecar's line port for a channel, writes each LINE argument as
one line (or, without LINE arguments, every line read from standard input until EOF),
and closes the connection. The sidecar carries each line to the other members' apps as
Channel.spec.delivery says: Broadcast to every other connection, AnyOne to one member.

The channel's port is --port, or a numeric first argument, or else the named Channel's
spec.localPort, read through your kubeconfig (inside a member pod, its service account
may read the Channels of its namespace). With --port, every argument is a line.`,
		Example: `  # one line, port known
  podipc send 7000 'order 42 shipped'

  # the port looked up from Channel shop/orders
  podipc send orders -n shop 'order 42 shipped'

  # a stream of lines from a file or a program
  tail -f /var/log/orders.log | podipc send orders

  # a sidecar on another loopback address (--discovery=static setups)
  podipc send --address 127.0.0.2 --port 7000 hello`,
		Args: cobra.ArbitraryArgs,
		RunE: func(cmd *cobra.Command, args []string) error {
			target, lines := "", args
			if len(args) > 0 {
				target, lines = args[0], args[1:]
			}
			if o.port != 0 && len(args) > 0 {
				// With --port every argument is a line.
				target, lines = "", args
			}
			addr, err := o.resolve(cmd.Context(), streams, target)
			if err != nil {
				return err
			}
			src := streams.In
			if len(lines) > 0 {
				src = strings.NewReader(strings.Join(lines, "\n") + "\n")
			}
			return send(cmd.Context(), addr, src)
		},
	}
	o.addFlags(cmd.Flags())
	return cmd
}

// send copies the lines of src to a connection to addr. Every line goes out terminated by
// '\n' (an unterminated last line gets one); output is flushed whenever src has nothing
// more buffered, so an interactive or slow source is sent line by line and a file is sent
// in large writes.
func send(ctx context.Context, addr string, src io.Reader) error {
	d := net.Dialer{Timeout: dialTimeout}
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("connecting to the sidecar at %s (is this a member pod of the channel?): %w", addr, err)
	}
	defer func() { _ = conn.Close() }()
	// Stop a blocked read or write when the context ends (Ctrl-C).
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Now()) })
	defer stop()

	r := bufio.NewReaderSize(src, 64<<10)
	w := bufio.NewWriterSize(conn, 64<<10)
	for {
		line, rerr := r.ReadString('\n')
		if line != "" {
			if !strings.HasSuffix(line, "\n") {
				line += "\n"
			}
			if _, err := w.WriteString(line); err != nil {
				return fmt.Errorf("sending to %s: %w", addr, err)
			}
		}
		if rerr != nil || r.Buffered() == 0 {
			if err := w.Flush(); err != nil {
				return fmt.Errorf("sending to %s: %w", addr, err)
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
	if tc, ok := conn.(*net.TCPConn); ok {
		if err := tc.CloseWrite(); err != nil {
			return fmt.Errorf("closing the connection to %s: %w", addr, err)
		}
	}
	return ctx.Err()
}
