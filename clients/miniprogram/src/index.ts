/**
 * wx-gateway client for WeChat mini programs.
 *
 * No runtime dependencies: it only uses the `wx` object of the mini-program
 * runtime (wx.login, wx.request, wx.uploadFile, wx.connectSocket, the sync
 * storage calls and wx.getAccountInfoSync), which can also be passed in explicitly.
 *
 * Appid: a gateway may serve several mini programs (contract section 9), so
 * the login says which one it is for: the `appid` option, else
 * wx.getAccountInfoSync().miniProgram.appId, else none (a one-app gateway
 * needs none; base libraries before 2.2.2 lack getAccountInfoSync).
 *
 * Re-login semantics (see README.md):
 * - a token is obtained lazily (first call) or with `login()`, and kept in
 *   storage with its expiry; a token close to its expiry is replaced *before*
 *   it is used;
 * - a 401 whose `error` is one of `reloginOn` (default `token_expired`,
 *   `token_revoked`, `token_missing`) triggers ONE silent login, shared by every
 *   request that failed at the same time, and the request is retried ONCE; a
 *   second failure is returned to the caller, never retried again;
 * - `token_invalid` is not retried: the stored token is discarded (it can never
 *   become valid) and the error is returned; the next call logs in afresh.
 * - `unknown_app` (400, login) and `app_forbidden` (403, a route limited to
 *   other apps) are never retried: a new login for the same appid would be
 *   refused the same way.
 */

// ---------------------------------------------------------------------------
// The subset of the mini-program `wx` API this library uses.

export interface WxGeneralError {
  errMsg: string;
  errno?: number;
}

export interface WxRequestSuccess {
  data: unknown;
  statusCode: number;
  header: Record<string, string>;
}

export interface WxRequestOptions {
  url: string;
  method?: string;
  data?: unknown;
  header?: Record<string, string>;
  timeout?: number;
  dataType?: string;
  responseType?: string;
  success?: (res: WxRequestSuccess) => void;
  fail?: (err: WxGeneralError) => void;
}

export interface WxUploadFileSuccess {
  data: string;
  statusCode: number;
  header?: Record<string, string>;
}

export interface WxUploadFileOptions {
  url: string;
  filePath: string;
  name: string;
  header?: Record<string, string>;
  formData?: Record<string, unknown>;
  timeout?: number;
  success?: (res: WxUploadFileSuccess) => void;
  fail?: (err: WxGeneralError) => void;
}

export interface WxSocketTask {
  send(options: {
    data: string | ArrayBuffer;
    success?: () => void;
    fail?: (err: WxGeneralError) => void;
  }): void;
  close(options?: { code?: number; reason?: string }): void;
  onOpen(callback: (res: { header?: Record<string, string> }) => void): void;
  onMessage(callback: (res: { data: string | ArrayBuffer }) => void): void;
  onError(callback: (err: WxGeneralError) => void): void;
  onClose(callback: (res: { code: number; reason: string }) => void): void;
}

export interface WxConnectSocketOptions {
  url: string;
  header?: Record<string, string>;
  protocols?: string[];
  timeout?: number;
  success?: () => void;
  fail?: (err: WxGeneralError) => void;
}

/** What wx.getAccountInfoSync() returns (base library 2.2.2+). */
export interface WxAccountInfo {
  miniProgram: {
    appId: string;
    envVersion?: "develop" | "trial" | "release";
    version?: string;
  };
  plugin?: { appId: string; version: string };
}

export interface WxLike {
  login(options: {
    timeout?: number;
    success?: (res: { code: string }) => void;
    fail?: (err: WxGeneralError) => void;
  }): void;
  request(options: WxRequestOptions): unknown;
  uploadFile(options: WxUploadFileOptions): unknown;
  connectSocket(options: WxConnectSocketOptions): WxSocketTask;
  getStorageSync(key: string): unknown;
  setStorageSync(key: string, value: unknown): void;
  removeStorageSync(key: string): void;
  /** Missing on base libraries before 2.2.2; may throw where the runtime lacks it. */
  getAccountInfoSync?(): WxAccountInfo;
}

// ---------------------------------------------------------------------------
// Errors

