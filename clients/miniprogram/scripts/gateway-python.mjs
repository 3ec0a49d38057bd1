// Runs before `npm test` (the `pretest` script): the suite starts the real gateway
// with Python, so make sure there is a Python that has it installed.
//
// - GATEWAY_PYTHON set (tests/e2e/test_miniprogram_client.py sets it to pytest's own
//   interpreter): only check that it can import the gateway and its dependencies.
// - Otherwise the repository's .venv, as ./scripts/demo makes it: created with
//   $PYTHON (default python3) when missing, and `pip install -e .` run when
//   pyproject.toml changed since the last install. The stamp file is the one
//   ./scripts/demo writes, so neither reinstalls after the other.
//
// On failure it prints one line saying what to run first and exits 1, so no test
// starts only to be cancelled by "No module named 'aiohttp'".
import { spawnSync } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
const VENV = join(REPO, ".venv");
const VENV_PYTHON = join(VENV, "bin", "python");
const STAMP = join(VENV, ".wx-gateway-installed");
const FIRST = "or run ./scripts/demo at the repository root first (it makes .venv the same way)";
// Run in the repository (as the harness runs `python -m gateway`), so `gateway` is
// this checkout's; aiohttp stands for the dependencies pip installs with it. A failed
// import names the missing module.
const PROBE = "import aiohttp, gateway";

function fail(message) {
  console.error(`wx-gateway-miniprogram: ${message}`);
  process.exit(1);
}

function run(command, args, options = {}) {
  const done = spawnSync(command, args, { cwd: REPO, encoding: "utf8", ...options });
  if (done.error) {
    return { ok: false, why: done.error.code === "ENOENT" ? "not found" : done.error.message };
  }
  // The last line: Python's exception, or venv's "ensurepip is not available" (stdout).
  const lines = `${done.stderr || done.stdout || ""}`.trim().split("\n");
  return { ok: done.status === 0, why: lines[lines.length - 1] || `exit status ${done.status}` };
}

function pyprojectHash() {
  return createHash("sha256").update(readFileSync(join(REPO, "pyproject.toml"))).digest("hex");
}

function checkGivenPython(python) {
  const probe = run(python, ["-c", PROBE]);
  if (!probe.ok) {
    fail(
      `GATEWAY_PYTHON=${python} cannot run the gateway (${probe.why}): ` +
        `install it there (pip install -e ${REPO}) or unset GATEWAY_PYTHON`,
    );
  }
}

function ensureVenv() {
  if (!existsSync(VENV_PYTHON)) {
    const python = process.env.PYTHON || "python3";
    const fresh = !existsSync(VENV);
    console.error(`wx-gateway-miniprogram: creating ${VENV} with ${python}`);
    const made = run(python, ["-m", "venv", ".venv"]);
    if (!made.ok) {
      // A venv without pip is left behind when ensurepip is missing: start afresh next time.
      if (fresh) rmSync(VENV, { recursive: true, force: true });
      fail(`cannot create .venv with ${python} (${made.why}): set PYTHON to a Python 3.11+ with venv, ${FIRST}`);
    }
  }
  const want = pyprojectHash();
  const have = existsSync(STAMP) ? readFileSync(STAMP, "utf8").trim() : "";
  if (have === want && run(VENV_PYTHON, ["-c", PROBE]).ok) return;
  console.error("wx-gateway-miniprogram: installing the gateway into .venv (pip install -e .)");
  // pip's own output goes to the terminal: it is what explains a failure.
  const installed = run(VENV_PYTHON, ["-m", "pip", "install", "-q", "-e", "."], { stdio: "inherit" });
  if (!installed.ok) {
    fail(`pip could not install the gateway into .venv (see above): fix that and run npm test again, ${FIRST}`);
  }
  writeFileSync(STAMP, `${want}\n`);
  const probe = run(VENV_PYTHON, ["-c", PROBE]);
  if (!probe.ok) {
    fail(`${VENV_PYTHON} cannot run the gateway (${probe.why}): remove .venv and run npm test again, ${FIRST}`);
  }
}

if (process.env.GATEWAY_PYTHON) checkGivenPython(process.env.GATEWAY_PYTHON);
else ensureVenv();
