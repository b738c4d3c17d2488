// Switchyard sandbox loader (Node.js). Runs as the init process of a gVisor sandbox.
// Same stdin protocol as loader.py: "<N>\n" + N bytes of JSON
//   {"argv": ["node", "main.js", ...], "files": {...}, "cwd": "/tmp/work"}
// then the program's own stdin. argv[0] must be "node"; argv[1] (a .js/.mjs/.cjs file) is run
// in this process with the module loader (no second Node start-up). Loader errors exit 125.
'use strict';
const fs = require('fs');
const path = require('path');

function fail(msg) {
  fs.writeSync(2, `switchyard loader: ${msg}\n`);
  process.exit(125);
}

function readExact(n) {
  const buf = Buffer.alloc(n);
  let off = 0;
  while (off < n) {
    let k;
    try {
      k = fs.readSync(0, buf, off, n - off, null);
    } catch (e) {
      if (e.code === 'EAGAIN') continue;
      throw e;
    }
    if (k === 0) fail('unexpected EOF in payload');
    off += k;
  }
  return buf;
}

if (process.env.SWITCHYARD_READY) fs.writeSync(2, '\0READY\n');
delete process.env.SWITCHYARD_READY;

let header = '';
for (;;) {
  const c = readExact(1).toString('latin1'); // byte by byte: never read past the payload
  if (c === '\n') break;
  header += c;
  if (header.length > 10) fail('payload header too long');
}
let payload;
try {
  payload = JSON.parse(readExact(parseInt(header, 10)).toString('utf8'));
} catch (e) {
  fail(`bad payload: ${e}`);
}
const argv = (payload.argv || []).map(String);
if (argv.length < 2 || !['node', 'nodejs', process.execPath].includes(argv[0])) {
  fail('argv must be ["node", SCRIPT, ...]');
}
const cwd = payload.cwd || '/tmp/work';
fs.mkdirSync(cwd, { recursive: true });
for (const [name, content] of Object.entries(payload.files || {})) {
  const file = path.resolve(cwd, name);
  fs.mkdirSync(path.dirname(file), { recursive: true });
  fs.writeFileSync(file, typeof content === 'object' && content !== null
    ? Buffer.from(content.base64, 'base64') : String(content));
}
process.chdir(cwd);
process.argv = [process.execPath, path.resolve(cwd, argv[1]), ...argv.slice(2)];
require('module').runMain();
