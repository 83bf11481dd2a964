package cli

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/spf13/cobra"
)

// backoff is how tail waits between reconnection attempts: doubling from min to max,
// back to min once a connection has delivered a line.
type backoff struct {
	min, max time.Duration
	next     time.Duration
}

func (b *backoff) reset() { b.next = b.min }

func (b *backoff) wait() time.Duration {
	if b.next < b.min {
		b.next = b.min
	}
	d := b.next
	b.next = min(2*b.next, b.max)
	return d
}

func newTailCommand(streams Streams) *cobra.Command {
	var o endpointOptions
	var noReconnect bool
	cmd := &cobra.Command{
		Use:   "tail (CHANNEL | PORT)",
		Short: "Print the lines arriving on a channel",
		Long: `tail connects to the sidecar's line port for a channel and prints every line that
arrives, one per output line, until interrupted. It is a connection on the channel like
any app's: with Broadcast delivery it sees every line the other members send; with AnyOne
it is one of the candidates that share them.

When the connection ends (the sidecar restarted, or is not up yet), tail reconnects with
a backoff from 100ms up to 5s and says so on standard error; --no-reconnect makes it exit
instead. Lines sent while it was disconnected are not replayed.`,
		Example: `  # follow channel orders from inside a member pod
  podipc tail orders

  # follow a known port, stop when the sidecar goes away
  podipc tail 7000 --no-reconnect`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			target := ""
			if len(args) == 1 {
				target = args[0]
			}
			addr, err := o.resolve(cmd.Context(), streams, target)
			if err != nil {
				return err
			}
			t := tailer{addr: addr, out: streams.Out, log: streams.Err, reconnect: !noReconnect,
				backoff: backoff{min: 100 * time.Millisecond, max: 5 * time.Second}}
			return t.run(cmd.Context())
		},
	}
	o.addFlags(cmd.Flags())
	cmd.Flags().BoolVar(&noReconnect, "no-reconnect", false, "exit when the connection ends instead of reconnecting")
	return cmd
}

// errOutput marks a failure to write tail's own output (a closed pipe): reconnecting
// cannot help, so tail exits.
var errOutput = errors.New("writing output")

// tailer copies the lines arriving at addr to out, reconnecting when asked to.
type tailer struct {
	addr      string
	out       io.Writer
	log       io.Writer
	reconnect bool
	backoff   backoff
}

// run returns nil when ctx ends, or the connection's error when it ends and reconnect is
// off (nil for a clean close by the sidecar).
func (t *tailer) run(ctx context.Context) error {
	for {
		got, err := t.once(ctx)
		if ctx.Err() != nil {
			return nil //nolint:nilerr // the error is the cancellation the user asked for
		}
		if !t.reconnect || errors.Is(err, errOutput) {
			return err
		}
		if got {
			t.backoff.reset()
		}
		d := t.backoff.wait()
		reason := "closed by the sidecar"
		if err != nil {
			reason = err.Error()
		}
		_, _ = fmt.Fprintf(t.log, "podipc: connection to %s lost (%s); reconnecting in %s\n", t.addr, reason, d)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(d):
		}
	}
}

// once runs one connection to its end, reporting whether any line arrived.
func (t *tailer) once(ctx context.Context) (bool, error) {
	d := net.Dialer{Timeout: dialTimeout}
	conn, err := d.DialContext(ctx, "tcp", t.addr)
	if err != nil {
		return false, err
	}
	defer func() { _ = conn.Close() }()
	stop := context.AfterFunc(ctx, func() { _ = conn.SetReadDeadline(time.Now()) })
	defer stop()

	r := bufio.NewReaderSize(conn, 64<<10)
	w := bufio.NewWriter(t.out)
	got := false
	for {
		line, err := r.ReadString('\n')
		if line != "" {
			got = true
			if line[len(line)-1] != '\n' {
				line += "\n" // an unterminated last line is still a line
			}
			_, _ = w.WriteString(line)
		}
		// Flush once nothing more is waiting, so output keeps up with a live channel.
		if err != nil || r.Buffered() == 0 {
			if ferr := w.Flush(); ferr != nil {
				return got, fmt.Errorf("%w: %w", errOutput, ferr)
			}
		}
		if errors.Is(err, io.EOF) {
			return got, nil
		}
		if err != nil {
			return got, err
		}
	}
}
