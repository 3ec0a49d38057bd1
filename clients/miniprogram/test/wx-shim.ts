/**
 * A `wx` object for Node that behaves like the mini-program runtime's, doing
 * real HTTP: wx.request, wx.uploadFile (multipart/form-data), wx.connectSocket
 * (a minimal RFC 6455 client over an HTTP upgrade), wx.login (codes the fake
 * WeChat accepts), in-memory sync storage and, when given an appid,
 * wx.getAccountInfoSync. It counts what it does, so tests can assert how many
 * logins and requests really happened.
 */
import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as http from "node:http";
import * as path from "node:path";
import type {
  WxAccountInfo,
  WxConnectSocketOptions,
  WxGeneralError,
  WxLike,
  WxRequestOptions,
  WxSocketTask,
  WxUploadFileOptions,
} from "../src/index";
import { parseFrames } from "./harness";

export interface Sent {
  kind: "request" | "upload" | "socket";
  method: string;
  url: string;
  header: Record<string, string>;
  /** null when there was no HTTP answer. */
  status: number | null;
  /** The `error` of a JSON error answer. */
  error: string | null;
  /** The JSON body wx.request sent (an object `data`), else undefined. */
  body?: unknown;
}

/**
 * What the shim's wx.getAccountInfoSync does: an appid answers it, "throws"
 * throws as a runtime that declares but lacks the API, and undefined leaves
 * the method out, as base libraries before 2.2.2 do.
 */
export type AccountInfo = string | "throws" | undefined;

function flatHeaders(h: http.IncomingHttpHeaders): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(h)) if (v !== undefined) out[k] = Array.isArray(v) ? v.join(", ") : v;
  return out;
}

function errorOf(body: string): string | null {
  try {
    const parsed = JSON.parse(body);
    return parsed && typeof parsed.error === "string" ? parsed.error : null;
  } catch (_) {
    return null;
  }
}

