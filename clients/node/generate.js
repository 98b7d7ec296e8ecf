#!/usr/bin/env node
// Streams one generation from an Omnibus server over its public gRPC API (omnibus.v1.Generation).
//
// The text goes to stdout as it arrives; at the end one JSON line goes to stderr with the
// request id, finish reason, usage and every token id. Exit codes: 0 done, 1 the server or the
// connection failed (gRPC status name and details on stderr), 2 bad flags, 130 cancelled by Ctrl-C.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { parseArgs } = require('node:util');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO_PATH = path.join(__dirname, '..', '..', 'protos', 'omnibus', 'v1', 'generation.proto');

const USAGE = `usage: node generate.js (--prompt TEXT | --chat TEXT [--system TEXT]) [options]

  --target HOST:PORT   server address (default localhost:50051), plaintext unless TLS flags are given
  --prompt TEXT        raw prompt
  --chat TEXT          one user message, rendered with the model's chat template
  --system TEXT        a system message before the --chat message
  --max-tokens N       new tokens at most (server default: min(256, what the context leaves))
  --temperature T      0 = greedy (server default)
  --top-p P, --top-k K, --seed N, --stop TEXT (repeatable), --ignore-eos
  --request-id ID      echoed in responses and in the server's log line
  --timeout SECONDS    deadline for the whole call
  --tls                TLS with the system's root certificates
  --ca PEM             TLS, trusting this CA; add --cert PEM --key PEM for mTLS`;

const OPTIONS = {
  target: { type: 'string' },
  prompt: { type: 'string' },
  chat: { type: 'string' },
  system: { type: 'string' },
  'max-tokens': { type: 'string' },
  temperature: { type: 'string' },
  'top-p': { type: 'string' },
  'top-k': { type: 'string' },
  seed: { type: 'string' },
  stop: { type: 'string', multiple: true },
  'ignore-eos': { type: 'boolean' },
  'request-id': { type: 'string' },
  timeout: { type: 'string' },
  tls: { type: 'boolean' },
  ca: { type: 'string' },
  cert: { type: 'string' },
  key: { type: 'string' },
  help: { type: 'boolean', short: 'h' },
};

class UsageError extends Error {}

function parseNumber(flag, value, { integer = false, min = -Infinity } = {}) {
  const number = Number(value);
  if (value.trim() === '' || !Number.isFinite(number) || (integer && !Number.isInteger(number)) || number < min) {
    const bound = Number.isFinite(min) ? ` >= ${min}` : '';
    throw new UsageError(`--${flag}: expected ${integer ? 'an integer' : 'a number'}${bound}, got ${JSON.stringify(value)}`);
  }
  return number;
}

/** The GenerateRequest (a plain object in proto field names) that the flags describe. */
function buildRequest(flags) {
  if ((flags.prompt === undefined) === (flags.chat === undefined)) {
    throw new UsageError('give exactly one of --prompt and --chat');
  }
  if (flags.system !== undefined && flags.chat === undefined) throw new UsageError('--system goes with --chat');
  // Only flags that were given are set, so the server sees the others as absent and applies
  // its own defaults (the sampling fields are proto3 `optional`).
  const sampling = { stop: flags.stop ?? [], ignore_eos: Boolean(flags['ignore-eos']) };
  if (flags['max-tokens'] !== undefined) sampling.max_tokens = parseNumber('max-tokens', flags['max-tokens'], { integer: true, min: 0 });
  if (flags.temperature !== undefined) sampling.temperature = parseNumber('temperature', flags.temperature);
  if (flags['top-p'] !== undefined) sampling.top_p = parseNumber('top-p', flags['top-p']);
  if (flags['top-k'] !== undefined) sampling.top_k = parseNumber('top-k', flags['top-k'], { integer: true });
  if (flags.seed !== undefined) {
    // uint64: passed as a decimal string so seeds above 2^53 keep every digit.
    if (!/^\d+$/.test(flags.seed)) throw new UsageError(`--seed: expected a non-negative integer, got ${JSON.stringify(flags.seed)}`);
    sampling.seed = flags.seed;
  }
  const request = { request_id: flags['request-id'] ?? '', sampling };
  if (flags.prompt !== undefined) {
    request.prompt = flags.prompt;
  } else {
    request.messages = [
      ...(flags.system !== undefined ? [{ role: 'system', content: flags.system }] : []),
      { role: 'user', content: flags.chat },
    ];
  }
  return request;
}

function channelCredentials(flags) {
  if (flags.ca === undefined && flags.cert === undefined && flags.key === undefined && !flags.tls) {
    return grpc.credentials.createInsecure();
  }
  if ((flags.cert === undefined) !== (flags.key === undefined)) {
    throw new UsageError('--cert and --key go together');
  }
  const read = (file) => {
    if (file === undefined) return null;
    try {
      return fs.readFileSync(file);
    } catch (error) {
      throw new UsageError(`cannot read ${file}: ${error.message}`);
    }
  };
  return grpc.credentials.createSsl(read(flags.ca), read(flags.key), read(flags.cert));
}

function loadGenerationService() {
  const definition = protoLoader.loadSync(PROTO_PATH, {
    keepCase: true, // snake_case field names, as in the .proto and the other clients
    longs: String, // uint64 seed: no precision lost above 2^53
    enums: String, // finish_reason as its name, e.g. "FINISH_REASON_LENGTH"
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).omnibus.v1.Generation;
}

function generate(flags) {
  const request = buildRequest(flags);
  const credentials = channelCredentials(flags);
  const timeoutS = flags.timeout === undefined ? null : parseNumber('timeout', flags.timeout, { min: 0 });
  const Generation = loadGenerationService();
  const client = new Generation(flags.target ?? 'localhost:50051', credentials);
  const call = client.Generate(request, timeoutS === null ? {} : { deadline: Date.now() + 1000 * timeoutS });

  const summary = { request_id: request.request_id, finish_reason: null, usage: null, token_ids: [] };
  let interrupted = false;
  const onSigint = () => {
    interrupted = true;
    call.cancel(); // the server aborts the request and frees its KV blocks within a step
  };
  process.once('SIGINT', onSigint);
  let finished = false;
  const finish = (exitCode) => {
    finished = true;
    process.removeListener('SIGINT', onSigint);
    client.close();
    process.exitCode = exitCode; // not process.exit(): let stdout drain into a pipe
  };

  call.on('data', (response) => {
    process.stdout.write(response.text);
    summary.token_ids.push(...response.token_ids);
    summary.request_id = response.request_id || summary.request_id;
    summary.finish_reason = response.finish_reason;
    if (response.usage) summary.usage = response.usage;
  });
  call.on('end', () => {
    if (finished) return; // grpc-js ends the stream after an 'error' too
    if (process.stdout.isTTY) process.stdout.write('\n'); // a pipe gets the text exactly
    process.stderr.write(`${JSON.stringify(summary)}\n`);
    finish(0);
  });
  call.on('error', (error) => {
    process.stderr.write(`${grpc.status[error.code] ?? error.code}: ${error.details}\n`);
    finish(interrupted && error.code === grpc.status.CANCELLED ? 130 : 1);
  });
}

function main() {
  let flags;
  try {
    ({ values: flags } = parseArgs({ options: OPTIONS, strict: true }));
    if (flags.help) {
      process.stdout.write(`${USAGE}\n`);
      return;
    }
    generate(flags);
  } catch (error) {
    if (!(error instanceof UsageError || error.code?.startsWith('ERR_PARSE_ARGS'))) throw error;
    process.stderr.write(`${error.message} (--help for usage)\n`);
    process.exitCode = 2;
  }
}

main();
