// A real Better Auth server (in-memory, JWT plugin) for the backend's interop tests.
// Env: PORT (required), BASE_URL (default http://127.0.0.1:PORT), SECRET (>= 32 chars),
// JWT_ALG (EdDSA default; ES256, ES512, RS256, PS256 also work).
// Prints "READY <port>" on stdout once listening on 127.0.0.1:PORT.
import http from "node:http";
import { betterAuth } from "better-auth";
import { memoryAdapter } from "better-auth/adapters/memory";
import { toNodeHandler } from "better-auth/node";
import { jwt } from "better-auth/plugins";

const port = Number.parseInt(process.env.PORT ?? "", 10);
if (!Number.isInteger(port) || port <= 0) {
  console.error("PORT must be a positive integer");
  process.exit(2);
}
const baseURL = process.env.BASE_URL || `http://127.0.0.1:${port}`;
const secret = process.env.SECRET ?? "";
if (secret.length < 32) {
  console.error("SECRET must be at least 32 characters");
  process.exit(2);
}
const alg = process.env.JWT_ALG || "EdDSA";
const keyPairConfig =
  alg === "EdDSA" ? { alg, crv: "Ed25519" } : alg.startsWith("RS") || alg.startsWith("PS")
    ? { alg, modulusLength: 2048 }
    : { alg };

const auth = betterAuth({
  baseURL,
  secret,
  database: memoryAdapter({ user: [], session: [], account: [], verification: [], jwks: [] }),
  emailAndPassword: { enabled: true },
  trustedOrigins: [baseURL],
  telemetry: { enabled: false },
  rateLimit: { enabled: false },
  plugins: [jwt({ jwks: { keyPairConfig } })],
});

const server = http.createServer(toNodeHandler(auth));
server.listen(port, "127.0.0.1", () => {
  process.stdout.write(`READY ${port}\n`);
});

for (const signal of ["SIGTERM", "SIGINT"]) {
  process.on(signal, () => server.close(() => process.exit(0)));
}
