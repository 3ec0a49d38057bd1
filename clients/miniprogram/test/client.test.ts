/**
 * The client against the REAL gateway (python -m gateway run, fake WeChat
 * in-process), the demo upstream and a recording upstream. Only `wx` is
 * replaced, by a shim that does real HTTP (test/wx-shim.ts).
 */
import * as assert from "node:assert/strict";
import * as crypto from "node:crypto";
import * as fs from "node:fs";
import * as path from "node:path";
import { after, before, describe, test as nodeTest } from "node:test";

import {
  GatewayClient,
  GatewayClientOptions,
  GatewayError,
  SocketOptions,
  WxSocketTask,
  createClient,
  errorCodeOf,
} from "../src/index";
import {
  APPID,
  CARD_APPID,
  SHOP_APPID,
  Stack,
  encryptLegacy,
  fakeOpenid,
  fakeSessionKey,
  fakeUnionid,
  loginsOk,
  rawHttp,
  startStack,
} from "./harness";
import { AccountInfo, WxShim } from "./wx-shim";

/** Every test has a deadline, so a client that loops fails instead of hanging. */
const test = (name: string, fn: () => Promise<void>) => nodeTest(name, { timeout: 15_000 }, fn);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

let stack: Stack;
const shims: WxShim[] = [];

function setup(
  code: string,
  options: Partial<GatewayClientOptions> = {},
): { wx: WxShim; client: GatewayClient } {
  const wx = new WxShim(code);
  shims.push(wx);
  const client = createClient({ baseUrl: stack.main.url, wx, ...options });
  return { wx, client };
}

/** The demo upstream's echo of what it received. */
interface Echo {
  upstream: string;
  method: string;
  path: string;
  headers: Record<string, string>;
  body_bytes: number;
}

async function expectGatewayError(promise: Promise<unknown>): Promise<GatewayError> {
  try {
    await promise;
  } catch (err) {
    assert.ok(err instanceof GatewayError, `expected a GatewayError, got ${String(err)}`);
    return err;
  }
  assert.fail("expected a rejection");
}

function unauthorized(wx: WxShim): { path: string; error: string | null }[] {
  return wx.sent.filter((s) => s.status === 401).map((s) => ({ path: new URL(s.url).pathname, error: s.error }));
}

