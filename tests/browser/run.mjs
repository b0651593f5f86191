// Open page.html in headless Chromium and print what it found, as JSON, on stdout.
//
//   node run.mjs <page URL> [timeout ms]
//
// The browser is the system's (Debian's `chromium`, or CHROMIUM_PATH): playwright-core only
// drives it and never downloads one. Output, one JSON object:
//   { "result": <the page's #result, parsed>, "console": [...], "pageErrors": [...] }
// The console lines are where Chromium explains a CORS block. Exit code 1 (message on
// stderr) when the browser cannot start or the page writes no result in time.

import { chromium } from "playwright-core";

const CHROMIUM_PATH = process.env.CHROMIUM_PATH || "/usr/bin/chromium";
const CHROMIUM_ARGS = [
  "--headless",
  "--no-sandbox",
  "--disable-gpu",
  "--disable-dev-shm-usage", // a container's small /dev/shm must not crash the renderer
  "--disable-quic",
  "--no-first-run",
  // Without these Chromium phones home at start-up, and in a sandbox without internet it says so loudly.
  "--disable-background-networking",
  "--disable-component-update",
  "--disable-sync",
];

async function main() {
  const [url, timeoutArg] = process.argv.slice(2);
  if (!url) throw new Error("usage: node run.mjs <page URL> [timeout ms]");
  const timeout = Number(timeoutArg ?? 60_000);

  const browser = await chromium.launch({
    executablePath: CHROMIUM_PATH,
    headless: true,
    args: CHROMIUM_ARGS,
    timeout,
  });
  try {
    const page = await browser.newPage();
    const consoleLines = [];
    const pageErrors = [];
    page.on("console", (message) => consoleLines.push(`${message.type()}: ${message.text()}`));
    page.on("pageerror", (error) => pageErrors.push(String(error)));

    await page.goto(url, { timeout });
    const result = page.locator("#result");
    await result.waitFor({ state: "attached", timeout });
    const text = await result.textContent();
    process.stdout.write(JSON.stringify({ result: JSON.parse(text), console: consoleLines, pageErrors }) + "\n");
  } finally {
    await browser.close();
  }
}

main().catch((error) => {
  process.stderr.write(`run.mjs: ${error?.stack ?? error}\n`);
  process.exitCode = 1;
});
