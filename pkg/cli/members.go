package cli

import (
	"cmp"
	"context"
	"fmt"
	"io"
	"slices"
	"strconv"
	"text/tabwriter"

	"github.com/spf13/cobra"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
)

// channelLabel is the label the controller puts on a Channel's EndpointSlices (docs/design.md §3.1).
const channelLabel = "podipc.dev/channel"

// member is one row of `podipc members`.
type member struct {
	Pod         string
	IP          string
	Node        string
	Ready       bool
	Terminating bool
}

func newMembersCommand(streams Streams) *cobra.Command {
	var o kubeOptions
	cmd := &cobra.Command{
		Use:   "members CHANNEL",
		Short: "List the member pods of a channel",
		Long: `members lists the pods on a channel, as the controller publishes them: the
EndpointSlices labelled podipc.dev/channel=CHANNEL in the channel's namespace. Each row is
a pod, its IP (where its sidecar's peer port 7701 listens), its node, whether it is ready
(its sidecar serves the channel) and whether it is terminating.

A pod annotated for the channel but missing here was most likely created without a sidecar
(the webhook was down or skipped it: see the pod's Events) or has no IP yet.`,
		Example: `  podipc members orders -n shop
  podipc members orders --context prod -n shop`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			cs, ns, err := o.clientset(streams)
			if err != nil {
				return err
			}
			ms, err := listMembers(cmd.Context(), cs, ns, args[0])
			if err != nil {
				return err
			}
			if len(ms) == 0 {
				_, _ = fmt.Fprintf(streams.Err, "No members of channel %s in namespace %s.\n", args[0], ns)
				return nil
			}
			return printMembers(streams.Out, ms)
		},
	}
	o.addFlags(cmd.Flags())
	return cmd
}

// listMembers returns the channel's members sorted by pod name. A channel without
// EndpointSlices is checked for existence, so a typo is an error, not an empty list.
func listMembers(ctx context.Context, cs kubernetes.Interface, ns, channel string) ([]member, error) {
	list, err := cs.DiscoveryV1().EndpointSlices(ns).List(ctx, metav1.ListOptions{
		LabelSelector: channelLabel + "=" + channel,
	})
	if err != nil {
		return nil, fmt.Errorf("listing the EndpointSlices of channel %s/%s: %w", ns, channel, err)
	}
	var ms []member
	for i := range list.Items {
		for _, ep := range list.Items[i].Endpoints {
			ms = append(ms, memberOf(ep))
		}
	}
	if len(ms) == 0 && len(list.Items) == 0 {
		path := "/apis/" + channelResource.Group + "/" + channelResource.Version + "/namespaces/" + ns + "/" + channelResource.Resource + "/" + channel
		err := cs.Discovery().RESTClient().Get().AbsPath(path).Do(ctx).Error()
		if apierrors.IsNotFound(err) {
			return nil, fmt.Errorf("channel %s not found in namespace %s", channel, ns)
		}
		// Any other answer (found, or not allowed to read Channels): an empty list is the truth.
	}
	slices.SortFunc(ms, func(a, b member) int { return cmp.Or(cmp.Compare(a.Pod, b.Pod), cmp.Compare(a.IP, b.IP)) })
	return ms, nil
}

func memberOf(ep discoveryv1.Endpoint) member {
	m := member{Pod: "<unknown>", IP: "<none>", Node: "<none>"}
	if ep.TargetRef != nil {
		m.Pod = ep.TargetRef.Name
	}
	if len(ep.Addresses) > 0 {
		m.IP = ep.Addresses[0]
	}
	if ep.NodeName != nil && *ep.NodeName != "" {
		m.Node = *ep.NodeName
	}
	// EndpointSlice semantics: a nil ready means ready, nil terminating means not.
	m.Ready = ep.Conditions.Ready == nil || *ep.Conditions.Ready
	m.Terminating = ep.Conditions.Terminating != nil && *ep.Conditions.Terminating
	return m
}

func printMembers(out io.Writer, ms []member) error {
	tw := tabwriter.NewWriter(out, 0, 8, 3, ' ', 0)
	_, _ = fmt.Fprintln(tw, "POD\tIP\tNODE\tREADY\tTERMINATING")
	for _, m := range ms {
		_, _ = fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", m.Pod, m.IP, m.Node, strconv.FormatBool(m.Ready), strconv.FormatBool(m.Terminating))
	}
	return tw.Flush()
}