describe("wx-gateway mini-program client", () => {
  before(async () => {
    stack = await startStack();
  }, { timeout: 60_000 });

  after(async () => {
    for (const wx of shims) wx.close();
    if (stack) await stack.stop();
  });

  test("login() exchanges a wx.login code and stores the token with its expiry", async () => {
    const { wx, client } = setup("login-user");
    const before = Date.now();
    const result = await client.login();
    assert.equal(wx.loginCalls, 1);
    assert.equal(wx.authLoginPosts, 1);
    assert.equal(result.openid, fakeOpenid("login-user"));
    assert.equal(result.expiresIn, 7200);
    assert.match(result.token, /^[\w-]+\.[\w-]+\.[\w-]+$/);

    const stored = wx.getStorageSync("wx_gateway_session") as Record<string, unknown>;
    assert.equal(stored.token, result.token);
    assert.equal(stored.openid, result.openid);
    const expiresAt = stored.expiresAt as number;
    assert.ok(expiresAt >= before + 7200_000 - 1000 && expiresAt <= Date.now() + 7200_000, `expiresAt ${expiresAt}`);
    assert.equal(client.getToken(), result.token);

    // The stored token is the one the gateway accepts.
    const me = await rawHttp(stack.main.url + "/auth/me", { headers: { Authorization: `Bearer ${result.token}` } });
    assert.equal(me.status, 200);
    assert.equal(JSON.parse(me.body).openid, result.openid);
  });

  test("request() logs in lazily, sends the token, and the upstream sees X-OpenId (not the token)", async () => {
    const { wx, client } = setup("request-user");
    const res = await client.request<Echo>({ url: "/api/orders?page=2", header: { "X-OpenId": "forged" } });
    assert.equal(res.statusCode, 200);
    assert.equal(res.data.upstream, "demo");
    assert.equal(res.data.path, "/api/orders?page=2");
    assert.equal(res.data.headers["X-OpenId"], fakeOpenid("request-user"));
    assert.equal(res.data.headers["Authorization"], undefined, "the token header is not forwarded");
    assert.ok(res.requestId, "X-Request-Id is returned");
    assert.equal(wx.loginCalls, 1);
    const [sent] = wx.sentTo("/api/orders");
    assert.equal(sent.header["Authorization"], `Bearer ${client.getToken()}`);

    // A second request reuses the stored token.
    await client.request({ url: "/api/orders" });
    assert.equal(wx.loginCalls, 1);
    assert.equal(wx.authLoginPosts, 1);
  });

  test("the global wx is used when none is passed", async () => {
    const wx = new WxShim("global-user");
    shims.push(wx);
    (globalThis as { wx?: unknown }).wx = wx;
    try {
      const client = new GatewayClient({ baseUrl: stack.main.url + "/" });
      const res = await client.request<Echo>({ url: "api/x" });
      assert.equal(res.data.headers["X-OpenId"], fakeOpenid("global-user"));
      assert.equal(wx.loginCalls, 1);
    } finally {
      delete (globalThis as { wx?: unknown }).wx;
    }
  });

  test("after /auth/logout revokes the token, the next request() logs in again and succeeds", async () => {
    const { wx, client } = setup("revoked-user");
    const first = await client.login();
    const out = await rawHttp(stack.main.url + "/auth/logout", {
      method: "POST",
      headers: { Authorization: `Bearer ${first.token}` },
    });
    assert.equal(out.status, 200);
    wx.reset();

    const res = await client.request<Echo>({ url: "/api/after-logout" });
    assert.equal(res.statusCode, 200);
    assert.equal(res.data.headers["X-OpenId"], first.openid);
    assert.equal(wx.loginCalls, 1);
    assert.equal(wx.authLoginPosts, 1);
    assert.deepEqual(unauthorized(wx), [{ path: "/api/after-logout", error: "token_revoked" }]);
    assert.notEqual(client.getToken(), first.token);
    assert.equal(wx.sentTo("/api/after-logout").length, 2);
  });

  test("10 concurrent requests failing with token_revoked share exactly ONE login", async () => {
    const { wx, client } = setup("concurrent-user");
    const first = await client.login();
    const out = await rawHttp(stack.main.url + "/auth/logout", {
      method: "POST",
      headers: { Authorization: `Bearer ${first.token}` },
    });
    assert.equal(out.status, 200);
    wx.reset();
    const loginsBefore = await loginsOk(stack.main.url);

    const results = await Promise.all(
      Array.from({ length: 10 }, (_, i) => client.request<Echo>({ url: `/api/burst/${i}` })),
    );

    for (const res of results) {
      assert.equal(res.statusCode, 200);
      assert.equal(res.data.headers["X-OpenId"], first.openid);
    }
    const failures = unauthorized(wx);
    assert.equal(failures.length, 10, "all ten failed with the revoked token");
    assert.ok(failures.every((f) => f.error === "token_revoked"));
    assert.equal(wx.loginCalls, 1, "one wx.login");
    assert.equal(wx.authLoginPosts, 1, "one POST /auth/login");
    assert.equal((await loginsOk(stack.main.url)) - loginsBefore, 1, "the gateway counted one login");
    const retried = wx.sent.filter((s) => new URL(s.url).pathname.startsWith("/api/burst/") && s.status === 200);
    assert.equal(retried.length, 10);
    const fresh = client.getToken();
    assert.ok(retried.every((s) => s.header["Authorization"] === `Bearer ${fresh}`));
  });

  test("a request failing after another one already logged in again reuses the new token", async () => {
    const { wx, client } = setup("late-user");
    const first = await client.login();
    wx.reset();
    // B passes the gateway with the first token; the upstream answers it late.
    const slow = client.request<{ headers: Record<string, string> }>({ url: "/rec/late401?key=late-user&ms=400" });
    while (stack.recorder.count("/rec/late401") === 0) await sleep(5);
    await rawHttp(stack.main.url + "/auth/logout", {
      method: "POST",
      headers: { Authorization: `Bearer ${first.token}` },
    });
    // A fails with token_revoked and logs in again, long before B's 401.
    const fast = await client.request<Echo>({ url: "/api/fast" });
    assert.equal(fast.data.headers["X-OpenId"], first.openid);
    assert.equal(wx.loginCalls, 1);
    const late = await slow;
    assert.equal(late.statusCode, 200);
    assert.equal(late.data.headers["x-openid"], first.openid);
    assert.equal(wx.loginCalls, 1, "B retried with A's new token, without another login");
    assert.equal(stack.recorder.count("/rec/late401"), 2);
    const fresh = client.getToken();
    const retried = wx.sentTo("/rec/late401").filter((s) => s.status === 200);
    assert.equal(retried.length, 1);
    assert.equal(retried[0].header["Authorization"], `Bearer ${fresh}`);
  });

  test("a request that fails twice with a re-login code is returned as an error, not looped", async () => {
    const { wx, client } = setup("twice-user");
    await client.login();
    wx.reset();
    const err = await expectGatewayError(client.request({ url: "/rec/always401" }));
    assert.equal(err.code, "token_expired");
    assert.equal(err.status, 401);
    assert.equal(err.message, "the upstream says the token expired");
    assert.equal(stack.recorder.count("/rec/always401"), 2, "sent once, retried once");
    assert.equal(wx.loginCalls, 1, "one silent re-login");

    // With throwHttpErrors: false the second 401 is handed back as a response.
    wx.reset();
    const res = await client.request({ url: "/rec/always401", throwHttpErrors: false });
    assert.equal(res.statusCode, 401);
    assert.equal(stack.recorder.count("/rec/always401"), 4);
    assert.equal(wx.loginCalls, 1);
  });

  test("a gateway answering token_missing twice (wrong token header) is an error after one retry", async () => {
    // The short gateway reads X-WX-Token; this client sends Authorization.
    const wx = new WxShim("wrong-header-user");
    shims.push(wx);
    const client = createClient({ baseUrl: stack.short.url, wx });
    const err = await expectGatewayError(client.request({ url: "/api/x" }));
    assert.equal(err.code, "token_missing");
    assert.equal(err.status, 401);
    assert.match(err.requestId || "", /\S/, "carries X-Request-Id");
    assert.equal(wx.sentTo("/api/x").length, 2);
    assert.equal(wx.loginCalls, 2, "the first login, then one re-login");
  });

  test("a custom token header carries the bare token", async () => {
    const wx = new WxShim("custom-header-user");
    shims.push(wx);
    const client = createClient({ baseUrl: stack.short.url, wx, tokenHeader: "X-WX-Token" });
    const res = await client.request<Echo>({ url: "/api/custom" });
    assert.equal(res.data.headers["X-OpenId"], fakeOpenid("custom-header-user"));
    const [sent] = wx.sentTo("/api/custom");
    assert.equal(sent.header["X-WX-Token"], client.getToken());
    assert.equal(sent.header["Authorization"], undefined);
  });

  test("token_invalid is not retried: the stored token is dropped and the error returned", async () => {
    const { wx, client } = setup("tampered-token-user");
    const first = await client.login();
    const session = wx.getStorageSync("wx_gateway_session") as Record<string, unknown>;
    const [h, p, s] = first.token.split(".");
    const tampered = `${h}.${p}.${s.slice(0, -4)}${s.slice(-4) === "AAAA" ? "BBBB" : "AAAA"}`;
    wx.setStorageSync("wx_gateway_session", { ...session, token: tampered });
    wx.reset();

    const err = await expectGatewayError(client.request({ url: "/api/tampered" }));
    assert.equal(err.code, "token_invalid");
    assert.equal(err.status, 401);
    assert.equal(wx.loginCalls, 0, "no silent login for token_invalid");
    assert.equal(wx.sentTo("/api/tampered").length, 1, "not retried");
    assert.equal(client.getToken(), null, "the bad token is dropped");

    // The next call starts afresh.
    const res = await client.request<Echo>({ url: "/api/tampered" });
    assert.equal(res.data.headers["X-OpenId"], first.openid);
    assert.equal(wx.loginCalls, 1);
  });

  test("an invalid wx.login code is a typed invalid_code error and stores nothing", async () => {
    const { wx, client } = setup("invalid-code-123");
    const err = await expectGatewayError(client.login());
    assert.equal(err.code, "invalid_code");
    assert.equal(err.status, 401);
    assert.equal(err.wechatErrcode, 40029);
    assert.match(err.requestId || "", /\S/);
    assert.equal(client.getToken(), null);
    assert.equal(wx.getStorageSync("wx_gateway_session"), "");

    // Through request(): the login error surfaces, nothing is sent upstream.
    const err2 = await expectGatewayError(client.request({ url: "/api/never" }));
    assert.equal(err2.code, "invalid_code");
    assert.equal(wx.sentTo("/api/never").length, 0);
    assert.equal(wx.authLoginPosts, 2);
  });

  test("an expired token is replaced before use (short ttl gateway)", async () => {
    const wx = new WxShim("expiring-user");
    shims.push(wx);
    const client = createClient({ baseUrl: stack.short.url, wx, tokenHeader: "X-WX-Token" });
    const first = await client.login();
    assert.equal(first.expiresIn, 1);
    await sleep(1100);
    wx.reset();
    const res = await client.request<Echo>({ url: "/api/after-expiry" });
    assert.equal(res.data.headers["X-OpenId"], first.openid);
    assert.equal(wx.loginCalls, 1, "refreshed");
    assert.deepEqual(unauthorized(wx), [], "the expired token was not even sent");
    assert.notEqual(client.getToken(), first.token);
  });

  test("a token the gateway says is expired (401 token_expired) is refreshed and the request retried", async () => {
    const wx = new WxShim("expired-server-side");
    shims.push(wx);
    const client = createClient({ baseUrl: stack.short.url, wx, tokenHeader: "X-WX-Token" });
    const first = await client.login();
    // The device clock says the token is still good for an hour.
    const session = wx.getStorageSync("wx_gateway_session") as Record<string, unknown>;
    wx.setStorageSync("wx_gateway_session", { ...session, expiresAt: Date.now() + 3600_000 });
    await sleep(1100);
    wx.reset();
    const res = await client.request<Echo>({ url: "/api/server-expired" });
    assert.equal(res.statusCode, 200);
    assert.equal(res.data.headers["X-OpenId"], first.openid);
    assert.deepEqual(unauthorized(wx), [{ path: "/api/server-expired", error: "token_expired" }]);
    assert.equal(wx.loginCalls, 1);
  });

  test("getPhoneNumber(code) returns the fake's number, and me() shows it", async () => {
    const { wx, client } = setup("phone-user");
    const phone = await client.getPhoneNumber("phone-13912345678");
    assert.deepEqual(phone, {
      phone_number: "13912345678",
      pure_phone_number: "13912345678",
      country_code: "86",
    });
    const me = await client.me();
    assert.deepEqual(me, { openid: fakeOpenid("phone-user"), unionid: null, phone_number: "13912345678" });
    assert.equal(wx.loginCalls, 1);

    // A bad phone code is a 401 invalid_code: an error, never a silent re-login.
    const err = await expectGatewayError(client.getPhoneNumber("invalid-phone-code"));
    assert.equal(err.code, "invalid_code");
    assert.equal(err.wechatErrcode, 40029);
    assert.equal(wx.loginCalls, 1);
  });

  test("the legacy encrypted_data/iv phone form and decrypt()", async () => {
    const { wx, client } = setup("union-legacy-user");
    const login = await client.login();
    assert.equal(login.unionid?.startsWith("o"), true);
    const key = fakeSessionKey("union-legacy-user");
    const watermark = { appid: APPID, timestamp: Math.floor(Date.now() / 1000) };
    const enc = encryptLegacy(key, {
      phoneNumber: "13700001111",
      purePhoneNumber: "13700001111",
      countryCode: "86",
      watermark,
    });
    const phone = await client.getPhoneNumberLegacy(enc.encryptedData, enc.iv);
    assert.equal(phone.phone_number, "13700001111");
    assert.equal((await client.me()).phone_number, "13700001111");

    const data = encryptLegacy(key, { stepInfoList: [{ step: 42 }], watermark });
    assert.deepEqual(await client.decrypt(data.encryptedData, data.iv), { stepInfoList: [{ step: 42 }], watermark });

    // The legacy forms never log in again (a new login would change the
    // session_key the payload is encrypted with): a revoked token is an error.
    await rawHttp(stack.main.url + "/auth/logout", {
      method: "POST",
      headers: { Authorization: `Bearer ${client.getToken()}` },
    });
    wx.reset();
    const revoked = await expectGatewayError(client.getPhoneNumberLegacy(enc.encryptedData, enc.iv));
    assert.equal(revoked.code, "token_revoked");
    assert.equal(revoked.status, 401);
    assert.equal(wx.loginCalls, 0);
    await client.login();

    const other = encryptLegacy(crypto.randomBytes(16), { phoneNumber: "1", watermark });
    const err = await expectGatewayError(client.getPhoneNumberLegacy(other.encryptedData, other.iv));
    assert.equal(err.code, "decrypt_failed");
    assert.equal(err.status, 400);
  });

  test("logout() revokes the token on the gateway and clears storage", async () => {
    const { wx, client } = setup("logout-user");
    const first = await client.login();
    await client.logout();
    assert.equal(wx.getStorageSync("wx_gateway_session"), "");
    assert.equal(client.getToken(), null);
    const after = await rawHttp(stack.main.url + "/auth/me", { headers: { Authorization: `Bearer ${first.token}` } });
    assert.equal(after.status, 401);
    assert.equal(JSON.parse(after.body).error, "token_revoked");
    // A logout with nothing stored is a no-op.
    await client.logout();
    // me() afterwards logs in again.
    const me = await client.me();
    assert.equal(me.openid, first.openid);
    assert.equal(wx.loginCalls, 2);
  });

  test("uploadFile() sends a multipart body that reaches the upstream with the identity", async () => {
    const { wx, client } = setup("upload-user");
    const file = path.join(stack.tmp, "photo.bin");
    const content = crypto.randomBytes(200_000);
    fs.writeFileSync(file, content);
    const res = await client.uploadFile({ url: "/rec/upload", filePath: file, name: "photo", formData: { note: "hello" } });
    assert.equal(res.statusCode, 200);
    const seen = JSON.parse(res.data);
    assert.equal(seen.headers["x-openid"], fakeOpenid("upload-user"));
    assert.equal(seen.headers["authorization"], undefined);
    assert.match(seen.headers["content-type"], /^multipart\/form-data; boundary=/);
    const byName = Object.fromEntries(seen.parts.map((p: { name: string }) => [p.name, p]));
    assert.equal(byName.note.text, "hello");
    assert.equal(byName.photo.filename, "photo.bin");
    assert.equal(byName.photo.size, content.length);
    assert.equal(byName.photo.sha256, crypto.createHash("sha256").update(content).digest("hex"));

    // Revoked token: one re-login, one retry, and only the retry reaches the upstream.
    // A small file: the gateway answers the 401 without reading the body and then
    // closes the connection at once, so with a body of a few hundred KiB the
    // client often gets a connection reset instead of the 401 (reported as a
    // gateway fault; see README.md "Known gateway behaviour").
    const small = path.join(stack.tmp, "small.bin");
    fs.writeFileSync(small, crypto.randomBytes(16_000));
    const token = client.getToken() as string;
    await rawHttp(stack.main.url + "/auth/logout", { method: "POST", headers: { Authorization: `Bearer ${token}` } });
    wx.reset();
    const before = stack.recorder.count("/rec/upload2");
    const again = await client.uploadFile({ url: "/rec/upload2", filePath: small, name: "photo" });
    assert.equal(again.statusCode, 200);
    assert.equal(JSON.parse(again.data).headers["x-openid"], fakeOpenid("upload-user"));
    assert.deepEqual(unauthorized(wx), [{ path: "/rec/upload2", error: "token_revoked" }]);
    assert.equal(wx.loginCalls, 1);
    assert.equal(stack.recorder.count("/rec/upload2") - before, 1);
  });

  test("connectSocket() opens a WebSocket through the gateway with the token header", async () => {
    const { wx, client } = setup("socket-user");
    const task = await client.connectSocket({ url: "/rec/ws?room=1" });
    const messages: string[] = [];
    task.onMessage((m) => messages.push(String(m.data)));
    const closed = new Promise<{ code: number }>((resolve) => task.onClose(resolve));
    const errors: string[] = [];
    task.onError((e) => errors.push(e.errMsg));
    await new Promise<void>((resolve, reject) => {
      task.onOpen(() => resolve());
      task.onError((e) => reject(new Error(e.errMsg)));
    });
    while (messages.length === 0) await sleep(10);
    const hello = JSON.parse(messages[0]);
    assert.equal(hello.openid, fakeOpenid("socket-user"));
    assert.equal(hello.authorization, null, "the token is not forwarded upstream");
    assert.equal(hello.path, "/rec/ws?room=1");
    const [handshake] = wx.sent.filter((s) => s.kind === "socket");
    assert.equal(handshake.header["Authorization"], `Bearer ${client.getToken()}`);
    assert.equal(handshake.status, 101);

    const had = messages.length;
    task.send({ data: "ping" });
    while (messages.length === had) await sleep(10);
    assert.equal(messages[had], "echo:ping");
    task.close({ code: 1000 });
    const { code } = await closed;
    assert.equal(code, 1000);
    assert.deepEqual(errors, []);
  });

  /** Wait (bounded) until `ready()` holds. */
  async function until(ready: () => boolean, what: string, ms = 10_000): Promise<void> {
    const deadline = Date.now() + ms;
    while (!ready()) {
      if (Date.now() > deadline) assert.fail(`timed out waiting for ${what}`);
      await sleep(20);
    }
  }

  // Typed as the plain SocketTask, so this suite also runs (and fails) against a
  // client without reconnection.
  function watch(socket: WxSocketTask & { onReconnect?: (cb: (r: { code: number; reason: string }) => void) => void }) {
    const seen = { opens: 0, messages: [] as string[], reconnects: [] as number[], closes: [] as number[] };
    socket.onOpen(() => (seen.opens += 1));
    socket.onMessage((m) => seen.messages.push(String(m.data)));
    socket.onReconnect?.((r) => seen.reconnects.push(r.code));
    socket.onClose((r) => seen.closes.push(r.code));
    return seen;
  }

  test("a socket closed with 1008 when its token is revoked logs in again and reconnects", async () => {
    const { wx, client } = setup("socket-revoked");
    const socket = await client.connectSocket({ url: "/rec/ws?revoked=1" });
    const seen = watch(socket);
    await until(() => seen.messages.length === 1, "the first socket's hello");
    const first = client.getToken();
    assert.ok(first);
    // Revoked elsewhere (the user logged out on another page): the gateway closes with 1008.
    const res = await rawHttp(stack.main.url + "/auth/logout", {
      method: "POST",
      headers: { Authorization: `Bearer ${first}` },
    });
    assert.equal(res.status, 200);
    await until(() => seen.opens === 2 && seen.messages.length === 2, "the second socket's hello");
    assert.deepEqual(seen.reconnects, [1008]);
    assert.deepEqual(seen.closes, [], "onClose waits for the final close");
    assert.equal(wx.loginCalls, 2);
    const handshakes = wx.sent.filter((s) => s.kind === "socket");
    assert.equal(handshakes.length, 2);
    assert.equal(handshakes[0].header["Authorization"], `Bearer ${first}`);
    assert.equal(handshakes[1].header["Authorization"], `Bearer ${client.getToken()}`);
    assert.notEqual(client.getToken(), first);
    assert.equal(JSON.parse(seen.messages[1]).openid, fakeOpenid("socket-revoked"));
    // The new socket relays, and the user's close is final.
    socket.send({ data: "again" });
    await until(() => seen.messages.includes("echo:again"), "the echo on the new socket");
    socket.close({ code: 1000 });
    await until(() => seen.closes.length === 1, "the close");
    assert.deepEqual(seen.closes, [1000]);
  });

  test("a socket closed with 1008 when its token expires reconnects with a fresh token", async () => {
    const wx = new WxShim("socket-expired");
    shims.push(wx);
    // The short gateway's tokens live 1 s: the gateway closes the socket at exp.
    const client = createClient({ baseUrl: stack.short.url, wx, tokenHeader: "X-WX-Token" });
    const socket = await client.connectSocket({ url: "/rec/ws?expired=1" });
    const seen = watch(socket);
    await until(() => seen.opens >= 2, "the reconnect after exp");
    assert.equal(seen.reconnects[0], 1008);
    assert.deepEqual(seen.closes, []);
    assert.ok(wx.loginCalls >= 2);
    const tokens = wx.sent.filter((s) => s.kind === "socket").map((s) => s.header["X-WX-Token"]);
    assert.ok(tokens.length >= 2);
    assert.notEqual(tokens[0], tokens[1]);
    socket.close({ code: 1000 });
    await until(() => seen.closes.length === 1, "the close");
  });

  test("with reconnect: false, or after logout(), a socket is not reopened", async () => {
    const { wx, client } = setup("socket-no-reconnect");
    const socket = await client.connectSocket({ url: "/rec/ws?once=1", reconnect: false } as SocketOptions);
    const seen = watch(socket);
    await until(() => seen.messages.length === 1, "the hello");
    const token = client.getToken();
    await rawHttp(stack.main.url + "/auth/logout", { method: "POST", headers: { Authorization: `Bearer ${token}` } });
    await until(() => seen.closes.length === 1, "the 1008 close");
    assert.deepEqual(seen.closes, [1008]);
    assert.deepEqual(seen.reconnects, []);
    assert.equal(wx.loginCalls, 1);

    const other = await client.connectSocket({ url: "/rec/ws?logout=1" });
    const seenOther = watch(other);
    await until(() => seenOther.messages.length === 1, "the hello");
    await client.logout();
    await until(() => seenOther.closes.length === 1, "the close at logout");
    assert.deepEqual(seenOther.reconnects, []);
    assert.equal(wx.loginCalls, 2);
    assert.equal(client.getToken(), null);
  });

  test("the token is never sent to another host", async () => {
    const { wx, client } = setup("foreign-user");
    await assert.rejects(client.request({ url: "http://example.com/steal" }), TypeError);
    await assert.rejects(client.request({ url: "//example.com/steal" }), TypeError);
    await assert.rejects(client.request({ url: stack.main.url + ".evil.example/x" }), TypeError);
    await assert.rejects(client.connectSocket({ url: "ws://example.com/x" }), TypeError);
    assert.equal(wx.sent.filter((s) => !s.url.startsWith(stack.main.url + "/")).length, 0);
    // An absolute URL under the base is fine.
    const res = await client.request<Echo>({ url: stack.main.url + "/api/abs" });
    assert.equal(res.data.path, "/api/abs");
  });

  // ----- several mini programs (contract section 9) ---------------------------
  //
  // stack.multi serves two apps, shop (SHOP_APPID, first) and card (CARD_APPID);
  // the in-process fake WeChat gives each app its own openids and session keys
  // and one unionid per `union...` person across both.

  /** A client on `baseUrl` whose wx.getAccountInfoSync answers `accountInfo` (see AccountInfo). */
  function setupApp(
    baseUrl: string,
    code: string,
    accountInfo: AccountInfo,
    options: Partial<GatewayClientOptions> = {},
  ): { wx: WxShim; client: GatewayClient } {
    const wx = new WxShim(code, accountInfo);
    shims.push(wx);
    return { wx, client: createClient({ baseUrl, wx, ...options }) };
  }

  /** The recorder's echo of the request it received (header names in lower case). */
  interface Recorded {
    headers: Record<string, string | undefined>;
  }

  test("two apps: each client logs in with its runtime's appid, and the upstream sees its X-AppId and openid", async () => {
    const code = "two-app-user";
    const shop = setupApp(stack.multi.url, code, SHOP_APPID);
    const card = setupApp(stack.multi.url, code, CARD_APPID);
    assert.equal(shop.client.appid, SHOP_APPID);
    assert.equal(card.client.appid, CARD_APPID);

    // A forged X-AppId from the client never reaches the upstream.
    const forged = { "X-AppId": CARD_APPID, "X-OpenId": "forged" };
    const [s, c] = await Promise.all([
      shop.client.request<Recorded>({ url: "/rec/whoami", header: forged }),
      card.client.request<Recorded>({ url: "/rec/whoami", header: { ...forged, "X-AppId": SHOP_APPID } }),
    ]);
    assert.equal(s.data.headers["x-appid"], SHOP_APPID);
    assert.equal(s.data.headers["x-openid"], fakeOpenid(code));
    assert.equal(c.data.headers["x-appid"], CARD_APPID);
    assert.equal(c.data.headers["x-openid"], fakeOpenid(code, CARD_APPID));
    assert.notEqual(fakeOpenid(code), fakeOpenid(code, CARD_APPID), "one openid per app");

    assert.deepEqual(shop.wx.loginBodies, [{ code, appid: SHOP_APPID }]);
    assert.deepEqual(card.wx.loginBodies, [{ code, appid: CARD_APPID }]);
    const stored = card.wx.getStorageSync("wx_gateway_session") as Record<string, unknown>;
    assert.equal(stored.appid, CARD_APPID);
    assert.equal(stored.openid, fakeOpenid(code, CARD_APPID));

    // The stored token is reused; the appid is read from the runtime once.
    const again = await card.client.request<Recorded>({ url: "/rec/whoami" });
    assert.equal(again.data.headers["x-appid"], CARD_APPID);
    assert.equal(card.wx.loginCalls, 1);
    assert.equal(card.wx.accountInfoCalls, 1);
  });

  test("two apps: the same union code gives both the same unionid, and each app has its own record", async () => {
    const code = "union-two-apps";
    const shop = setupApp(stack.multi.url, code, SHOP_APPID);
    const card = setupApp(stack.multi.url, code, CARD_APPID);
    const [ls, lc] = await Promise.all([shop.client.login(), card.client.login()]);
    assert.equal(ls.unionid, fakeUnionid(code));
    assert.equal(lc.unionid, fakeUnionid(code));
    assert.ok(ls.unionid, "a union code has a unionid");
    assert.equal(ls.openid, fakeOpenid(code));
    assert.equal(lc.openid, fakeOpenid(code, CARD_APPID));
    assert.equal(ls.appid, SHOP_APPID);
    assert.equal(lc.appid, CARD_APPID);

    // /auth/phone uses the token's app (its access token): the number lands on card's record only.
    const phone = await card.client.getPhoneNumber("phone-13600001111");
    assert.equal(phone.phone_number, "13600001111");
    assert.deepEqual(await card.client.me(), { openid: lc.openid, unionid: lc.unionid, phone_number: "13600001111" });
    assert.deepEqual(await shop.client.me(), { openid: ls.openid, unionid: ls.unionid, phone_number: null });

    // /auth/decrypt uses the token's app: card's session_key, a watermark naming card.
    const key = fakeSessionKey(code, CARD_APPID);
    const stamp = Math.floor(Date.now() / 1000);
    const mine = encryptLegacy(key, { stepInfoList: [{ step: 7 }], watermark: { appid: CARD_APPID, timestamp: stamp } });
    assert.deepEqual(await card.client.decrypt(mine.encryptedData, mine.iv), {
      stepInfoList: [{ step: 7 }],
      watermark: { appid: CARD_APPID, timestamp: stamp },
    });
    const shops = encryptLegacy(key, { stepInfoList: [], watermark: { appid: SHOP_APPID, timestamp: stamp } });
    const err = await expectGatewayError(card.client.decrypt(shops.encryptedData, shops.iv));
    assert.equal(err.code, "decrypt_failed");
    assert.equal(card.wx.loginCalls, 1);
  });

  test("the appid option overrides wx.getAccountInfoSync", async () => {
    const code = "override-user";
    const { wx, client } = setupApp(stack.multi.url, code, SHOP_APPID, { appid: CARD_APPID });
    assert.equal(client.appid, CARD_APPID);
    const res = await client.request<Recorded>({ url: "/rec/override" });
    assert.equal(res.data.headers["x-appid"], CARD_APPID);
    assert.equal(res.data.headers["x-openid"], fakeOpenid(code, CARD_APPID));
    assert.deepEqual(wx.loginBodies, [{ code, appid: CARD_APPID }]);
    assert.equal(wx.accountInfoCalls, 0, "the runtime is not even asked");
  });

  test("the login's appid picks the WeChat credentials: a code of card works for card only", async () => {
    // The fake accepts a code ending in @<appid> only with that app's credentials.
    const code = `only-card@${CARD_APPID}`;
    const card = setupApp(stack.multi.url, code, CARD_APPID);
    assert.equal((await card.client.login()).openid, fakeOpenid(code, CARD_APPID));
    const shop = setupApp(stack.multi.url, code, SHOP_APPID);
    const err = await expectGatewayError(shop.client.login());
    assert.equal(err.code, "invalid_code");
    assert.equal(err.wechatErrcode, 40029);
  });

  test("an unconfigured appid is a typed unknown_app error: never retried, nothing stored", async () => {
    const unknown = "wxnotconfigured000";
    const { wx, client } = setupApp(stack.multi.url, "unknown-app-user", unknown);
    const before = await loginsOk(stack.multi.url);
    const err = await expectGatewayError(client.login());
    assert.equal(err.code, "unknown_app");
    assert.equal(err.status, 400);
    assert.match(err.message, new RegExp(`appid ${unknown} \\(from wx\\.getAccountInfoSync\\(\\)\\)`));
    assert.match(err.requestId || "", /\S/);
    assert.equal(client.getToken(), null);
    assert.equal(wx.getStorageSync("wx_gateway_session"), "");

    // Through request(): the login error surfaces once, nothing reaches the upstream.
    const err2 = await expectGatewayError(client.request({ url: "/rec/never" }));
    assert.equal(err2.code, "unknown_app");
    assert.equal(wx.sentTo("/rec/never").length, 0);
    assert.equal(wx.authLoginPosts, 2, "one POST per call, no retry");
    assert.equal((await loginsOk(stack.multi.url)) - before, 0);

    // A one-app gateway checks a given appid too, here from the option.
    const single = setupApp(stack.main.url, "unknown-app-single", undefined, { appid: unknown });
    const err3 = await expectGatewayError(single.client.login());
    assert.equal(err3.code, "unknown_app");
    assert.match(err3.message, /\(from the appid option\)/);
  });

  test("without any appid, a two-app gateway answers bad_request, with a hint to pass the option", async () => {
    for (const accountInfo of [undefined, "throws"] as AccountInfo[]) {
      const { wx, client } = setupApp(stack.multi.url, "no-appid-user", accountInfo);
      assert.equal(client.appid, null);
      const err = await expectGatewayError(client.login());
      assert.equal(err.code, "bad_request");
      assert.equal(err.status, 400);
      assert.match(err.message, /pass the appid option/);
      assert.deepEqual(wx.loginBodies, [{ code: "no-appid-user" }]);
    }
  });

  test("a route limited to shop answers card's client with app_forbidden, and no re-login happens", async () => {
    const card = setupApp(stack.multi.url, "forbidden-user", CARD_APPID);
    const first = await card.client.login();
    const before = await loginsOk(stack.multi.url);
    const upstreamBefore = stack.recorder.count("/shop/orders");

    const err = await expectGatewayError(card.client.request({ url: "/shop/orders" }));
    assert.equal(err.code, "app_forbidden");
    assert.equal(err.status, 403);
    const res = await card.client.request({ url: "/shop/orders", throwHttpErrors: false });
    assert.equal(res.statusCode, 403);
    assert.equal(errorCodeOf(res.data), "app_forbidden");

    // A refused WebSocket handshake: a final close, not a reconnect.
    const socket = await card.client.connectSocket({ url: "/shop/ws" });
    const seen = watch(socket);
    await until(() => seen.closes.length === 1, "the refused handshake's close");
    assert.deepEqual(seen.reconnects, []);
    const [handshake] = card.wx.sent.filter((s) => s.kind === "socket");
    assert.equal(handshake.status, 403);
    assert.equal(handshake.error, "app_forbidden");

    assert.equal(card.wx.loginCalls, 1, "no wx.login after the 403s");
    assert.equal(card.wx.authLoginPosts, 1);
    assert.equal((await loginsOk(stack.multi.url)) - before, 0, "the gateway counted no login");
    assert.equal(stack.recorder.count("/shop/orders"), upstreamBefore, "nothing reached the upstream");
    // The token stays: it is good on the routes card may use.
    assert.equal(card.client.getToken(), first.token);
    const ok = await card.client.request<Recorded>({ url: "/rec/allowed" });
    assert.equal(ok.data.headers["x-appid"], CARD_APPID);
    assert.equal(card.wx.loginCalls, 1);

    // shop's client passes, by HTTP and by WebSocket.
    const shop = setupApp(stack.multi.url, "forbidden-user", SHOP_APPID);
    const mine = await shop.client.request<Recorded>({ url: "/shop/orders" });
    assert.equal(mine.data.headers["x-appid"], SHOP_APPID);
    assert.equal(mine.data.headers["x-openid"], fakeOpenid("forbidden-user"));
    const shopSocket = await shop.client.connectSocket({ url: "/shop/ws" });
    const shopSeen = watch(shopSocket);
    await until(() => shopSeen.messages.length === 1, "shop's socket hello");
    assert.equal(JSON.parse(shopSeen.messages[0]).appid, SHOP_APPID);
    shopSocket.close({ code: 1000 });
    await until(() => shopSeen.closes.length === 1, "the close");
  });

  test("a stored session of another app is not reused: the client logs in for its own", async () => {
    // Two clients sharing one wx storage key, e.g. after the appid option changed.
    const code = "switching-user";
    const wx = new WxShim(code, SHOP_APPID);
    shims.push(wx);
    const shopClient = createClient({ baseUrl: stack.multi.url, wx });
    const shopToken = (await shopClient.login()).token;
    const cardClient = createClient({ baseUrl: stack.multi.url, wx, appid: CARD_APPID });
    const res = await cardClient.request<Recorded>({ url: "/rec/switched" });
    assert.equal(res.data.headers["x-appid"], CARD_APPID);
    assert.equal(res.data.headers["x-openid"], fakeOpenid(code, CARD_APPID));
    assert.equal(wx.loginCalls, 2);
    assert.notEqual(cardClient.getToken(), shopToken);
    assert.deepEqual(
      wx.sentTo("/rec/switched").map((s) => s.header["Authorization"]),
      [`Bearer ${cardClient.getToken()}`],
      "shop's token was never sent for card",
    );
  });

  test("a one-app gateway: no getAccountInfoSync or a throwing one logs in without appid; the runtime's is sent", async () => {
    for (const accountInfo of [undefined, "throws"] as AccountInfo[]) {
      const code = `one-app-${accountInfo || "old-base-library"}`;
      const { wx, client } = setupApp(stack.main.url, code, accountInfo);
      const res = await client.request<Recorded>({ url: "/rec/one-app" });
      assert.equal(res.data.headers["x-openid"], fakeOpenid(code));
      assert.equal(res.data.headers["x-appid"], APPID, "the gateway names its one app");
      assert.deepEqual(wx.loginBodies, [{ code }], "no appid key at all");
      assert.equal((wx.getStorageSync("wx_gateway_session") as Record<string, unknown>).appid, null);
    }
    const { wx, client } = setupApp(stack.main.url, "one-app-runtime", APPID);
    const res = await client.request<Recorded>({ url: "/rec/one-app" });
    assert.equal(res.data.headers["x-openid"], fakeOpenid("one-app-runtime"));
    assert.deepEqual(wx.loginBodies, [{ code: "one-app-runtime", appid: APPID }]);
  });
});
