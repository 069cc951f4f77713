// An independent WebSocket server for the interop tests: Node's `ws`, with permessage-deflate
// and subprotocol selection. It echoes every message as it came (text as text, binary as
// binary) and answers a close with the client's code and reason. Prints "port N" once it
// listens on 127.0.0.1.
//
// A plain GET / returns the Chromium interop page (`chromium_page.html`): the browser loads it
// from here, so its WebSockets, direct or through the proxy, are the only connections it makes
// to anything but this server.
const fs = require('fs');
const http = require('http');
const path = require('path');
const { WebSocketServer } = require('ws');

const PAGE = path.join(__dirname, 'chromium_page.html');

const server = http.createServer((req, res) => {
  const { pathname } = new URL(req.url, 'http://127.0.0.1');
  if (req.method !== 'GET' || pathname !== '/') {
    res.writeHead(404, { 'Content-Type': 'text/plain' }).end('not found\n');
    return;
  }
  fs.readFile(PAGE, (err, body) => {
    if (err) {
      res.writeHead(500, { 'Content-Type': 'text/plain' }).end(`${err.message}\n`);
      return;
    }
    res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8', 'Cache-Control': 'no-store' }).end(body);
  });
});

const wss = new WebSocketServer({
  server,
  perMessageDeflate: true,
  maxPayload: 64 * 1024 * 1024,
  // Picks chat.v2 when offered: a client that gets it knows the proxy passed the offer and the
  // choice through untouched.
  handleProtocols: (protocols) => (protocols.has('chat.v2') ? 'chat.v2' : false),
});

wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
  ws.on('close', () => {});
  ws.on('error', () => {});
});

server.listen(0, '127.0.0.1', () => {
  console.log(`port ${server.address().port}`);
});