function queryString(data: unknown): string {
  if (!data || typeof data !== "object") return "";
  return Object.entries(data as Record<string, unknown>)
    .map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(String(v))}`)
    .join("&");
}

export class WxShim implements WxLike {
  /** The code wx.login hands out (the fake WeChat: same code, same openid). */
  code: string;
  /** Number of wx.login calls. */
  loginCalls = 0;
  /** Every HTTP exchange, in order of completion (sockets: at handshake). */
  readonly sent: Sent[] = [];
  readonly storage = new Map<string, string>();
  /** Number of wx.getAccountInfoSync calls. */
  accountInfoCalls = 0;
  getAccountInfoSync?: () => WxAccountInfo;
  private readonly agent = new http.Agent({ keepAlive: true, maxSockets: 64 });

  constructor(code = "client-test-user", accountInfo: AccountInfo = undefined) {
    this.code = code;
    if (accountInfo !== undefined) {
      this.getAccountInfoSync = () => {
        this.accountInfoCalls += 1;
        if (accountInfo === "throws") throw new Error("getAccountInfoSync:fail not supported");
        return { miniProgram: { appId: accountInfo, envVersion: "develop", version: "" } };
      };
    }
  }

  /** The bodies of the POSTs to /auth/login, in order. */
  get loginBodies(): unknown[] {
    return this.sentTo("/auth/login").map((s) => s.body);
  }

  /** POSTs to /auth/login that got an HTTP answer. */
  get authLoginPosts(): number {
    return this.sent.filter((s) => s.method === "POST" && new URL(s.url).pathname === "/auth/login").length;
  }

  sentTo(pathname: string): Sent[] {
    return this.sent.filter((s) => new URL(s.url).pathname === pathname);
  }

  reset(): void {
    this.loginCalls = 0;
    this.sent.length = 0;
  }

  close(): void {
    this.agent.destroy();
  }

  // ----- wx.login ------------------------------------------------------------

  login(options: { success?: (res: { code: string }) => void; fail?: (err: WxGeneralError) => void }): void {
    this.loginCalls += 1;
    const code = this.code;
    setImmediate(() => options.success?.({ code }));
  }

  // ----- storage (values are serialised, as on the device) -------------------

  getStorageSync(key: string): unknown {
    const value = this.storage.get(key);
    return value === undefined ? "" : JSON.parse(value);
  }

  setStorageSync(key: string, value: unknown): void {
    this.storage.set(key, JSON.stringify(value));
  }

  removeStorageSync(key: string): void {
    this.storage.delete(key);
  }

  // ----- wx.request -----------------------------------------------------------

  request(options: WxRequestOptions): void {
    const method = (options.method || "GET").toUpperCase();
    const header: Record<string, string> = { ...(options.header || {}) };
    let url = options.url;
    let body: Buffer | undefined;
    let json: unknown = undefined;
    if (options.data !== undefined) {
      if (method === "GET") {
        const qs = queryString(options.data);
        if (qs) url += (url.includes("?") ? "&" : "?") + qs;
      } else if (typeof options.data === "string") {
        body = Buffer.from(options.data);
      } else if (options.data instanceof ArrayBuffer) {
        body = Buffer.from(options.data);
      } else {
        // wx.request serialises objects as JSON by default.
        if (!Object.keys(header).some((k) => k.toLowerCase() === "content-type")) {
          header["Content-Type"] = "application/json";
        }
        body = Buffer.from(JSON.stringify(options.data));
        json = JSON.parse(body.toString("utf8"));
      }
    }
    this.exchange("request", method, url, header, body, options.timeout, (status, headers, text) => {
      let data: unknown = text;
      if ((options.dataType || "json") === "json") {
        try {
          data = JSON.parse(text);
        } catch (_) {
          data = text;
        }
      }
      options.success?.({ statusCode: status, header: headers, data });
    }, options.fail, json);
  }

  // ----- wx.uploadFile --------------------------------------------------------

  uploadFile(options: WxUploadFileOptions): void {
    let file: Buffer;
    try {
      file = fs.readFileSync(options.filePath);
    } catch (err) {
      setImmediate(() => options.fail?.({ errMsg: `uploadFile:fail ${String(err)}` }));
      return;
    }
    const boundary = "----wxshim" + crypto.randomBytes(12).toString("hex");
    const pieces: Buffer[] = [];
    for (const [k, v] of Object.entries(options.formData || {})) {
      pieces.push(Buffer.from(`--${boundary}\r\nContent-Disposition: form-data; name="${k}"\r\n\r\n${String(v)}\r\n`));
    }
    pieces.push(
      Buffer.from(
        `--${boundary}\r\nContent-Disposition: form-data; name="${options.name}"; ` +
          `filename="${path.basename(options.filePath)}"\r\nContent-Type: application/octet-stream\r\n\r\n`,
      ),
      file,
      Buffer.from(`\r\n--${boundary}--\r\n`),
    );
    const header = { ...(options.header || {}), "Content-Type": `multipart/form-data; boundary=${boundary}` };
    this.exchange("upload", "POST", options.url, header, Buffer.concat(pieces), options.timeout, (status, headers, text) => {
      options.success?.({ statusCode: status, data: text, header: headers });
    }, options.fail);
  }

  private exchange(
    kind: Sent["kind"],
    method: string,
    url: string,
    header: Record<string, string>,
    body: Buffer | undefined,
    timeout: number | undefined,
    done: (status: number, headers: Record<string, string>, text: string) => void,
    fail: ((err: WxGeneralError) => void) | undefined,
    json?: unknown,
  ): void {
    const headers: Record<string, string> = { ...header };
    if (body) headers["Content-Length"] = String(body.length);
    const record: Sent = { kind, method, url, header: { ...header }, status: null, error: null, body: json };
    const req = http.request(url, { method, headers, agent: this.agent }, (res) => {
      const chunks: Buffer[] = [];
      res.on("data", (c: Buffer) => chunks.push(c));
      res.on("end", () => {
        const text = Buffer.concat(chunks).toString("utf8");
        record.status = res.statusCode || 0;
        record.error = record.status >= 400 ? errorOf(text) : null;
        this.sent.push(record);
        done(res.statusCode || 0, flatHeaders(res.headers), text);
      });
    });
    req.setTimeout(timeout || 20_000, () => req.destroy(new Error("timeout")));
    req.on("error", (err) => {
      this.sent.push(record);
      fail?.({ errMsg: `${kind}:fail ${err.message}` });
    });
    req.end(body);
  }

  // ----- wx.connectSocket -----------------------------------------------------

  connectSocket(options: WxConnectSocketOptions): WxSocketTask {
    const task = new ShimSocketTask();
    const target = new URL(options.url);
    if (target.protocol !== "ws:") throw new Error(`the shim speaks ws:// only, not ${target.protocol}`);
    const key = crypto.randomBytes(16).toString("base64");
    const header: Record<string, string> = { ...(options.header || {}) };
    const record: Sent = { kind: "socket", method: "GET", url: options.url.replace(/^ws/, "http"), header, status: null, error: null };
    this.sent.push(record);
    const req = http.request({
      host: target.hostname,
      port: target.port,
      path: target.pathname + target.search,
      headers: {
        ...header,
        Connection: "Upgrade",
        Upgrade: "websocket",
        "Sec-WebSocket-Key": key,
        "Sec-WebSocket-Version": "13",
        ...(options.protocols && options.protocols.length ? { "Sec-WebSocket-Protocol": options.protocols.join(", ") } : {}),
      },
    });
    req.on("upgrade", (res, socket, head) => {
      record.status = res.statusCode || 0;
      const expected = crypto.createHash("sha1").update(key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest("base64");
      if (res.headers["sec-websocket-accept"] !== expected) {
        socket.destroy();
        task.emitError({ errMsg: "connectSocket:fail bad Sec-WebSocket-Accept" });
        return;
      }
      task.attach(socket, head, flatHeaders(res.headers));
    });
    req.on("response", (res) => {
      // Not upgraded: wx reports an error and a close, without the status.
      record.status = res.statusCode || 0;
      const chunks: Buffer[] = [];
      res.on("data", (c: Buffer) => chunks.push(c));
      res.on("end", () => {
        record.error = errorOf(Buffer.concat(chunks).toString("utf8"));
        task.emitError({ errMsg: `connectSocket:fail handshake status ${res.statusCode}` });
        task.emitClose(1006, "handshake refused");
      });
    });
    req.on("error", (err) => {
      task.emitError({ errMsg: `connectSocket:fail ${err.message}` });
      task.emitClose(1006, err.message);
    });
    req.end();
    setImmediate(() => options.success?.());
    return task;
  }
}

