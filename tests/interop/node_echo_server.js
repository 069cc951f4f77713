// An independent WebSocket server for the interop tests: Node's `ws`, with permessage-deflate
// and subprotocol selection. It echoes every message as it came (text as text, binary as
// binary) and answers a close with the client's code and reason. Prints "port N" once it
// listens on 127.0.0.1.
const { WebSocketServer } = require('ws');

const wss = new WebSocketServer({
  host: '127.0.0.1',
  port: 0,
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

wss.on('listening', () => {
  console.log(`port ${wss.address().port}`);
});
