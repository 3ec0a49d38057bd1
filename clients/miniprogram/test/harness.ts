/**
 * Test harness: starts the REAL gateway (`python -m gateway run`, with its
 * in-process fake WeChat), the demo upstream (`python -m gateway demo-upstream`)
 * and a small recording upstream in this process (multipart + WebSocket), and
 * stops them afterwards.
 *
 * GATEWAY_PYTHON picks the interpreter; default ../../.venv/bin/python, which
 * `npm test` makes first (scripts/gateway-python.mjs, the `pretest` script).
 */
import { ChildProcess, spawn } from "node:child_process";
import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as http from "node:http";
import * as net from "node:net";
import * as os from "node:os";
import * as path from "node:path";

/** clients/miniprogram (this file runs from dist-test/test/). */
export const PACKAGE_ROOT = path.resolve(__dirname, "..", "..");
export const REPO_ROOT = path.resolve(PACKAGE_ROOT, "..", "..");
export const APPID = "wxclienttestapp001";
const WECHAT_SECRET = "client-test-wechat-secret";
/** The two mini programs of the `multi` gateway, in config order (shop first). */
export const SHOP_APPID = "wxclienttestshop01";
export const CARD_APPID = "wxclienttestcard02";
const TOKEN_SECRET = "client-test-token-secret-0123456789abcdef-0123456789";

export function pythonExecutable(): string {
  if (process.env.GATEWAY_PYTHON) return process.env.GATEWAY_PYTHON;
  const venv = path.join(REPO_ROOT, ".venv", "bin", "python");
  // No fallback to a python3 on PATH: without the gateway's dependencies it would
  // only cancel every test with "No module named 'aiohttp'".
  if (!fs.existsSync(venv)) {
    throw new Error(`no ${venv}: run \`npm test\` (its pretest makes it) or set GATEWAY_PYTHON`);
  }
  return venv;
}

export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const port = (server.address() as net.AddressInfo).port;
      server.close(() => resolve(port));
    });
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A plain HTTP call from the test itself (not through the wx shim). */
export function rawHttp(
  url: string,
  options: { method?: string; headers?: Record<string, string>; body?: string | Buffer } = {},
): Promise<{ status: number; headers: http.IncomingHttpHeaders; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request(url, { method: options.method || "GET", headers: options.headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (c: Buffer) => chunks.push(c));
      res.on("end", () =>
        resolve({ status: res.statusCode || 0, headers: res.headers, body: Buffer.concat(chunks).toString("utf8") }),
      );
      res.on("error", reject);
    });
    req.on("error", reject);
    req.setTimeout(10_000, () => req.destroy(new Error(`timeout: ${url}`)));
    req.end(options.body);
  });
}

class Proc {
  readonly output: string[] = [];
  exited = false;
  constructor(
    readonly name: string,
    readonly child: ChildProcess,
  ) {
    const keep = (chunk: Buffer) => {
      this.output.push(chunk.toString("utf8"));
      if (this.output.length > 400) this.output.splice(0, this.output.length - 400);
    };
    child.stdout?.on("data", keep);
    child.stderr?.on("data", keep);
    child.on("exit", () => {
      this.exited = true;
    });
  }

  async waitFor(url: string, timeoutMs = 30_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      if (this.exited) {
        throw new Error(`${this.name} exited with ${this.child.exitCode}:\n${this.output.join("")}`);
      }
      try {
        const res = await rawHttp(url);
        if (res.status === 200) return;
      } catch (_) {
        // not listening yet
      }
      await sleep(100);
    }
    throw new Error(`${this.name} did not answer ${url} in time:\n${this.output.join("")}`);
  }

  async stop(): Promise<void> {
    if (this.exited) return;
    const gone = new Promise<void>((r) => this.child.once("exit", () => r()));
    this.child.kill("SIGTERM");
    const timer = setTimeout(() => this.child.kill("SIGKILL"), 8_000);
    await gone;
    clearTimeout(timer);
  }
}

const live = new Set<ChildProcess>();
// Whatever happens to the test process, the servers it started do not outlive it.
process.on("exit", () => {
  for (const child of live) child.kill("SIGKILL");
});

function spawnPython(name: string, args: string[]): Proc {
  const child = spawn(pythonExecutable(), ["-m", "gateway", ...args], {
    cwd: REPO_ROOT,
    env: { ...process.env, PYTHONUNBUFFERED: "1" },
    stdio: ["ignore", "pipe", "pipe"],
  });
  live.add(child);
  child.on("exit", () => live.delete(child));
  return new Proc(name, child);
}

// ---------------------------------------------------------------------------
// The recording upstream (multipart and WebSocket), in this process.

export interface Part {
  name: string;
  filename: string | null;
  size: number;
  sha256: string;
  text: string;
}