/** Codes this library uses for failures that are not a gateway answer. */
export const CLIENT_ERROR_CODES = {
  /** wx.request / wx.uploadFile failed: no HTTP answer at all (status 0). */
  network: "network_error",
  /** wx.login failed or gave no code (status 0). */
  wxLogin: "wx_login_failed",
  /** An HTTP error whose body is not a JSON `{error, message}` object. */
  http: "http_error",
  /** A 2xx from /auth/* that does not have the documented shape. */
  badResponse: "bad_response",
} as const;

/**
 * Every failure of this library. `code` is the contract's `error` code
 * (`token_expired`, `invalid_code`, `upstream_timeout`, ...) or one of
 * {@link CLIENT_ERROR_CODES}.
 */
export class GatewayError extends Error {
  readonly code: string;
  /** HTTP status; 0 when there was no HTTP answer. */
  readonly status: number;
  /** The `X-Request-Id` of the answer (or the body's `request_id`), when known. */
  readonly requestId: string | null;
  /** WeChat's errcode, on errors caused by one. */
  readonly wechatErrcode: number | null;
  /** The parsed response body, when there was one. */
  readonly data: unknown;

  constructor(init: {
    code: string;
    message: string;
    status: number;
    requestId?: string | null;
    wechatErrcode?: number | null;
    data?: unknown;
  }) {
    super(init.message);
    this.name = "GatewayError";
    this.code = init.code;
    this.status = init.status;
    this.requestId = init.requestId == null ? null : init.requestId;
    this.wechatErrcode = init.wechatErrcode == null ? null : init.wechatErrcode;
    this.data = init.data;
  }
}

// ---------------------------------------------------------------------------
// Public types

export interface GatewayClientOptions {
  /** The gateway's base URL, e.g. `https://api.example.com` (no trailing path needed). */
  baseUrl: string;
  /**
   * The mini program's appid, sent on login. Default
   * `wx.getAccountInfoSync().miniProgram.appId`; when neither is available the
   * login carries no appid (enough for a gateway serving one mini program).
   */
  appid?: string;
  /** The `wx` object; defaults to the global `wx` of the mini-program runtime. */
  wx?: WxLike;
  /** The gateway's `token.header`. `Authorization` (default) sends `Bearer <token>`; any other name the bare token. */
  tokenHeader?: string;
  /** Storage key holding the session. Default `wx_gateway_session`. */
  storageKey?: string;
  /** 401 `error` codes that trigger one silent re-login and one retry. */
  reloginOn?: string[];
  /**
   * Seconds before the stored expiry at which a token is replaced before use
   * (capped at half the token's lifetime). Default 60.
   */
  refreshMargin?: number;
  /** Reject `request()` / `uploadFile()` on HTTP status >= 400. Default true. */
  throwHttpErrors?: boolean;
  /** Default timeout for wx calls, in ms (wx's own default when unset). */
  timeout?: number;
  /** WebSocket base URL; default `baseUrl` with http(s) replaced by ws(s). */
  socketUrl?: string;
  /** Clock in ms (tests). Default `Date.now`. */
  now?: () => number;
}

export interface StoredSession {
  token: string;
  /** ms since the epoch, by the client's clock (from `expires_in`). */
  expiresAt: number;
  /** when the token was obtained, ms since the epoch. */
  obtainedAt: number;
  openid: string;
  unionid: string | null;
  /** The appid the login was for; null when it was sent without one. */
  appid: string | null;
}

export interface LoginResult {
  token: string;
  tokenType: string;
  expiresIn: number;
  openid: string;
  unionid: string | null;
  /** The appid sent with the login; null when none was known. */
  appid: string | null;
}

export interface Me {
  openid: string;
  unionid: string | null;
  phone_number: string | null;
}

export interface PhoneNumber {
  phone_number: string;
  pure_phone_number: string;
  country_code: string;
}

export interface RequestOptions {
  /** A path on the gateway (`/api/orders?x=1`), or an absolute URL under `baseUrl`. */
  url: string;
  method?: string;
  data?: unknown;
  header?: Record<string, string>;
  timeout?: number;
  dataType?: string;
  responseType?: string;
  /** Overrides the client's `throwHttpErrors` for this call. */
  throwHttpErrors?: boolean;
  /** false: no silent re-login/retry for this call. Default true. */
  relogin?: boolean;
}

export interface Response<T = unknown> {
  statusCode: number;
  data: T;
  header: Record<string, string>;
  /** The `X-Request-Id` the gateway returned, if any. */
  requestId: string | null;
}

