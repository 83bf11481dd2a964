package peer

import (
	"context"
	"net"

	"github.com/podipc/podipc/pkg/discovery"
)

// Secure secures peer connections before the protocol runs over them; pkg/peertls
// implements it with mutual TLS. Without one (nil) links are plaintext, and a peer is
// who its HELLO or WELCOME says it is, from the address discovery reports.
type Secure interface {
	// Accept runs first on an accepted connection, under the handshake deadline. It
	// returns the connection to speak the protocol over, and check, which returns why
	// the identity HELLO then claims is not the one the connection proved (nil if it
	// is; a *Refusal names the reason it is counted under, any other error counts as
	// RefusedIdentity); check is nil if the connection proved none (a plaintext peer
	// admitted while a cluster upgrades). An error refuses the link; a *Refusal is
	// counted and logged.
	Accept(conn net.Conn) (secured net.Conn, check func(Identity) error, err error)
	// Dial connects to member through dial and returns the connection to speak the
	// protocol over, once it has proved to be member's.
	Dial(ctx context.Context, dial func(context.Context) (net.Conn, error), member discovery.Member) (net.Conn, error)
}

// Refusal is an error with which Secure.Accept refuses a link: counted under Reason in
// podipc_peer_refused_total and logged with Err. Tell says the peer spoke the plaintext
// protocol: it is sent REFUSE with Err, so that its log says why.
type Refusal struct {
	Reason string
	Err    error
	Tell   bool
}

func (r *Refusal) Error() string { return r.Reason + ": " + r.Err.Error() }

func (r *Refusal) Unwrap() error { return r.Err }
