// An upstream that believes only what wx-gateway signed (contract section 11).
//
// Every request the gateway forwards with an identity carries an ES256 JWT in
// X-Gateway-Assertion. This server checks it against the gateway's public keys
// (/.well-known/jwks.json) with jose's createRemoteJWKSet and jwtVerify, and
// answers 200 with the verified claims, or 401 with a reason. `verify` is the
// part to copy into an Express or Fastify app (../README.md, and
// docs/upstream-guides.md for other frameworks).
//
//   npm ci
//   node verify-upstream.mjs --jwks-url http://127.0.0.1:8080/.well-known/jwks.json \
//       --audience /api/ --port 9000
//
// Every option also reads an environment variable (JWKS_URL, AUDIENCE, ISSUER,
// HOST, PORT, LEEWAY, ASSERTION_HEADER); an argument wins. --port 0 picks a
// free port; the first line on stdout names it. Node 20 or newer, plain ESM.

import { createServer } from 'node:http';
import { parseArgs } from 'node:util';
import { createRemoteJWKSet, jwtVerify } from 'jose';

// The gateway signs ES256 only. Naming the algorithm here, never taking it
// from the token, is what refuses `alg: none` and an HS256 token whose HMAC key
// is the (public) EC key.
const ALGORITHMS = ['ES256'];
// `iss` and `aud` are required by the issuer and audience options; `unionid`
// is optional (only when known).
const REQUIRED_CLAIMS = ['sub', 'appid', 'iat', 'exp'];
// The gateway serves its JWKS with `Cache-Control: max-age=300`: caching longer
// would keep trusting a key the gateway has removed (after a leak, say).
const JWKS_MAX_AGE_MS = 300_000;

class Refused extends Error {
  // `reason` is one word (the Python example answers the same ones): missing,
  // malformed, unknown_key, algorithm, signature, expired, not_yet_valid,
  // audience, issuer, claims, keys_unavailable.
  constructor(reason, message, status = 401) {
    super(message);
    this.reason = reason;
    this.status = status;
  }
}

const CLAIM_REASONS = { aud: 'audience', iss: 'issuer', iat: 'not_yet_valid', nbf: 'not_yet_valid' };

function reasonOf(err) {
  switch (err.code) {
    case 'ERR_JWT_EXPIRED':
      return 'expired';
    case 'ERR_JWT_CLAIM_VALIDATION_FAILED':
      // A required claim that is absent is `missing`, whichever claim it is.
      return err.reason === 'missing' ? 'claims' : (CLAIM_REASONS[err.claim] ?? 'claims');
    case 'ERR_JOSE_ALG_NOT_ALLOWED':
    case 'ERR_JOSE_NOT_SUPPORTED':
      return 'algorithm';
    case 'ERR_JWS_SIGNATURE_VERIFICATION_FAILED':
      return 'signature';
    case 'ERR_JWKS_NO_MATCHING_KEY':
    case 'ERR_JWKS_MULTIPLE_MATCHING_KEYS':
      return 'unknown_key';
    case 'ERR_JWS_INVALID':
    case 'ERR_JWT_INVALID':
      return 'malformed';
    default:
      return null; // not a verdict on the token: see verify()
  }
}

// A verifier for assertions meant for one route (`audience`: its prefix).
function makeVerifier({ jwksUrl, audience, issuer, leeway }) {
  // One key set for the process: it caches the keys and refetches them when a
  // token names a kid it does not know (a key being rotated in).
  const keys = createRemoteJWKSet(new URL(jwksUrl), {
    cacheMaxAge: JWKS_MAX_AGE_MS,
    timeoutDuration: 5000,
  });
  return async function verify(token) {
    try {
      const { payload } = await jwtVerify(token, keys, {
        algorithms: ALGORITHMS,
        audience, // an assertion for another route is refused
        issuer,
        requiredClaims: REQUIRED_CLAIMS,
        clockTolerance: leeway, // clock skew between the gateway and this host, seconds
      });
      return payload;
    } catch (err) {
      const reason = reasonOf(err);
      if (reason) throw new Refused(reason, err.message);
      // The JWKS could not be fetched (timeout, refused, not JSON): the token
      // was not judged, so say so rather than call it invalid.
      throw new Refused('keys_unavailable', `cannot fetch the JWKS: ${err.message}`, 503);
    }
  };
}

function answer(res, status, body) {
  const data = JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': 'application/json',
    'Content-Length': Buffer.byteLength(data),
  });
  res.end(data);
}

function makeServer(verify, header) {
  const name = header.toLowerCase();
  return createServer(async (req, res) => {
    // Node joins repeated headers with ", "; read them apart, and refuse two
    // assertions rather than pick one (a proxy might pick the other).
    const values = [];
    for (let i = 0; i < req.rawHeaders.length; i += 2) {
      if (req.rawHeaders[i].toLowerCase() === name) values.push(req.rawHeaders[i + 1]);
    }
    try {
      if (values.length !== 1) {
        throw new Refused('missing', `expected one ${header} header, got ${values.length}`);
      }
      const claims = await verify(values[0]);
      // The identity comes from the verified claims, not from X-OpenId.
      answer(res, 200, { claims, path: req.url });
    } catch (err) {
      if (!(err instanceof Refused)) {
        console.error(`error on ${req.method} ${req.url}: ${err.stack}`);
        answer(res, 500, { error: 'internal', message: 'the upstream failed' });
        return;
      }
      // The reason, never the token: it is a credential until it expires.
      console.error(`refused ${req.method} ${req.url}: ${err.reason}`);
      answer(res, err.status, { error: 'assertion_refused', reason: err.reason, message: err.message });
    }
  });
}

function options() {
  const env = process.env;
  const { values } = parseArgs({
    options: {
      'jwks-url': { type: 'string', default: env.JWKS_URL },
      audience: { type: 'string', default: env.AUDIENCE },
      issuer: { type: 'string', default: env.ISSUER ?? 'wx-gateway' },
      host: { type: 'string', default: env.HOST ?? '127.0.0.1' },
      port: { type: 'string', default: env.PORT ?? '9000' },
      leeway: { type: 'string', default: env.LEEWAY ?? '5' },
      header: { type: 'string', default: env.ASSERTION_HEADER ?? 'X-Gateway-Assertion' },
    },
  });
  if (!values['jwks-url'] || !values.audience) {
    console.error('--jwks-url (JWKS_URL) and --audience (AUDIENCE) are required');
    process.exit(2);
  }
  return values;
}

function main() {
  const opts = options();
  const verify = makeVerifier({
    jwksUrl: opts['jwks-url'],
    audience: opts.audience,
    issuer: opts.issuer,
    leeway: Number(opts.leeway),
  });
  const server = makeServer(verify, opts.header);
  server.listen(Number(opts.port), opts.host, () => {
    const { address, port } = server.address();
    console.log(`listening on http://${address}:${port} for audience ${opts.audience}`);
  });
}

main();