class ShimSocketTask implements WxSocketTask {
  private socket: import("node:net").Socket | null = null;
  private closed = false;
  private readonly handlers = {
    open: [] as ((res: { header?: Record<string, string> }) => void)[],
    message: [] as ((res: { data: string | ArrayBuffer }) => void)[],
    error: [] as ((err: WxGeneralError) => void)[],
    close: [] as ((res: { code: number; reason: string }) => void)[],
  };

  onOpen(cb: (res: { header?: Record<string, string> }) => void): void {
    this.handlers.open.push(cb);
  }
  onMessage(cb: (res: { data: string | ArrayBuffer }) => void): void {
    this.handlers.message.push(cb);
  }
  onError(cb: (err: WxGeneralError) => void): void {
    this.handlers.error.push(cb);
  }
  onClose(cb: (res: { code: number; reason: string }) => void): void {
    this.handlers.close.push(cb);
  }

  emitError(err: WxGeneralError): void {
    for (const cb of this.handlers.error) cb(err);
  }

  emitClose(code: number, reason: string): void {
    if (this.closed) return;
    this.closed = true;
    for (const cb of this.handlers.close) cb({ code, reason });
  }

  attach(socket: import("node:net").Socket, head: Buffer, header: Record<string, string>): void {
    this.socket = socket;
    let buf: Buffer = Buffer.from(head);
    const consume = () => {
      const parsed = parseFrames(buf);
      buf = parsed.rest;
      for (const frame of parsed.frames) {
        if (frame.opcode === 1) {
          for (const cb of this.handlers.message) cb({ data: frame.payload.toString("utf8") });
        } else if (frame.opcode === 2) {
          const ab = frame.payload.buffer.slice(frame.payload.byteOffset, frame.payload.byteOffset + frame.payload.length);
          for (const cb of this.handlers.message) cb({ data: ab as ArrayBuffer });
        } else if (frame.opcode === 9) {
          this.write(10, frame.payload);
        } else if (frame.opcode === 8) {
          const code = frame.payload.length >= 2 ? frame.payload.readUInt16BE(0) : 1005;
          this.write(8, frame.payload.subarray(0, 2));
          socket.end();
          this.emitClose(code, frame.payload.subarray(2).toString("utf8"));
        }
      }
    };
    socket.on("data", (chunk: Buffer) => {
      buf = Buffer.concat([buf, chunk]);
      consume();
    });
    socket.on("close", () => this.emitClose(1006, "connection closed"));
    socket.on("error", (err) => this.emitError({ errMsg: err.message }));
    for (const cb of this.handlers.open) cb({ header });
    if (buf.length) consume();
  }

  private write(opcode: number, payload: Buffer): void {
    if (!this.socket || this.socket.destroyed) return;
    // Client frames are masked (RFC 6455 5.3).
    const mask = crypto.randomBytes(4);
    const masked = Buffer.from(payload);
    for (let i = 0; i < masked.length; i++) masked[i] ^= mask[i % 4];
    let head: Buffer;
    if (payload.length < 126) head = Buffer.from([0x80 | opcode, 0x80 | payload.length]);
    else if (payload.length < 65536) {
      head = Buffer.alloc(4);
      head[0] = 0x80 | opcode;
      head[1] = 0x80 | 126;
      head.writeUInt16BE(payload.length, 2);
    } else {
      head = Buffer.alloc(10);
      head[0] = 0x80 | opcode;
      head[1] = 0x80 | 127;
      head.writeBigUInt64BE(BigInt(payload.length), 2);
    }
    this.socket.write(Buffer.concat([head, mask, masked]));
  }

  send(options: { data: string | ArrayBuffer; success?: () => void; fail?: (err: WxGeneralError) => void }): void {
    if (!this.socket || this.closed) {
      options.fail?.({ errMsg: "sendSocketMessage:fail not open" });
      return;
    }
    const isText = typeof options.data === "string";
    this.write(isText ? 1 : 2, isText ? Buffer.from(options.data as string) : Buffer.from(options.data as ArrayBuffer));
    options.success?.();
  }

  close(options: { code?: number; reason?: string } = {}): void {
    if (!this.socket) return;
    const payload = Buffer.alloc(2);
    payload.writeUInt16BE(options.code || 1000, 0);
    this.write(8, Buffer.concat([payload, Buffer.from(options.reason || "")]));
  }
}
