'use strict';
// One end of a podipc <-> node-ipc compatibility exchange, driven by pkg/ipc's
// nodeipc_compat_test.go. Usage: node peer.cjs CONFIG.json
//
// CONFIG (written by the Go test):
//   module      absolute path of the node-ipc package directory to require()
//   role        "server" (ipc.serve / ipc.serveNet) or "client" (ipc.connectTo / connectToNet)
//   transport   "unix" (socketRoot + appspace + id, node-ipc's own default path) or "tcp"
//   socketRoot, appspace, id   node-ipc config for the Unix socket path
//   port        TCP port to connect to (client role; the server role picks a free port)
//   rawBuffer, encoding        node-ipc config; raw mode exchanges byte chunks, not events
//   events      [{type, data}] to emit, in order, and to expect back, in order
//   raw         base64 chunks to emit, and whose concatenation to expect back
//   timeoutMs   the process exits on its own after this long
//
// It reports on stdout, one JSON object per line:
//   {"ev":"listening"}  {"ev":"connected"}
//   {"ev":"recv","type":T,"data":"<JSON.stringify(data)>"}   one per event received
//   {"ev":"raw","b64":"..."}      the received raw bytes, once the expected length arrived
//   {"ev":"done"}                 everything expected was received
//   {"ev":"error","msg":...}      {"ev":"timeout",...}
// After "done" it waits for the peer to close the connection, then exits 0, so nothing it
// wrote is cut off by its own exit.

const fs = require('fs');
const net = require('net');

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const ipcModule = require(cfg.module);
// node-ipc 9 exports the IPC singleton; the 10.x CommonJS bundles export it too, but keep
// the door open for a bundle exposing it as .default.
const ipc = ipcModule.config ? ipcModule : ipcModule.default;

const out = (obj) => process.stdout.write(JSON.stringify(obj) + '\n');

ipc.config.silent = true;
ipc.config.rawBuffer = !!cfg.rawBuffer;
ipc.config.encoding = cfg.encoding || 'utf8';
ipc.config.socketRoot = cfg.socketRoot || ipc.config.socketRoot;
ipc.config.appspace = cfg.appspace || ipc.config.appspace;
ipc.config.id = cfg.id;
// A client must not reconnect once the Go side closes: that close is our cue to exit.
ipc.config.maxRetries = 0;
ipc.config.stopRetrying = true;

const events = cfg.events || [];
const rawChunks = (cfg.raw || []).map((c) => Buffer.from(c, 'base64'));
const rawWant = rawChunks.reduce((n, c) => n + c.length, 0);

let done = false;
let received = 0;
const rawGot = [];
let rawLen = 0;

const timer = setTimeout(() => {
  out({ ev: 'timeout', received, rawLen });
  process.exit(3);
}, cfg.timeoutMs || 60000);

function finishIfComplete() {
  if (done) return;
  if (cfg.rawBuffer ? rawLen < rawWant : received < events.length) return;
  done = true;
  if (cfg.rawBuffer) out({ ev: 'raw', b64: Buffer.concat(rawGot).toString('base64') });
  out({ ev: 'done' });
}

function peerClosed() {
  clearTimeout(timer);
  process.exit(done ? 0 : 1);
}

// subscribe registers the receive side on a node-ipc emitter (client or server). node-ipc
// dispatches by event type, and its catch-all '*' is broken in 9.2.1 (event-pubsub 4
// throws on primitive data), so each expected type gets its own handler.
function subscribe(emitter) {
  if (cfg.rawBuffer) {
    emitter.on('data', (buf) => {
      rawGot.push(Buffer.from(buf));
      rawLen += buf.length;
      finishIfComplete();
    });
    return;
  }
  for (const type of new Set(events.map((e) => e.type))) {
    emitter.on(type, (data) => {
      const text = JSON.stringify(data);
      out({ ev: 'recv', type, data: text === undefined ? 'undefined' : text });
      received++;
      finishIfComplete();
    });
  }
}

// send emits everything to the peer; emit(fn) is client.emit or server.emit bound to a socket.
function send(emit) {
  if (cfg.rawBuffer) {
    // In raw mode node-ipc writes Buffer.from(firstArgument, encoding) and ignores data.
    for (const c of rawChunks) emit(c.toString(ipc.config.encoding));
    return;
  }
  for (const e of events) emit(e.type, e.data);
}

function runClient() {
  const connected = () => {
    const client = ipc.of[cfg.id];
    subscribe(client);
    client.on('connect', () => {
      out({ ev: 'connected' });
      send((type, data) => client.emit(type, data));
    });
    client.on('disconnect', peerClosed);
    client.on('error', (err) => out({ ev: 'error', msg: String(err) }));
  };
  if (cfg.transport === 'unix') {
    // No path: node-ipc builds socketRoot + appspace + id, which is what ipc.SocketPath
    // must agree with.
    ipc.connectTo(cfg.id, connected);
  } else {
    ipc.connectToNet(cfg.id, '127.0.0.1', cfg.port, connected);
  }
}

function runServer(attempt) {
  const started = () => {
    const server = ipc.server;
    subscribe(server);
    server.on('connect', (socket) => {
      out({ ev: 'connected' });
      send((type, data) => server.emit(socket, type, data));
    });
    server.on('socket.disconnected', peerClosed);
    out({ ev: 'listening', path: cfg.transport === 'unix' ? server.path : undefined, port: server.port });
  };
  if (cfg.transport === 'unix') {
    ipc.serve(started); // socketRoot + appspace + id
    ipc.server.start();
    return;
  }
  // serveNet treats port 0 as "use the default 8000", so pick a free port first and retry
  // if another process takes it in between.
  const probe = net.createServer();
  probe.listen(0, '127.0.0.1', () => {
    const port = probe.address().port;
    probe.close(() => {
      ipc.serveNet('127.0.0.1', port, started);
      ipc.server.on('error', (err) => {
        if (err && err.code === 'EADDRINUSE' && attempt < 5) {
          runServer(attempt + 1);
          return;
        }
        out({ ev: 'error', msg: String(err) });
      });
      ipc.server.start();
    });
  });
}

if (cfg.role === 'server') runServer(0);
else runClient();