export interface UploadOptions {
  url: string;
  filePath: string;
  name: string;
  formData?: Record<string, unknown>;
  header?: Record<string, string>;
  timeout?: number;
  throwHttpErrors?: boolean;
  relogin?: boolean;
}

export interface UploadResponse {
  statusCode: number;
  /** wx.uploadFile gives the body as a string. */
  data: string;
  header: Record<string, string>;
  requestId: string | null;
}

export interface SocketOptions {
  url: string;
  header?: Record<string, string>;
  protocols?: string[];
  timeout?: number;
  /**
   * Reconnect with a fresh token when the gateway closes the socket with 1008
   * (policy violation: the token expired or was revoked). Default true.
   */
  reconnect?: boolean;
}

/** The close code the gateway sends when a socket's token expired or was revoked. */
export const POLICY_VIOLATION = 1008;
/** Reconnects in a row (without a message received in between) before giving up. */
export const MAX_SOCKET_RECONNECTS = 3;

/**
 * What `connectSocket()` returns: a `SocketTask` that survives the end of its
 * token. When the gateway closes it with 1008 (token expired or revoked), it
 * logs in again, opens a new socket with the fresh token and keeps every
 * listener: `onOpen` runs again (resubscribe there), `onReconnect` tells why,
 * and `onClose` only runs for the final close.
 */
export interface GatewaySocket extends WxSocketTask {
  onReconnect(callback: (res: { code: number; reason: string }) => void): void;
}

export const DEFAULT_RELOGIN_ON: readonly string[] = ["token_expired", "token_revoked", "token_missing"];

// ---------------------------------------------------------------------------
// Helpers

function headerValue(header: Record<string, string> | undefined, name: string): string | null {
  if (!header) return null;
  const wanted = name.toLowerCase();
  for (const key of Object.keys(header)) {
    if (key.toLowerCase() === wanted) {
      const value = header[key];
      return value == null ? null : String(value);
    }
  }
  return null;
}

function asObject(data: unknown): Record<string, unknown> | null {
  if (typeof data === "string") {
    try {
      data = JSON.parse(data);
    } catch (_) {
      return null;
    }
  }
  if (data !== null && typeof data === "object" && !Array.isArray(data)) {
    return data as Record<string, unknown>;
  }
  return null;
}

/** The contract's `error` code of a response body, or null. */
export function errorCodeOf(data: unknown): string | null {
  const body = asObject(data);
  return body && typeof body.error === "string" ? body.error : null;
}

function errorFrom(status: number, data: unknown, header: Record<string, string> | undefined): GatewayError {
  const body = asObject(data);
  const requestId =
    headerValue(header, "X-Request-Id") || (body && typeof body.request_id === "string" ? body.request_id : null);
  if (body && typeof body.error === "string") {
    return new GatewayError({
      code: body.error,
      message: typeof body.message === "string" ? body.message : body.error,
      status,
      requestId,
      wechatErrcode: typeof body.wechat_errcode === "number" ? body.wechat_errcode : null,
      data: body,
    });
  }
  return new GatewayError({
    code: CLIENT_ERROR_CODES.http,
    message: `HTTP ${status}`,
    status,
    requestId,
    data,
  });
}

function wxFailure(code: string, err: WxGeneralError | undefined): GatewayError {
  return new GatewayError({ code, message: (err && err.errMsg) || code, status: 0 });
}

// The mini-program runtime injects `wx` into every module's scope.
declare const wx: WxLike | undefined;

function globalWx(): WxLike | undefined {
  if (typeof wx !== "undefined" && wx) return wx;
  const scope = (typeof globalThis !== "undefined" ? globalThis : {}) as { wx?: WxLike };
  return scope.wx;
}

interface RawAnswer {
  statusCode: number;
  data: unknown;
  header: Record<string, string>;
}

// ---------------------------------------------------------------------------
// The client

export class GatewayClient {
  readonly baseUrl: string;
  readonly tokenHeader: string;
  readonly storageKey: string;
  private readonly options: GatewayClientOptions;
  private readonly reloginOn: Set<string>;
  private readonly now: () => number;
  private inflight: Promise<LoginResult> | null = null;
  /** Bumped by logout(), so a login that was in flight does not store its token afterwards. */
  private epoch = 0;
  /** Open sockets: logout() closes them (they must not log in again by themselves). */
  private readonly sockets = new Set<ReconnectingSocket>();
  /** The resolved appid (see `appid`); unset until first needed, since `wx` may come later. */
  private appidOf: { value: string | null } | null = null;

