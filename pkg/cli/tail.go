package cli

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strings"
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
	var output string
	cmd := &cobra.Command{
		Use:   "tail (CHANNEL | PORT)",
		Short: "Print the lines arriving on a channel",
		Long: `tail connects to the sidecar's line port for a channel and prints every line that
arrives, one per output line, until interrupted. It is a connection on the channel like
any app's: with Broadcast delivery it sees every line the other members send; with AnyOne
it is one of the candidates that share them.

From your machine, tail port-forwards through the API server (as kubectl port-forward
does) into a ready member pod of the Channel, or the one --pod names, and says on
standard error which pod it is attached to. When that pod goes away, tail attaches to
another ready member and says so. It needs permission to read the Channel and its
EndpointSlices and to create pods/portforward in the namespace. Inside a member pod
(no kubeconfig, in-cluster service account), with a PORT number, --port or --address,
tail connects to the sidecar on this machine instead.

When the connection ends (the pod went away, the sidecar restarted, or is not up yet),
tail reconnects with a backoff from 100ms up to 5s and says so on standard error;
--no-reconnect makes it exit instead. Lines sent while it was disconnected are not
replayed. Lines do not carry their sending pod, so tail cannot show it.

--output json prints one JSON object per line: {"time", "pod", "line"}, where time is
when tail read it and pod is the member tail is attached to ("" on this machine).`,
		Example: `  # from your machine: follow channel orders in namespace shop
  podipc tail orders -n shop

  # through a given member pod, as JSON for a script
  podipc tail orders -n shop --pod orders-7d9f-x2k4q -o json | jq -r .line

  # inside a member pod: follow a known port, stop when the sidecar goes away
  podipc tail 7000 --no-reconnect`,
		Args: cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			if output != "" && output != "json" {
				return fmt.Errorf("unknown output format %q: the only one is json", output)
			}
			arg := ""
			if len(args) == 1 {
				arg = args[0]
			}
			tg, err := o.resolveTarget(cmd.Context(), streams, arg, cmd.Flags().Changed("address"))
			if err != nil {
				return err
			}
			t := tailer{target: tg, out: streams.Out, log: streams.Err, reconnect: !noReconnect, json: output == "json",
				backoff: backoff{min: 100 * time.Millisecond, max: 5 * time.Second}}
			return t.run(cmd.Context())
		},
	}
	o.addFlags(cmd.Flags())
	cmd.Flags().BoolVar(&noReconnect, "no-reconnect", false, "exit when the connection ends instead of reconnecting")
	cmd.Flags().StringVarP(&output, "output", "o", "", "output format: json (one object per line) or, by default, the lines as they are")
	return cmd
}

// errOutput marks a failure to write tail's own output (a closed pipe): reconnecting
// cannot help, so tail exits.
var errOutput = errors.New("writing output")

// tailer copies the lines arriving at its target to out, reconnecting when asked to.
type tailer struct {
	target    target
	out       io.Writer
	log       io.Writer
	reconnect bool
	json      bool
	backoff   backoff
}

// run returns nil when ctx ends, or the connection's error when it ends and reconnect is
// off (nil for a clean close by the sidecar).
func (t *tailer) run(ctx context.Context) error {
	attached, lost := "", false
	for {
		got, where, err := t.once(ctx, lost, &attached)
		if ctx.Err() != nil {
			return nil //nolint:nilerr // the error is the cancellation the user asked for
		}
		if !t.reconnect || errors.Is(err, errOutput) {
			return err
		}
		if got {
			t.backoff.reset()
		}
		lost = true
		d := t.backoff.wait()
		reason := "closed by the sidecar"
		if err != nil {
			reason = err.Error()
		}
		if where == "" {
			_, _ = fmt.Fprintf(t.log, "podipc: %s; retrying in %s\n", reason, d)
		} else {
			_, _ = fmt.Fprintf(t.log, "podipc: connection to %s lost (%s); reconnecting in %s\n", where, reason, d)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(d):
		}
	}
}

// once runs one connection to its end, reporting whether any line arrived and where
// it was attached. It says on the log when it attaches somewhere new; attached is the
// last place it said.
func (t *tailer) once(ctx context.Context, lost bool, attached *string) (bool, string, error) {
	c, where, err := t.target.dial(ctx, lost)
	if err != nil {
		return false, where, err
	}
	defer func() { _ = c.Close() }()
	switch *attached {
	case where:
	case "":
		_, _ = fmt.Fprintf(t.log, "podipc: attached to %s\n", where)
	default:
		_, _ = fmt.Fprintf(t.log, "podipc: reattached to %s (was %s)\n", where, *attached)
	}
	*attached = where
	stop := context.AfterFunc(ctx, func() { _ = c.Close() })
	defer stop()

	pod := ""
	if p, ok := strings.CutPrefix(where, "pod "); ok {
		pod = p
	}
	r := bufio.NewReaderSize(c, 64<<10)
	w := bufio.NewWriter(t.out)
	got := false
	for {
		line, err := r.ReadString('\n')
		if line != "" {
			got = true
			t.write(w, line, pod)
		}
		// Flush once nothing more is waiting, so output keeps up with a live channel.
		if err != nil || r.Buffered() == 0 {
			if ferr := w.Flush(); ferr != nil {
				return got, where, fmt.Errorf("%w: %w", errOutput, ferr)
			}
		}
		if errors.Is(err, io.EOF) {
			return got, where, nil
		}
		if err != nil {
			return got, where, err
		}
	}
}

// tailRecord is one line of --output json.
type tailRecord struct {
	Time time.Time `json:"time"`
	Pod  string    `json:"pod"`
	Line string    `json:"line"`
}

// write prints one line read (with or without its terminator: an unterminated last
// line is still a line).
func (t *tailer) write(w *bufio.Writer, line, pod string) {
	line = strings.TrimSuffix(line, "\n")
	if !t.json {
		_, _ = w.WriteString(line)
		_ = w.WriteByte('\n')
		return
	}
	b, err := json.Marshal(tailRecord{Time: time.Now().UTC(), Pod: pod, Line: line})
	if err != nil {
		// Only a time outside years 0-9999 fails to marshal; print the line as it is.
		b, _ = json.Marshal(line) //nolint:errchkjson // a string always marshals
	}
	_, _ = w.Write(append(b, '\n'))
}
