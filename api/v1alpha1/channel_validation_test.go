package v1alpha1_test

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime/serializer"
	"k8s.io/client-go/rest"

	podipcv1alpha1 "github.com/podipc/podipc/api/v1alpha1"
	"github.com/podipc/podipc/internal/testenv"
)

var env *testenv.Env

func TestMain(m *testing.M) { testenv.Main(m, &env) }

// TestChannelDefaults: an empty spec gets the documented defaults from the API server, so
// every reader (controller, sidecar, kubectl) sees the same values.
func TestChannelDefaults(t *testing.T) {
	ch := &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Name: "defaults", Namespace: "default"}}
	if err := env.Client.Create(t.Context(), ch); err != nil {
		t.Fatalf("create: %v", err)
	}
	t.Cleanup(func() { _ = env.Client.Delete(t.Context(), ch) })

	s := ch.Spec
	if s.LocalPort != 7000 || s.Delivery != podipcv1alpha1.DeliveryBroadcast || s.MaxMessageBytes != 65536 ||
		s.Overflow.Policy != podipcv1alpha1.OverflowWaitThenDrop || s.Overflow.QueueBytes != 1<<20 ||
		s.Overflow.MaxWait == nil || s.Overflow.MaxWait.Duration != 100*time.Millisecond ||
		s.Overflow.MaxBlock == nil || s.Overflow.MaxBlock.Duration != 30*time.Second {
		t.Errorf("defaults = %+v (maxWait %v, maxBlock %v), want port 7000, Broadcast, 65536, WaitThenDrop, 1MiB, 100ms, 30s",
			s, s.Overflow.MaxWait, s.Overflow.MaxBlock)
	}
}

// TestChannelValidation: invalid Channels are rejected by the API server itself, with a
// message that tells the user what is wrong.
func TestChannelValidation(t *testing.T) {
	tests := map[string]struct {
		spec    string // JSON of .spec
		message string // a substring of the rejection
	}{
		"port below 1024":        {`{"localPort": 80}`, "should be greater than or equal to 1024"},
		"port above 65535":       {`{"localPort": 70000}`, "should be less than or equal to 65535"},
		"peer port":              {`{"localPort": 7701}`, "must not be 7701 or 7702"},
		"admin port":             {`{"localPort": 7702}`, "must not be 7701 or 7702"},
		"unknown delivery":       {`{"delivery": "Multicast"}`, `Unsupported value: "Multicast"`},
		"unknown policy":         {`{"overflow": {"policy": "Spill"}}`, `Unsupported value: "Spill"`},
		"message above 16MiB":    {`{"maxMessageBytes": 16777217}`, "should be less than or equal to 16777216"},
		"maxWait above 10s":      {`{"overflow": {"maxWait": "11s"}}`, "overflow.maxWait must be at most 10s"},
		"maxWait not a duration": {`{"overflow": {"maxWait": "soon"}}`, "should match"},
		"maxBlock above 1h":      {`{"overflow": {"maxBlock": "61m"}}`, "overflow.maxBlock must be within 1ms and 1h"},
		"maxBlock zero":          {`{"overflow": {"maxBlock": "0s"}}`, "overflow.maxBlock must be within 1ms and 1h"},
		"queue below a message":  {`{"maxMessageBytes": 2097152}`, "queueBytes must be at least maxMessageBytes"},
	}
	for name, tc := range tests {
		t.Run(name, func(t *testing.T) {
			err := createRaw(t, "invalid", tc.spec)
			if err == nil {
				t.Fatalf("spec %s was accepted", tc.spec)
			}
			if !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), tc.message) {
				t.Errorf("spec %s: got %v, want an Invalid error containing %q", tc.spec, err, tc.message)
			}
		})
	}
}

// TestChannelNameMustBeDNSLabel: channel names end up in label values, env lists and
// socket paths, so dots are refused even though object names allow them.
func TestChannelNameMustBeDNSLabel(t *testing.T) {
	err := createRaw(t, "orders.v2", `{}`)
	if err == nil || !strings.Contains(err.Error(), "must be a DNS label") {
		t.Errorf("name orders.v2: got %v, want a DNS label rejection", err)
	}
}