  constructor(options: GatewayClientOptions) {
    if (!options || typeof options.baseUrl !== "string" || !/^https?:\/\//.test(options.baseUrl)) {
      throw new TypeError("GatewayClient: baseUrl must be an http(s) URL");
    }
    this.options = options;
    this.baseUrl = options.baseUrl.replace(/\/+$/, "");
    this.tokenHeader = options.tokenHeader || "Authorization";
    this.storageKey = options.storageKey || "wx_gateway_session";
    this.reloginOn = new Set(options.reloginOn || DEFAULT_RELOGIN_ON);
    this.now = options.now || (() => Date.now());
  }

  private get wx(): WxLike {
    const wx = this.options.wx || globalWx();
    if (!wx) throw new TypeError("GatewayClient: no `wx` object (pass options.wx outside a mini program)");
    return wx;
  }

  /**
   * The appid logins are for: the `appid` option, else the runtime's
   * `wx.getAccountInfoSync().miniProgram.appId`, else null (no appid sent).
   * Resolved once: a running mini program does not change its appid.
   */
  get appid(): string | null {
    if (this.appidOf === null) this.appidOf = { value: this.options.appid || this.runtimeAppid() };
    return this.appidOf.value;
  }

  private runtimeAppid(): string | null {
    const wx = this.wx;
    if (typeof wx.getAccountInfoSync !== "function") return null;
    try {
      const appId = wx.getAccountInfoSync().miniProgram.appId;
      return typeof appId === "string" && appId ? appId : null;
    } catch (_) {
      // Some runtimes declare the API but throw (old base library, dev tools'
      // tourist mode): log in without an appid, as before appids existed.
      return null;
    }
  }

  // ----- session storage ---------------------------------------------------

  /** The stored session, or null (wx.getStorageSync answers "" for a missing key). */
  getSession(): StoredSession | null {
    let value: unknown;
    try {
      value = this.wx.getStorageSync(this.storageKey);
    } catch (_) {
      return null;
    }
    const s = asObject(value);
    if (!s || typeof s.token !== "string" || !s.token || typeof s.expiresAt !== "number") return null;
    return {
      token: s.token,
      expiresAt: s.expiresAt,
      obtainedAt: typeof s.obtainedAt === "number" ? s.obtainedAt : s.expiresAt,
      openid: typeof s.openid === "string" ? s.openid : "",
      unionid: typeof s.unionid === "string" ? s.unionid : null,
      // Sessions stored before appids existed have none: they belong to the default app.
      appid: typeof s.appid === "string" ? s.appid : null,
    };
  }

  /** The stored token, or null; does not log in. */
  getToken(): string | null {
    const s = this.getSession();
    return s ? s.token : null;
  }

  /** Forget the stored session locally (no call to the gateway). */
  clearSession(): void {
    try {
      this.wx.removeStorageSync(this.storageKey);
    } catch (_) {
      // nothing stored
    }
  }

  private isStale(s: StoredSession): boolean {
    const lifetime = Math.max(0, s.expiresAt - s.obtainedAt);
    const margin = Math.min((this.options.refreshMargin == null ? 60 : this.options.refreshMargin) * 1000, lifetime / 2);
    return this.now() >= s.expiresAt - margin;
  }

  /**
   * A stored session this client may send: fresh, and not another app's. Why
   * the app check: with the `appid` option changed (or two clients sharing a
   * storage key), the stored token is another mini program's, which the
   * gateway would take as that app's user or refuse with app_forbidden.
   */
  private usable(s: StoredSession | null): s is StoredSession {
    if (!s || this.isStale(s)) return false;
    const appid = this.appid;
    return s.appid === null || appid === null || s.appid === appid;
  }

  /** `header` plus the token header (replacing any same-named one, whatever its case). */
  private withTokenHeader(header: Record<string, string> | undefined, token: string | null): Record<string, string> {
    const out: Record<string, string> = {};
    const own = this.tokenHeader.toLowerCase();
    for (const key of Object.keys(header || {})) {
      if (key.toLowerCase() !== own) out[key] = (header as Record<string, string>)[key];
    }
    return { ...out, ...this.tokenHeaders(token) };
  }

  private tokenHeaders(token: string | null): Record<string, string> {
    if (!token) return {};
    const value = this.tokenHeader.toLowerCase() === "authorization" ? `Bearer ${token}` : token;
    return { [this.tokenHeader]: value };
  }