export interface Hit {
  method: string;
  path: string;
  headers: http.IncomingHttpHeaders;
  bodySize: number;
}

function parseMultipart(contentType: string, body: Buffer): Part[] {
  const match = /boundary=(?:"([^"]+)"|([^;]+))/i.exec(contentType);
  if (!match) return [];
  const boundary = Buffer.from("--" + (match[1] || match[2]).trim());
  const parts: Part[] = [];
  let pos = body.indexOf(boundary);
  while (pos >= 0) {
    const start = pos + boundary.length;
    if (body.subarray(start, start + 2).toString() === "--") break;
    const next = body.indexOf(boundary, start);
    if (next < 0) break;
    // "\r\n" headers "\r\n\r\n" content "\r\n"
    const chunk = body.subarray(start + 2, next - 2);
    const split = chunk.indexOf("\r\n\r\n");
    const head = chunk.subarray(0, split).toString("utf8");
    const content = chunk.subarray(split + 4);
    const disposition = /content-disposition:([^\r\n]*)/i.exec(head)?.[1] ?? "";
    parts.push({
      name: /\bname="([^"]*)"/.exec(disposition)?.[1] ?? "",
      filename: /\bfilename="([^"]*)"/.exec(disposition)?.[1] ?? null,
      size: content.length,
      sha256: crypto.createHash("sha256").update(content).digest("hex"),
      text: content.length <= 256 ? content.toString("utf8") : "",
    });
    pos = next;
  }
  return parts;
}

function wsFrame(opcode: number, payload: Buffer): Buffer {
  // Server frames are not masked.
  let head: Buffer;
  if (payload.length < 126) {
    head = Buffer.from([0x80 | opcode, payload.length]);
  } else if (payload.length < 65536) {
    head = Buffer.alloc(4);
    head[0] = 0x80 | opcode;
    head[1] = 126;
    head.writeUInt16BE(payload.length, 2);
  } else {
    head = Buffer.alloc(10);
    head[0] = 0x80 | opcode;
    head[1] = 127;
    head.writeBigUInt64BE(BigInt(payload.length), 2);
  }
  return Buffer.concat([head, payload]);
}

/** Parse whole frames from `buf`; returns them and the unconsumed rest. */
export function parseFrames(buf: Buffer): { frames: { opcode: number; payload: Buffer }[]; rest: Buffer } {
  const frames: { opcode: number; payload: Buffer }[] = [];
  let off = 0;
  while (buf.length - off >= 2) {
    const b0 = buf[off];
    const b1 = buf[off + 1];
    let len = b1 & 0x7f;
    let p = off + 2;
    if (len === 126) {
      if (buf.length - p < 2) break;
      len = buf.readUInt16BE(p);
      p += 2;
    } else if (len === 127) {
      if (buf.length - p < 8) break;
      len = Number(buf.readBigUInt64BE(p));
      p += 8;
    }
    const masked = (b1 & 0x80) !== 0;
    const mask = masked ? buf.subarray(p, p + 4) : null;
    if (masked) p += 4;
    if (buf.length - p < len) break;
    const payload = Buffer.from(buf.subarray(p, p + len));
    if (mask) for (let i = 0; i < payload.length; i++) payload[i] ^= mask[i % 4];
    frames.push({ opcode: b0 & 0x0f, payload });
    off = p + len;
  }
  return { frames, rest: buf.subarray(off) };
}

export class Recorder {
  readonly hits: Hit[] = [];
  readonly upgrades: Hit[] = [];
  private readonly sockets = new Set<net.Socket>();
  private readonly late = new Set<string>();
  readonly server = http.createServer((req, res) => this.handle(req, res));

  constructor() {
    this.server.on("upgrade", (req: http.IncomingMessage, socket: net.Socket) => this.upgrade(req, socket));
    this.server.on("connection", (s: net.Socket) => {
      this.sockets.add(s);
      s.on("close", () => this.sockets.delete(s));
    });
  }

  count(pathname: string): number {
    return this.hits.filter((h) => h.path.split("?")[0] === pathname).length;
  }

  async start(): Promise<number> {
    await new Promise<void>((r) => this.server.listen(0, "127.0.0.1", () => r()));
    return (this.server.address() as net.AddressInfo).port;
  }

