package ipc_test

import (
	"context"
	"fmt"
	"log"
	"os"

	"github.com/podipc/podipc/pkg/ipc"
)

// echo answers each line with "ECHO: " and the line, until the client goes.
func echo(sock *ipc.Socket) {
	for line := range sock.In() {
		sock.Out() <- "ECHO: " + line
	}
	if err := sock.Close(); err != nil {
		log.Print(err)
	}
}

// The echo server and client of async-sockets, over TCP.
func Example() {
	srv, err := ipc.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		log.Fatal(err)
	}
	go func() {
		for sock := range srv.Connections() { // closed by srv.Close
			go echo(sock)
		}
	}()

	c, err := ipc.Dial(context.Background(), "tcp", srv.Addr().String())
	if err != nil {
		log.Fatal(err)
	}
	for _, line := range []string{"hello", "world"} {
		c.Out() <- line
		fmt.Println(<-c.In())
	}

	if err := c.Close(); err != nil {
		log.Print(err)
	}
	if err := srv.Close(); err != nil {
		log.Print(err)
	}
	// Output:
	// ECHO: hello
	// ECHO: world
}

// reply answers each node-ipc event with a "reply" event naming the type it got.
func reply(sock *ipc.Socket) {
	for msg := range sock.In() {
		ev, err := ipc.DecodeEvent([]byte(msg))
		if err != nil {
			continue
		}
		answer, err := ipc.EncodeEvent("reply", map[string]string{"got": ev.Type})
		if err != nil {
			continue
		}
		sock.Out() <- string(answer)
	}
	if err := sock.Close(); err != nil {
		log.Print(err)
	}
}

// A node-ipc event exchange over a Unix socket at the path node-ipc uses for the id
// "world". A node-ipc client (ipc.config.socketRoot = dir) could take the Go client's
// place unchanged.
func Example_nodeIPC() {
	dir, err := os.MkdirTemp("", "ipc-example")
	if err != nil {
		log.Fatal(err)
	}
	path := ipc.SocketPath(dir+"/", "", "world") // <dir>/app.world

	srv, err := ipc.Listen("unix", path, ipc.WithFraming(ipc.NodeIPC))
	if err != nil {
		log.Fatal(err)
	}
	go func() {
		for sock := range srv.Connections() {
			go reply(sock)
		}
	}()

	c, err := ipc.Dial(context.Background(), "unix", path, ipc.WithFraming(ipc.NodeIPC))
	if err != nil {
		log.Fatal(err)
	}
	hello, err := ipc.EncodeEvent("message", "hello from Go")
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(string(hello))
	c.Out() <- string(hello)
	ev, err := ipc.DecodeEvent([]byte(<-c.In()))
	if err != nil {
		log.Fatal(err)
	}
	fmt.Println(ev.Type, string(ev.Data))

	if err := c.Close(); err != nil {
		log.Print(err)
	}
	if err := srv.Close(); err != nil { // also removes the socket file
		log.Print(err)
	}
	if err := os.Remove(dir); err != nil {
		log.Print(err)
	}
	// Output:
	// {"type":"message","data":"hello from Go"}
	// reply {"got":"message"}
}