  private url(path: string): string {
    if (/^[a-z][a-z0-9+.-]*:/i.test(path) || path.startsWith("//")) {
      // An absolute URL: the token only ever goes to the gateway.
      if (path === this.baseUrl || path.startsWith(this.baseUrl + "/") || path.startsWith(this.baseUrl + "?")) {
        return path;
      }
      throw new TypeError(`GatewayClient: ${path} is not under ${this.baseUrl}; the token is not sent elsewhere`);
    }
    return this.baseUrl + (path.startsWith("/") ? path : "/" + path);
  }

  // ----- wx calls as promises ---------------------------------------------

  private wxLogin(): Promise<string> {
    return new Promise((resolve, reject) => {
      this.wx.login({
        timeout: this.options.timeout,
        success: (res) => {
          if (res && typeof res.code === "string" && res.code) resolve(res.code);
          else reject(wxFailure(CLIENT_ERROR_CODES.wxLogin, { errMsg: "wx.login gave no code" }));
        },
        fail: (err) => reject(wxFailure(CLIENT_ERROR_CODES.wxLogin, err)),
      });
    });
  }

  private send(options: WxRequestOptions): Promise<RawAnswer> {
    return new Promise((resolve, reject) => {
      this.wx.request({
        ...options,
        success: (res) => resolve({ statusCode: res.statusCode, data: res.data, header: res.header || {} }),
        fail: (err) => reject(wxFailure(CLIENT_ERROR_CODES.network, err)),
      });
    });
  }

  private sendUpload(options: WxUploadFileOptions): Promise<RawAnswer> {
    return new Promise((resolve, reject) => {
      this.wx.uploadFile({
        ...options,
        success: (res) => resolve({ statusCode: res.statusCode, data: res.data, header: res.header || {} }),
        fail: (err) => reject(wxFailure(CLIENT_ERROR_CODES.network, err)),
      });
    });
  }

  // ----- login -------------------------------------------------------------

  /**
   * Log in: wx.login, then POST /auth/login {code}; stores the token. While a
   * login is in flight, every caller shares it (one wx.login, one POST).
   */
  login(): Promise<LoginResult> {
    if (!this.inflight) {
      const flight = this.doLogin();
      this.inflight = flight;
      const done = () => {
        if (this.inflight === flight) this.inflight = null;
      };
      flight.then(done, done);
    }
    return this.inflight;
  }

  private async doLogin(): Promise<LoginResult> {
    const epoch = this.epoch;
    const appid = this.appid;
    const code = await this.wxLogin();
    const started = this.now();
    const res = await this.send({
      url: this.url("/auth/login"),
      method: "POST",
      // Without an appid the body is the one-app form, as before appids existed.
      data: appid === null ? { code } : { code, appid },
      header: { "Content-Type": "application/json" },
      timeout: this.options.timeout,
    });
    if (res.statusCode !== 200) throw this.loginError(errorFrom(res.statusCode, res.data, res.header), appid);
    const body = asObject(res.data);
    if (!body || typeof body.token !== "string" || !body.token || typeof body.openid !== "string") {
      throw new GatewayError({
        code: CLIENT_ERROR_CODES.badResponse,
        message: "/auth/login answered without a token",
        status: res.statusCode,
        requestId: headerValue(res.header, "X-Request-Id"),
        data: res.data,
      });
    }
    const expiresIn = typeof body.expires_in === "number" ? body.expires_in : 0;
    const result: LoginResult = {
      token: body.token,
      tokenType: typeof body.token_type === "string" ? body.token_type : "Bearer",
      expiresIn,
      openid: body.openid,
      unionid: typeof body.unionid === "string" ? body.unionid : null,
      appid,
    };
    if (epoch === this.epoch) {
      const session: StoredSession = {
        token: result.token,
        // Counted from when the request was sent, so the local expiry is never late.
        expiresAt: started + expiresIn * 1000,
        obtainedAt: started,
        openid: result.openid,
        unionid: result.unionid,
        appid,
      };
      this.wx.setStorageSync(this.storageKey, session);
    }
    return result;
  }

