// An independent WebSocket client for the interop tests: Node's `ws`. Usage: node_client.js URL
// CONNECTIONS [ADDRESS]. On each connection it offers two subprotocols and permessage-deflate and
// checks that the server's choices came back; echoes text and binary messages of 0 B to 16 MiB
// and checks every byte; pings with a payload and checks the pong; closes with 4001 and a reason
// and checks that both came back. Prints "ok CONNECTIONS BYTES" (payload bytes echoed), or fails
// with a message. With ADDRESS, the URL's host name resolves to it, as a hosts file entry would:
// the name still goes into TLS's SNI, the certificate check and the Host field, while the
// connection goes to ADDRESS (loopback). A test CA is trusted through Node's NODE_EXTRA_CA_CERTS.
const crypto = require('crypto');
const WebSocket = require('ws');

const [url, n, address] = [process.argv[2], Number(process.argv[3]), process.argv[4]];
// Node asks for every address of a name (`all`) when it may try several families.
const lookup =
  address && ((name, opts, cb) => (opts.all ? cb(null, [{ address, family: 4 }]) : cb(null, address, 4)));
const SIZES = [0, 1, 125, 126, 65535, 65536, 1 << 20, 16 << 20];

function fail(i, what) {
  console.error(`connection ${i}: ${what}`);
  process.exit(1);
}

function one(i) {
  return new Promise((resolve) => {
    const ws = new WebSocket(url, ['chat.v2', 'chat.v1'], { perMessageDeflate: true, maxPayload: 64 << 20, lookup });
    let total = 0;
    const expect = [];
    ws.on('open', () => {
      if (ws.protocol !== 'chat.v2') fail(i, `subprotocol ${JSON.stringify(ws.protocol)}, want chat.v2`);
      if (!ws.extensions.includes('permessage-deflate')) fail(i, `extensions ${JSON.stringify(ws.extensions)}`);
      next();
    });
    // One message at a time: text, then binary, per size; then a ping; then the close.
    let step = 0;
    function next() {
      if (step < SIZES.length * 2) {
        const size = SIZES[step >> 1];
        const binary = step % 2 === 1;
        step++;
        if (binary) {
          const data = crypto.randomBytes(size);
          expect.push({ binary, data });
          ws.send(data, { binary: true });
        } else {
          // Multi-byte UTF-8 too: a byte-exact relay keeps every character whole.
          const text = 'aé€😀'.repeat(Math.ceil(size / 10) + 1).slice(0, size);
          expect.push({ binary, data: Buffer.from(text, 'utf8') });
          ws.send(text);
        }
      } else if (step === SIZES.length * 2) {
        step++;
        ws.ping(Buffer.from(`ping-${i}`));
      } else {
        ws.close(4001, `done ${i}`);
      }
    }
    ws.on('message', (data, isBinary) => {
      const want = expect.shift();
      if (!want) fail(i, 'an unexpected message');
      if (isBinary !== want.binary) fail(i, `a ${isBinary ? 'binary' : 'text'} message, want the other`);
      if (!data.equals(want.data)) fail(i, `a ${data.length} B message differs from the ${want.data.length} B sent`);
      total += data.length;
      next();
    });
    ws.on('pong', (data) => {
      if (data.toString() !== `ping-${i}`) fail(i, `pong ${JSON.stringify(data.toString())}`);
      next();
    });
    ws.on('close', (code, reason) => {
      if (code !== 4001 || reason.toString() !== `done ${i}`) fail(i, `closed with ${code} ${JSON.stringify(reason.toString())}`);
      if (step !== SIZES.length * 2 + 1) fail(i, `closed early, at step ${step}`);
      resolve(total);
    });
    ws.on('error', (e) => fail(i, `error: ${e.message}`));
  });
}

const timer = setTimeout(() => {
  console.error('timed out after 90 s');
  process.exit(1);
}, 90000);
Promise.all(Array.from({ length: n }, (_, i) => one(i))).then((totals) => {
  clearTimeout(timer);
  console.log(`ok ${n} ${totals.reduce((a, b) => a + b, 0)}`);
});
