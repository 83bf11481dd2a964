'use strict';
// The node-ipc app of the e2e journey (README.md, "The user journey"): a Node.js program that knows nothing of
// podipc but node-ipc's own client. It connects to its sidecar's socket for the channel ID
// (/var/run/podipc/app.ID), emits "message" events "node-ipc N" once a second, and logs every
// event it receives as "recv TYPE DATA", so the suite checks both directions from pod logs:
// the line apps' lines reach it as message events, its events reach them as JSON lines.
// Usage: node app.cjs ID
const ipc = require('/app/node_modules/node-ipc');

const id = process.argv[2];
ipc.config.silent = true;
ipc.config.socketRoot = '/var/run/podipc/';
ipc.config.appspace = 'app.';
ipc.config.id = 'nodeapp';
// The sidecar serves the socket once it is ready, which the native sidecar's startup probe
// guarantees before this container starts; retry anyway, as node-ipc users do.
ipc.config.retry = 500;

ipc.connectTo(id, () => {
  const c = ipc.of[id];
  let n = 0;
  let timer;
  c.on('connect', () => {
    console.log('connected', id);
    if (!timer) timer = setInterval(() => c.emit('message', 'node-ipc ' + ++n), 1000);
  });
  c.on('message', (data) => console.log('recv message', typeof data === 'string' ? data : JSON.stringify(data)));
  c.on('disconnect', () => console.log('disconnected', id));
});
process.on('SIGTERM', () => process.exit(0));