  /**
   * A login refusal about the appid, with the appid and where it came from in
   * the message: the gateway's own message cannot say which one the client sent.
   */
  private loginError(err: GatewayError, appid: string | null): GatewayError {
    let hint: string;
    if (err.code === "unknown_app") {
      const from = this.options.appid ? "the appid option" : "wx.getAccountInfoSync()";
      hint = `appid ${appid} (from ${from}) is not configured on the gateway (wechat.apps)`;
    } else if (err.code === "bad_request" && appid === null && /appid/i.test(err.message)) {
      hint = "no appid was sent (no appid option, no wx.getAccountInfoSync()): pass the appid option";
    } else {
      return err;
    }
    return new GatewayError({
      code: err.code,
      message: `${err.message} ${hint}`,
      status: err.status,
      requestId: err.requestId,
      wechatErrcode: err.wechatErrcode,
      data: err.data,
    });
  }

  /** A usable token: the stored one unless missing or about to expire. */
  private async ensureToken(): Promise<string> {
    const s = this.getSession();
    if (this.usable(s)) return s.token;
    return (await this.login()).token;
  }

  /**
   * The token to retry with after `failed` was refused: if another request
   * already replaced it, that one; else one shared login.
   */
  private async tokenAfterFailure(failed: string | null): Promise<string> {
    const s = this.getSession();
    if (this.usable(s) && s.token !== failed) return s.token;
    return (await this.login()).token;
  }

  /**
   * Send with the token; on a 401 in `reloginOn`, one shared login and one
   * retry. `token_invalid` drops the stored token (it can never become valid).
   * Anything else, 403 `app_forbidden` included, goes back as it is: a fresh
   * token of the same app would be refused the same way.
   */
  private async withToken(call: (token: string | null) => Promise<RawAnswer>, relogin: boolean): Promise<RawAnswer> {
    let token = relogin ? await this.ensureToken() : this.getToken();
    let res = await call(token);
    if (res.statusCode === 401) {
      let code = errorCodeOf(res.data);
      if (relogin && code !== null && this.reloginOn.has(code)) {
        token = await this.tokenAfterFailure(token);
        res = await call(token);
        code = res.statusCode === 401 ? errorCodeOf(res.data) : null;
      }
      if (code === "token_invalid") this.dropIfCurrent(token);
    }
    return res;
  }

  private dropIfCurrent(token: string | null): void {
    const s = this.getSession();
    if (s && token && s.token === token) this.clearSession();
  }

  private async gatewayCall<T>(
    path: string,
    method: string,
    body: unknown,
    relogin: boolean,
  ): Promise<T> {
    const res = await this.withToken(
      (token) =>
        this.send({
          url: this.url(path),
          method,
          data: body,
          header: { ...this.tokenHeaders(token), "Content-Type": "application/json" },
          timeout: this.options.timeout,
        }),
      relogin,
    );
    if (res.statusCode < 200 || res.statusCode >= 300) throw errorFrom(res.statusCode, res.data, res.header);
    const parsed = asObject(res.data);
    if (!parsed) {
      throw new GatewayError({
        code: CLIENT_ERROR_CODES.badResponse,
        message: `${path} answered a body that is not a JSON object`,
        status: res.statusCode,
        requestId: headerValue(res.header, "X-Request-Id"),
        data: res.data,
      });
    }
    return parsed as unknown as T;
  }

  // ----- requests ----------------------------------------------------------

  /**
   * wx.request to the gateway with the token header, silent re-login once.
   * Resolves with the response; with `throwHttpErrors` (default) rejects with
   * a GatewayError on status >= 400.
   */
  async request<T = unknown>(options: RequestOptions): Promise<Response<T>> {
    const url = this.url(options.url);
    const res = await this.withToken(
      (token) =>
        this.send({
          url,
          method: options.method || "GET",
          data: options.data,
          header: this.withTokenHeader(options.header, token),
          timeout: options.timeout == null ? this.options.timeout : options.timeout,
          dataType: options.dataType,
          responseType: options.responseType,
        }),
      options.relogin !== false,
    );
    return this.finish(res, options.throwHttpErrors) as Response<T>;
  }

  /** wx.uploadFile (multipart) to the gateway with the token header, silent re-login once. */
  async uploadFile(options: UploadOptions): Promise<UploadResponse> {
    const url = this.url(options.url);
    const res = await this.withToken(
      (token) =>
        this.sendUpload({
          url,
          filePath: options.filePath,
          name: options.name,
          formData: options.formData,
          header: this.withTokenHeader(options.header, token),
          timeout: options.timeout == null ? this.options.timeout : options.timeout,
        }),
      options.relogin !== false,
    );
    const done = this.finish(res, options.throwHttpErrors);
    return { ...done, data: typeof res.data === "string" ? res.data : JSON.stringify(res.data) };
  }