  async stop(): Promise<void> {
    for (const s of this.sockets) s.destroy();
    await new Promise<void>((r) => this.server.close(() => r()));
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    const chunks: Buffer[] = [];
    req.on("data", (c: Buffer) => chunks.push(c));
    req.on("end", () => {
      const body = Buffer.concat(chunks);
      const pathname = (req.url || "/").split("?")[0];
      this.hits.push({ method: req.method || "", path: req.url || "", headers: req.headers, bodySize: body.length });
      const json = (status: number, value: unknown) => {
        res.writeHead(status, { "Content-Type": "application/json" });
        res.end(JSON.stringify(value));
      };
      if (pathname.endsWith("/late401")) {
        // The first hit per `key` answers 401 token_expired after `ms`; later hits 200.
        const params = new URL(req.url || "/", "http://x").searchParams;
        const key = params.get("key") || "";
        if (!this.late.has(key)) {
          this.late.add(key);
          setTimeout(() => json(401, { error: "token_expired", message: "late" }), Number(params.get("ms") || 300));
          return;
        }
      }
      if (pathname.endsWith("/always401")) {
        // An upstream that keeps answering with a re-login code: the client
        // must retry once and then give up.
        json(401, { error: "token_expired", message: "the upstream says the token expired" });
        return;
      }
      json(200, {
        upstream: "recorder",
        method: req.method,
        path: req.url,
        headers: req.headers,
        body_size: body.length,
        parts: parseMultipart(String(req.headers["content-type"] || ""), body),
      });
    });
  }

  private upgrade(req: http.IncomingMessage, socket: net.Socket): void {
    this.upgrades.push({ method: req.method || "", path: req.url || "", headers: req.headers, bodySize: 0 });
    const key = String(req.headers["sec-websocket-key"] || "");
    const accept = crypto
      .createHash("sha1")
      .update(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11")
      .digest("base64");
    socket.write(
      "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
        `Sec-WebSocket-Accept: ${accept}\r\n\r\n`,
    );
    // First message: who the gateway said the caller is.
    const hello = {
      openid: req.headers["x-openid"] ?? null,
      appid: req.headers["x-appid"] ?? null,
      authorization: req.headers["authorization"] ?? null,
      path: req.url,
    };
    socket.write(wsFrame(1, Buffer.from(JSON.stringify(hello))));
    let buf: Buffer = Buffer.alloc(0);
    socket.on("data", (chunk: Buffer) => {
      const parsed = parseFrames(Buffer.concat([buf, chunk]));
      buf = parsed.rest;
      for (const frame of parsed.frames) {
        if (frame.opcode === 1) socket.write(wsFrame(1, Buffer.from("echo:" + frame.payload.toString("utf8"))));
        else if (frame.opcode === 9) socket.write(wsFrame(10, frame.payload));
        else if (frame.opcode === 8) {
          socket.end(wsFrame(8, frame.payload.subarray(0, 2)));
        }
      }
    });
    socket.on("error", () => undefined);
  }
}

// ---------------------------------------------------------------------------
// The gateways

export interface GatewayInfo {
  url: string;
  proc: Proc;
}

export interface Stack {
  /** ttl 2h, token header Authorization. */
  main: GatewayInfo;
  /** ttl 1s, token header X-WX-Token. */
  short: GatewayInfo;
  /**
   * Two mini programs (wechat.apps: shop = SHOP_APPID first, card = CARD_APPID),
   * ttl 2h; /shop/ (the recorder, WebSocket too) takes only shop's tokens.
   */
  multi: GatewayInfo;
  recorder: Recorder;
  demoUrl: string;
  tmp: string;
  stop(): Promise<void>;
}

interface GatewayVariant {
  name: "main" | "short" | "multi";
  token: Record<string, unknown>;
  /** The `wechat` apps: the single-app form unless given. */
  apps?: { appid: string; secret: string; name: string }[];
  /** Routes after the /api/ and /rec/ ones (`{recorder}` as upstream: the recorder). */
  routes?: Record<string, unknown>[];
}

const VARIANTS: GatewayVariant[] = [
  { name: "main", token: { ttl: "2h" } },
  { name: "short", token: { ttl: "1s", header: "X-WX-Token" } },
  {
    name: "multi",
    token: { ttl: "2h" },
    apps: [
      { appid: SHOP_APPID, secret: "client-test-shop-secret", name: "shop" },
      { appid: CARD_APPID, secret: "client-test-card-secret", name: "card" },
    ],
    routes: [{ prefix: "/shop/", upstream: "{recorder}", auth: "required", websocket: true, apps: ["shop"] }],
  },
];

function gatewayConfig(port: number, db: string, demoUrl: string, recorderUrl: string, variant: GatewayVariant): unknown {
  const extra = (variant.routes || []).map((r) => (r.upstream === "{recorder}" ? { ...r, upstream: recorderUrl } : r));
  // With wechat.fake the in-process fake serves every configured app, each
  // checking its own secret.
  const apps = variant.apps ? { apps: variant.apps } : { appid: APPID, secret: WECHAT_SECRET };
  // JSON is YAML.
  return {
    server: { host: "127.0.0.1", port, shutdown_grace: "1s" },
    wechat: { ...apps, fake: true, timeout: "5s" },
    token: { secret: TOKEN_SECRET, ...variant.token },
    storage: { url: `sqlite:///${db}` },
    rate_limits: { login_per_ip: 0 },
    log: { access: false, level: "warning" },
    routes: [
      { prefix: "/api/", upstream: demoUrl, auth: "required" },
      { prefix: "/rec/", upstream: recorderUrl, auth: "required", websocket: true },
      ...extra,
    ],
  };
}

export async function startStack(): Promise<Stack> {
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "wxgw-client-"));
  const recorder = new Recorder();
  const procs: Proc[] = [];
  const stop = async () => {
    await Promise.all(procs.map((p) => p.stop()));
    await recorder.stop();
    fs.rmSync(tmp, { recursive: true, force: true });
  };
  try {
    const recorderPort = await recorder.start();
    const recorderUrl = `http://127.0.0.1:${recorderPort}`;
    const demoPort = await freePort();
    const demoUrl = `http://127.0.0.1:${demoPort}`;
    const demo = spawnPython("demo-upstream", ["demo-upstream", "--host", "127.0.0.1", "--port", String(demoPort)]);
    procs.push(demo);
    const gateways = {} as Record<GatewayVariant["name"], GatewayInfo>;
    for (const variant of VARIANTS) {
      const port = await freePort();
      const file = path.join(tmp, `${variant.name}.yaml`);
      const config = gatewayConfig(port, path.join(tmp, `${variant.name}.db`), demoUrl, recorderUrl, variant);
      fs.writeFileSync(file, JSON.stringify(config, null, 2));
      const proc = spawnPython(`gateway ${variant.name}`, ["run", "-c", file]);
      procs.push(proc);
      gateways[variant.name] = { url: `http://127.0.0.1:${port}`, proc };
    }
    await Promise.all([
      demo.waitFor(demoUrl + "/"),
      ...Object.values(gateways).map((g) => g.proc.waitFor(g.url + "/healthz")),
    ]);
    return { ...gateways, recorder, demoUrl, tmp, stop };
  } catch (err) {
    await stop();
    throw err;
  }
}

