'use strict';
// node-ipc events/s, Node <-> Node, the baseline for pkg/ipc's BenchmarkNodeIPCEvents
// (same event shape and payload size). Run by hack/nodeipc/bench.sh (make bench-nodeipc).
//
//   node bench.cjs MODULE_DIR unix|tcp [EVENTS] [PAYLOAD_BYTES]
//
// This process serves; a forked child process connects and emits EVENTS events
// {"type":"bench","data":{"seq":i,"payload":"xxx…"}} as fast as the socket drains. The
// server parses every event (node-ipc always does) and stops the clock at the last one.
// Prints one JSON line: {transport, events, payloadBytes, seconds, eventsPerSec,
// cpuMicrosPerEvent} (CPU time of both processes from the connection on, per event).

const { fork } = require('child_process');
const fs = require('fs');
const net = require('net');
const os = require('os');
const path = require('path');

const [moduleDir, transport = 'unix', eventsArg = '200000', payloadArg = '64'] = process.argv.slice(2);
const events = Number(eventsArg);
const payload = 'x'.repeat(Number(payloadArg));
const ipc = require(moduleDir);
ipc.config.silent = true;
ipc.config.id = 'bench';
ipc.config.maxRetries = 0;
ipc.config.stopRetrying = true;

// Neither side may outlive a broken run.
setTimeout(() => {
  process.stderr.write('bench: timed out\n');
  process.exit(3);
}, 120000).unref();

if (process.env.BENCH_CHILD) runClient(JSON.parse(process.env.BENCH_CHILD));
else runServer();

function runServer() {
  const root = fs.mkdtempSync(path.join(os.tmpdir(), 'nipcb')) + '/';
  ipc.config.socketRoot = root;
  let start;
  let cpu0;
  let got = 0;
  let child;
  const started = () => {
    ipc.server.on('connect', () => {
      start = process.hrtime.bigint();
      cpu0 = process.cpuUsage();
    });
    ipc.server.on('bench', (data) => {
      if (data.seq !== got) throw new Error(`event ${data.seq} arrived as number ${got}`);
      got++;
      if (got < events) return;
      const seconds = Number(process.hrtime.bigint() - start) / 1e9;
      const serverCPU = process.cpuUsage(cpu0);
      // The child reports its own CPU time; both ends count, as in the Go benchmark.
      child.once('message', (childCPU) => {
        const cpuMicros = serverCPU.user + serverCPU.system + childCPU.user + childCPU.system;
        process.stdout.write(JSON.stringify({
          transport, events, payloadBytes: payload.length, seconds,
          eventsPerSec: Math.round(events / seconds), cpuMicrosPerEvent: cpuMicros / events,
        }) + '\n');
        child.kill();
        ipc.server.stop();
        fs.rmSync(root, { recursive: true, force: true });
        process.exit(0);
      });
      child.send('cpu?');
    });
    const address = { transport, port: ipc.server.port, socketRoot: root };
    child = fork(__filename, process.argv.slice(2), { env: { ...process.env, BENCH_CHILD: JSON.stringify(address) } });
  };
  if (transport === 'unix') {
    ipc.serve(started);
    ipc.server.start();
    return;
  }
  // serveNet treats port 0 as its default 8000, so find a free port first.
  const probe = net.createServer().listen(0, '127.0.0.1', () => {
    const port = probe.address().port;
    probe.close(() => {
      ipc.serveNet('127.0.0.1', port, started);
      ipc.server.start();
    });
  });
}

function runClient(address) {
  // CPU time from the connection on, reported to the server when it has everything.
  let cpu0;
  process.on('message', () => process.send(process.cpuUsage(cpu0)));
  const connected = () => {
    const client = ipc.of.bench;
    client.on('connect', () => {
      cpu0 = process.cpuUsage();
      let seq = 0;
      // Emit in batches and respect the socket's backpressure, as a real producer would;
      // node-ipc's emit hides write()'s return value, so ask the socket directly.
      const pump = () => {
        while (seq < events) {
          client.emit('bench', { seq, payload });
          seq++;
          if (client.socket.writableNeedDrain) {
            client.socket.once('drain', pump);
            return;
          }
        }
      };
      pump();
    });
    client.on('disconnect', () => process.exit(0));
  };
  ipc.config.socketRoot = address.socketRoot;
  if (address.transport === 'unix') ipc.connectTo('bench', connected);
  else ipc.connectToNet('bench', '127.0.0.1', address.port, connected);
}