// TestLocalPortImmutable: apps are connected to the local port, so it cannot change; the
// other fields can.
func TestLocalPortImmutable(t *testing.T) {
	ch := &podipcv1alpha1.Channel{
		ObjectMeta: metav1.ObjectMeta{Name: "immutable", Namespace: "default"},
		Spec:       podipcv1alpha1.ChannelSpec{LocalPort: 7100},
	}
	if err := env.Client.Create(t.Context(), ch); err != nil {
		t.Fatalf("create: %v", err)
	}
	t.Cleanup(func() { _ = env.Client.Delete(t.Context(), ch) })

	ch.Spec.LocalPort = 7200
	err := env.Client.Update(t.Context(), ch)
	if err == nil || !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), "localPort is immutable") {
		t.Fatalf("changing localPort: got %v, want an immutability rejection", err)
	}

	ch.Spec.LocalPort = 7100
	ch.Spec.Delivery = podipcv1alpha1.DeliveryAnyOne
	if err := env.Client.Update(t.Context(), ch); err != nil {
		t.Errorf("changing delivery was rejected: %v", err)
	}
}

// createRaw creates a Channel from raw JSON, so the test can send what the Go types
// cannot express (unknown enum values, out-of-range numbers).
func createRaw(t *testing.T, name, spec string) error {
	t.Helper()
	body := `{"apiVersion":"podipc.dev/v1alpha1","kind":"Channel","metadata":{"name":"` + name + `"},"spec":` + spec + `}`
	rc, err := restClient()
	if err != nil {
		t.Fatal(err)
	}
	err = rc.Post().AbsPath("/apis/podipc.dev/v1alpha1/namespaces/default/channels").
		Body([]byte(body)).SetHeader("Content-Type", "application/json").Do(t.Context()).Error()
	if err == nil {
		t.Cleanup(func() {
			_ = rc.Delete().AbsPath("/apis/podipc.dev/v1alpha1/namespaces/default/channels/" + name).Do(t.Context()).Error()
		})
	}
	return err
}

func restClient() (*rest.RESTClient, error) {
	cfg := rest.CopyConfig(env.Config)
	cfg.GroupVersion = &podipcv1alpha1.GroupVersion
	cfg.APIPath = "/apis"
	cfg.NegotiatedSerializer = serializer.WithoutConversionCodecFactory{CodecFactory: serializer.NewCodecFactory(env.Scheme)}
	return rest.RESTClientFor(cfg)
}

// TestPrinterColumnsShowZeroMembers: `kubectl get channels` prints 0, not an empty cell,
// for a Channel no controller has counted yet. It asks the API server for the same
// server-side Table kubectl prints.
func TestPrinterColumnsShowZeroMembers(t *testing.T) {
	ch := &podipcv1alpha1.Channel{ObjectMeta: metav1.ObjectMeta{Name: "no-members", Namespace: "default"}}
	if err := env.Client.Create(t.Context(), ch); err != nil {
		t.Fatalf("create: %v", err)
	}
	t.Cleanup(func() { _ = env.Client.Delete(t.Context(), ch) })

	rc, err := restClient()
	if err != nil {
		t.Fatal(err)
	}
	var table metav1.Table
	body, err := rc.Get().Namespace("default").Resource("channels").Name("no-members").
		SetHeader("Accept", "application/json;as=Table;v=v1;g=meta.k8s.io").DoRaw(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(body, &table); err != nil {
		t.Fatalf("decoding the table: %v", err)
	}
	if len(table.Rows) != 1 {
		t.Fatalf("table has %d rows", len(table.Rows))
	}
	for i, col := range table.ColumnDefinitions {
		if col.Name != "Members" && col.Name != "Ready" {
			continue
		}
		// kubectl prints a missing cell (nil) as blank.
		if cell := table.Rows[0].Cells[i]; cell == nil || fmt.Sprint(cell) != "0" {
			t.Errorf("column %s = %v, want 0", col.Name, cell)
		}
	}
}