  private finish(res: RawAnswer, throwHttpErrors: boolean | undefined): Response {
    const shouldThrow = throwHttpErrors == null ? this.options.throwHttpErrors !== false : throwHttpErrors;
    if (shouldThrow && res.statusCode >= 400) throw errorFrom(res.statusCode, res.data, res.header);
    return {
      statusCode: res.statusCode,
      data: res.data,
      header: res.header,
      requestId: headerValue(res.header, "X-Request-Id"),
    };
  }

  /**
   * wx.connectSocket to the gateway (ws:// or wss://) with the token header.
   * The token is refreshed first if missing or about to expire; a refused
   * handshake is not retried (wx reports no status for it). The gateway
   * closes a socket with 1008 when its token expires or is revoked: the
   * returned socket then logs in again and reconnects (see GatewaySocket;
   * `reconnect: false` turns that off).
   */
  async connectSocket(options: SocketOptions): Promise<GatewaySocket> {
    if (/^[a-z][a-z0-9+.-]*:/i.test(options.url) || options.url.startsWith("//")) {
      throw new TypeError("GatewayClient.connectSocket: pass a path; the token is only sent to the gateway");
    }
    const token = await this.ensureToken();
    const socket = new ReconnectingSocket(
      (failed: string | null) => this.reopenSocket(options, failed),
      options.reconnect !== false,
      (s) => this.sockets.delete(s),
      (failed) => this.dropIfCurrent(failed),
    );
    this.sockets.add(socket);
    socket.start(this.openTask(options, token), token);
    return socket;
  }

  /** After a 1008: a task with a token other than `failed` (a new login unless another call made one). */
  private async reopenSocket(options: SocketOptions, failed: string | null): Promise<{ task: WxSocketTask; token: string }> {
    this.dropIfCurrent(failed);
    const token = await this.tokenAfterFailure(failed);
    return { task: this.openTask(options, token), token };
  }

  private openTask(options: SocketOptions, token: string): WxSocketTask {
    const base = (this.options.socketUrl || this.baseUrl.replace(/^http/, "ws")).replace(/\/+$/, "");
    const path = options.url.startsWith("/") ? options.url : "/" + options.url;
    return this.wx.connectSocket({
      url: base + path,
      header: this.withTokenHeader(options.header, token),
      protocols: options.protocols,
      timeout: options.timeout == null ? this.options.timeout : options.timeout,
    });
  }

  // ----- the gateway's own endpoints --------------------------------------

  /** GET /auth/me. */
  me(): Promise<Me> {
    return this.gatewayCall<Me>("/auth/me", "GET", undefined, true);
  }

  /** POST /auth/phone with a `getPhoneNumber` button code (the current API). */
  getPhoneNumber(code: string): Promise<PhoneNumber> {
    return this.gatewayCall<PhoneNumber>("/auth/phone", "POST", { code }, true);
  }

  /**
   * POST /auth/phone with the legacy `encryptedData`/`iv`. They are encrypted
   * with the session_key of the last login, so this never logs in again (a new
   * login would change that key): on a 401, redo the button flow.
   */
  getPhoneNumberLegacy(encryptedData: string, iv: string): Promise<PhoneNumber> {
    return this.gatewayCall<PhoneNumber>("/auth/phone", "POST", { encrypted_data: encryptedData, iv }, false);
  }

  /** POST /auth/decrypt (legacy open data, e.g. wx.getWeRunData); never logs in again, as above. */
  async decrypt<T = Record<string, unknown>>(encryptedData: string, iv: string): Promise<T> {
    const body = await this.gatewayCall<{ data: T }>(
      "/auth/decrypt",
      "POST",
      { encrypted_data: encryptedData, iv },
      false,
    );
    return body.data;
  }

  /**
   * POST /auth/logout with the stored token, then clear storage. Storage is
   * cleared whatever happens; a 401 (token already unusable) counts as done;
   * other failures (network, 5xx) reject after clearing, since the token may
   * still be valid on the server until it expires.
   */
  async logout(): Promise<void> {
    this.epoch += 1;
    for (const socket of [...this.sockets]) socket.close({ code: 1000, reason: "logout" });
    const token = this.getToken();
    this.clearSession();
    if (!token) return;
    const res = await this.send({
      url: this.url("/auth/logout"),
      method: "POST",
      header: { ...this.tokenHeaders(token), "Content-Type": "application/json" },
      timeout: this.options.timeout,
    });
    if (res.statusCode === 200 || res.statusCode === 401) return;
    throw errorFrom(res.statusCode, res.data, res.header);
  }
}

