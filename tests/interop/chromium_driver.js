// Drives a running headless Chromium through the DevTools protocol (with Node's `ws`) for the
// Chromium interop test. Usage: chromium_driver.js DEVTOOLS_PORT PAGE_URL SCREENSHOT. Opens
// PAGE_URL (chromium_page.html) in a new tab, waits for its load event, then awaits the page's own
// window.finished promise; saves a PNG screenshot of the finished page to SCREENSHOT, closes the
// tab and prints the page's result line ("ok 1 BYTES"), exiting 1 unless it starts with "ok ".
// Every wait is an awaited event or reply: nothing polls, and the whole run has a 90 s deadline.
const fs = require('fs');
const http = require('http');
const WebSocket = require('ws');

const [port, pageUrl, screenshot] = process.argv.slice(2);

function fail(what) {
  console.error(`chromium driver: ${what}`);
  process.exit(1);
}

const timer = setTimeout(() => fail('timed out after 90 s'), 90000);

// The browser's DevTools WebSocket, as Chromium publishes it.
function browserUrl() {
  return new Promise((resolve, reject) => {
    http
      .get({ host: '127.0.0.1', port: Number(port), path: '/json/version' }, (res) => {
        let body = '';
        res.setEncoding('utf8');
        res.on('data', (chunk) => (body += chunk));
        res.on('end', () => {
          try {
            resolve(JSON.parse(body).webSocketDebuggerUrl);
          } catch (e) {
            reject(new Error(`/json/version: ${e.message}: ${body}`));
          }
        });
      })
      .on('error', reject);
  });
}

// A DevTools connection: commands answered by id, events handed to whoever waits for them.
function connect(url) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, { perMessageDeflate: false, maxPayload: 256 << 20 });
    let nextId = 1;
    const replies = new Map();
    const waiters = [];
    ws.on('message', (data) => {
      const m = JSON.parse(data);
      if (m.id !== undefined) {
        const r = replies.get(m.id);
        replies.delete(m.id);
        if (m.error) r.reject(new Error(`${r.method}: ${m.error.message}`));
        else r.resolve(m.result);
        return;
      }
      const i = waiters.findIndex((w) => w.method === m.method && w.sessionId === m.sessionId);
      if (i >= 0) waiters.splice(i, 1)[0].resolve(m.params);
    });
    ws.on('close', () => fail('the DevTools connection closed'));
    ws.on('error', reject);
    ws.on('open', () =>
      resolve({
        send(method, params = {}, sessionId = undefined) {
          const id = nextId++;
          ws.send(JSON.stringify({ id, method, params, sessionId }));
          return new Promise((res, rej) => replies.set(id, { resolve: res, reject: rej, method }));
        },
        // Registered before the command that causes the event, so it cannot be missed.
        event(method, sessionId) {
          return new Promise((res) => waiters.push({ method, sessionId, resolve: res }));
        },
      }),
    );
  });
}

async function main() {
  const cdp = await connect(await browserUrl());
  const { targetId } = await cdp.send('Target.createTarget', { url: 'about:blank' });
  const { sessionId } = await cdp.send('Target.attachToTarget', { targetId, flatten: true });
  await cdp.send('Page.enable', {}, sessionId);
  const loaded = cdp.event('Page.loadEventFired', sessionId);
  const nav = await cdp.send('Page.navigate', { url: pageUrl }, sessionId);
  if (nav.errorText) fail(`navigating to ${pageUrl}: ${nav.errorText}`);
  await loaded;
  const { result, exceptionDetails } = await cdp.send(
    'Runtime.evaluate',
    { expression: 'window.finished', awaitPromise: true, returnByValue: true },
    sessionId,
  );
  if (exceptionDetails) fail(`the page: ${JSON.stringify(exceptionDetails)}`);
  // Before judging the result: a failed run's page is the one worth looking at.
  const shot = await cdp.send('Page.captureScreenshot', { format: 'png' }, sessionId);
  fs.writeFileSync(screenshot, Buffer.from(shot.data, 'base64'));
  await cdp.send('Target.closeTarget', { targetId });
  clearTimeout(timer);
  const line = String(result.value);
  console.log(line);
  process.exit(line.startsWith('ok ') ? 0 : 1);
}

main().catch((e) => fail(e.message));