/** The gateway's count of successful logins, from /metrics. */
export async function loginsOk(gatewayUrl: string): Promise<number> {
  const res = await rawHttp(gatewayUrl + "/metrics");
  let total = 0;
  for (const line of res.body.split("\n")) {
    if (line.startsWith("wxgateway_logins_total{") && /outcome="ok"/.test(line)) {
      total += Number(line.trim().split(/\s+/).pop());
    }
  }
  return total;
}

// The fake WeChat's answers, mirrored from gateway/wechat/fake.py (openid_for,
// unionid_for, session_key_for). `appid` undefined is the fake's primary app:
// the first configured one (the only one of a one-app gateway), whose values
// are the single-app fake's; any other app's are salted with its appid.

/** A code's person: the code without an `@<appid>` ending (fake.split_app). */
function fakePerson(code: string): string {
  const at = code.lastIndexOf("@");
  return at >= 0 && at < code.length - 1 ? code.slice(0, at) : code;
}

function fakeLabel(label: string, appid: string | undefined): string {
  return appid === undefined ? label : `${label}app=${appid}:`;
}

function fakeDigest(text: string): Buffer {
  return crypto.createHash("sha256").update(text, "utf8").digest();
}

/** The openid the fake WeChat answers for a login code, in app `appid` (default: the primary app). */
export function fakeOpenid(code: string, appid?: string): string {
  return "o" + fakeDigest(fakeLabel("", appid) + fakePerson(code)).toString("base64url").slice(0, 27);
}

/** The fake's unionid for a `union...` code (null for others): the same in every app. */
export function fakeUnionid(code: string): string | null {
  const person = fakePerson(code);
  if (!person.startsWith("union")) return null;
  return "o" + fakeDigest("unionid:" + person).toString("base64url").slice(0, 27);
}

/** The fake's session_key for a login code (16 bytes), in app `appid` as for fakeOpenid. */
export function fakeSessionKey(code: string, appid?: string): Buffer {
  return fakeDigest(fakeLabel("session_key:", appid) + fakePerson(code)).subarray(0, 16);
}

/** Encrypt a legacy open-data payload as WeChat does (AES-128-CBC, PKCS#7). */
export function encryptLegacy(sessionKey: Buffer, payload: unknown): { encryptedData: string; iv: string } {
  const iv = crypto.randomBytes(16);
  const cipher = crypto.createCipheriv("aes-128-cbc", sessionKey, iv);
  const data = Buffer.concat([cipher.update(JSON.stringify(payload), "utf8"), cipher.final()]);
  return { encryptedData: data.toString("base64"), iv: iv.toString("base64") };
}