type Listeners = {
  open: ((res: { header?: Record<string, string> }) => void)[];
  message: ((res: { data: string | ArrayBuffer }) => void)[];
  error: ((err: WxGeneralError) => void)[];
  close: ((res: { code: number; reason: string }) => void)[];
  reconnect: ((res: { code: number; reason: string }) => void)[];
};

/** A SocketTask that replaces itself after a 1008 close (see GatewaySocket). */
class ReconnectingSocket implements GatewaySocket {
  private task: WxSocketTask | null = null;
  private token: string | null = null;
  private closedByUser = false;
  private finished = false;
  private reconnects = 0;
  private readonly listeners: Listeners = { open: [], message: [], error: [], close: [], reconnect: [] };

  constructor(
    private readonly open: (failed: string | null) => Promise<{ task: WxSocketTask; token: string }>,
    private readonly reconnect: boolean,
    private readonly onFinished: (socket: ReconnectingSocket) => void,
    private readonly forget: (token: string | null) => void,
  ) {}

  start(task: WxSocketTask, token: string): void {
    this.task = task;
    this.token = token;
    // Events of a task this socket replaced are ignored.
    const current = () => this.task === task;
    task.onOpen((res) => {
      if (current()) for (const cb of this.listeners.open) cb(res);
    });
    task.onMessage((res) => {
      if (!current()) return;
      this.reconnects = 0; // the socket works: the next 1008 may reconnect again
      for (const cb of this.listeners.message) cb(res);
    });
    task.onError((err) => {
      if (current()) for (const cb of this.listeners.error) cb(err);
    });
    task.onClose((res) => {
      if (current()) this.closed(res);
    });
  }

  private closed(res: { code: number; reason: string }): void {
    const again =
      res.code === POLICY_VIOLATION &&
      this.reconnect &&
      !this.closedByUser &&
      this.reconnects < MAX_SOCKET_RECONNECTS;
    if (!again) {
      // A 1008 means the gateway will not take this token again, reconnecting or not.
      if (res.code === POLICY_VIOLATION) this.forget(this.token);
      this.finish(res);
      return;
    }
    this.reconnects += 1;
    this.task = null;
    for (const cb of this.listeners.reconnect) cb(res);
    this.open(this.token).then(
      ({ task, token }) => {
        if (this.closedByUser) {
          task.close({ code: 1000 });
          this.finish({ code: 1000, reason: "closed" });
        } else {
          this.start(task, token);
        }
      },
      (err: unknown) => {
        // No new token (login failed): the socket ends with the gateway's close.
        const errMsg = err instanceof Error ? err.message : String(err);
        for (const cb of this.listeners.error) cb({ errMsg: `connectSocket:fail ${errMsg}` });
        this.finish(res);
      },
    );
  }

  private finish(res: { code: number; reason: string }): void {
    if (this.finished) return;
    this.finished = true;
    this.onFinished(this);
    for (const cb of this.listeners.close) cb(res);
  }

  send(options: { data: string | ArrayBuffer; success?: () => void; fail?: (err: WxGeneralError) => void }): void {
    if (this.task === null) {
      options.fail?.({ errMsg: "sendSocketMessage:fail reconnecting" });
      return;
    }
    this.task.send(options);
  }

  close(options?: { code?: number; reason?: string }): void {
    this.closedByUser = true;
    if (this.task !== null) this.task.close(options);
  }

  onOpen(callback: (res: { header?: Record<string, string> }) => void): void {
    this.listeners.open.push(callback);
  }
  onMessage(callback: (res: { data: string | ArrayBuffer }) => void): void {
    this.listeners.message.push(callback);
  }
  onError(callback: (err: WxGeneralError) => void): void {
    this.listeners.error.push(callback);
  }
  onClose(callback: (res: { code: number; reason: string }) => void): void {
    this.listeners.close.push(callback);
  }
  onReconnect(callback: (res: { code: number; reason: string }) => void): void {
    this.listeners.reconnect.push(callback);
  }
}

/** `new GatewayClient(options)`. */
export function createClient(options: GatewayClientOptions): GatewayClient {
  return new GatewayClient(options);
}
