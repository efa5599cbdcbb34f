// Self-test for the FHIR sandbox. Starts its own servers with this same Node binary:
//   node_modules/.bin/node selftest.mjs
// Exits non-zero on the first failed check.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';

const serverPath = fileURLToPath(new URL('./server.mjs', import.meta.url));
const children = [];
process.on('exit', () => children.forEach((c) => c.exitCode === null && c.kill('SIGTERM')));

async function startServer(args = [], env = {}) {
  const child = spawn(process.execPath, [serverPath, '--port', '0', ...args], {
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  children.push(child);
  let out = '';
  for await (const chunk of child.stdout) {
    out += chunk;
    const m = /^FHIR sandbox listening on (http:\/\/\S+)\n/.exec(out);
    if (m) {
      return { base: m[1], child };
    }
  }
  throw new Error('server exited before becoming ready: ' + out);
}

let checks = 0;
function ok(cond, msg) {
  assert.ok(cond, msg);
  checks++;
}

const t0 = Date.now();
const { base, child } = await startServer([], { FHIR_SANDBOX_CLIENT_ID: 'cid', FHIR_SANDBOX_CLIENT_SECRET: 'sec' });
console.log(`server ready in ${Date.now() - t0} ms at ${base}`);
const fhir = `${base}/fhir/R4`;

async function getToken(id = 'cid', secret = 'sec', basic = false) {
  const headers = { 'Content-Type': 'application/x-www-form-urlencoded' };
  let body = 'grant_type=client_credentials';
  if (basic) {
    headers.Authorization = 'Basic ' + Buffer.from(`${id}:${secret}`).toString('base64');
  } else {
    body += `&client_id=${encodeURIComponent(id)}&client_secret=${encodeURIComponent(secret)}`;
  }
  const res = await fetch(`${base}/oauth2/token`, { method: 'POST', headers, body });
  return { status: res.status, json: await res.json() };
}

let token;
async function req(method, path, body, headers = {}) {
  const res = await fetch(path.startsWith('http') ? path : fhir + path, {
    method,
    headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'application/fhir+json', ...headers },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, headers: res.headers, json: text ? JSON.parse(text) : undefined };
}
const post = (p, b, h) => req('POST', p, b, h);
const ctl = (method, path, body) =>
  fetch(base + path, { method, body: body && JSON.stringify(body) }).then(async (r) => ({ status: r.status, json: await r.json() }));
const count = async (query) => (await req('GET', query)).json.total;
const text = (oo) => oo.issue?.[0]?.details?.text;

// --- auth
{
  ok((await getToken('cid', 'wrong')).status === 401, 'wrong secret -> 401');
  ok((await getToken('cid', 'wrong')).json.error === 'invalid_client', 'invalid_client body');
  ok((await getToken('cid', 'sec', true)).status === 200, 'basic auth accepted');
  const t = await getToken();
  ok(t.status === 200 && t.json.token_type === 'Bearer' && t.json.expires_in === 3600, 'token response');
  token = t.json.access_token;
  token = 'bogus';
  const r = await req('GET', '/Patient');
  ok(r.status === 401 && r.json.resourceType === 'OperationOutcome', '401 with bogus token');
  const r2 = await fetch(`${fhir}/Patient`);
  ok(r2.status === 401, '401 without token');
  token = t.json.access_token;
}

// --- create, read, search, +
const patient = await post('/Patient', {
  resourceType: 'Patient',
  name: [{ given: ['Ada'], family: 'Lovelace' }],
  telecom: [{ system: 'phone', value: '+15551234567' }],
});
ok(patient.status === 201, 'create Patient 201');
ok(patient.headers.get('location') === `${fhir}/Patient/${patient.json.id}`, 'Location header');
ok(patient.headers.get('etag') === `W/"${patient.json.meta.versionId}"`, 'ETag header');
const pid = patient.json.id;
ok((await count('/Patient?phone=%2B15551234567')) === 1, 'search phone %2B');
ok((await count('/Patient?phone=+15551234567')) === 0, 'raw + decodes to space, no match');

// --- identifier searches (answered through the sandbox's identifier index)
{
  const sys = 'urn:selftest:ident';
  const a = await post('/Device', { resourceType: 'Device', identifier: [{ system: sys, value: 'Tok-1' }] });
  await post('/Device', { resourceType: 'Device', identifier: [{ system: `${sys}:other`, value: 'Tok-1' }] });
  ok((await count(`/Device?identifier=${sys}|Tok-1`)) === 1, 'identifier system|value: one');
  ok((await count('/Device?identifier=Tok-1')) === 2, 'identifier value alone: both systems');
  ok((await count(`/Device?identifier=${sys}|Tok-2`)) === 0, 'identifier not there: none');
  const moved = await req('PUT', `/Device/${a.json.id}`, { ...a.json, identifier: [{ system: sys, value: 'Tok-2' }] });
  ok(moved.status === 200, 'identifier changed by update');
  ok((await count(`/Device?identifier=${sys}|Tok-1`)) === 0, 'old identifier no longer matches');
  ok((await count(`/Device?identifier=${sys}|Tok-2`)) === 1, 'new identifier matches');
  ok((await count(`/Device?_id=${a.json.id}`)) === 1, '_id search');
  ok((await count(`/Device?_id=${a.json.id}&identifier=${sys}|Tok-1`)) === 0, '_id and a filter');
  await req('DELETE', `/Device/${a.json.id}`);
  ok((await count(`/Device?identifier=${sys}|Tok-2`)) === 0, 'deleted: no match');
  ok((await count(`/Device?_id=${a.json.id}`)) === 0, 'deleted: _id no match');
}

// --- conditional references on create
{
  const before = await count('/Communication');
  const good = await post('/Communication', {
    resourceType: 'Communication',
    status: 'in-progress',
    subject: { reference: 'Patient?phone=%2B15551234567' },
    sender: { reference: 'Patient?phone=%2B15551234567' },
  });
  ok(good.status === 201 && good.json.sender.reference === `Patient/${pid}`, 'conditional reference resolved');
  const zero = await post('/Communication', {
    resourceType: 'Communication',
    status: 'in-progress',
    sender: { reference: 'Patient?phone=%2B15550000000' },
  });
  ok(zero.status === 400, 'zero match -> 400');
  ok(text(zero.json) === "Conditional reference 'Patient?phone=%2B15550000000' did not match any resources", 'zero text');
  ok(zero.json.issue[0].expression[0] === 'Communication.sender', 'zero expression');
  await post('/Patient', { resourceType: 'Patient', telecom: [{ system: 'phone', value: '+15559999999' }] });
  await post('/Patient', { resourceType: 'Patient', telecom: [{ system: 'phone', value: '+15559999999' }] });
  const several = await post('/Communication', {
    resourceType: 'Communication',
    status: 'in-progress',
    sender: { reference: 'Patient?phone=%2B15559999999' },
  });
  ok(several.status === 400 && text(several.json).endsWith('matched multiple resources'), 'several -> 400');
  ok((await count('/Communication')) === before + 1, 'nothing written on failed conditional references');
}

// --- validation
{
  const unknown = await post('/Communication', { resourceType: 'Communication', status: 'in-progress', foo: 1 });
  ok(unknown.status === 400 && unknown.json.issue[0].expression[0] === 'Communication.foo', 'unknown element -> 400');
  const missing = await post('/Communication', { resourceType: 'Communication' });
  ok(missing.status === 400 && missing.json.issue[0].expression[0] === 'Communication.status', 'missing status -> 400');
  const badDate = await post('/Communication', { resourceType: 'Communication', status: 'completed', sent: '2024-13-45' });
  ok(badDate.status === 400, 'bad dateTime -> 400');
}

// --- conditional create race, full valid Communication
const SYS = 'https://example.org/sms';
const header = {
  resourceType: 'Communication',
  status: 'in-progress',
  identifier: [{ system: SYS, value: 'THREAD1' }],
  subject: { reference: `Patient/${pid}` },
  topic: { text: 'Thread' },
};
{
  const msg = {
    resourceType: 'Communication',
    status: 'completed',
    identifier: [{ system: SYS, value: 'SM1' }],
    subject: { reference: `Patient/${pid}` },
    sender: { reference: 'Patient?phone=%2B15551234567' },
    recipient: [{ reference: `Patient/${pid}` }],
    payload: [{ contentString: 'hello' }],
    medium: [{ coding: [{ system: 'http://terminology.hl7.org/CodeSystem/v3-ParticipationMode', code: 'SMSWRIT' }] }],
    sent: '2024-05-01T12:00:00Z',
    topic: { text: 'SMS' },
    category: [{ text: 'sms' }],
  };
  const h = await post('/Communication', header, { 'If-None-Exist': `identifier=${SYS}|THREAD1` });
  ok(h.status === 201, 'header create 201');
  msg.partOf = [{ reference: `Communication?identifier=${SYS}|THREAD1` }];
  const results = await Promise.all(
    Array.from({ length: 20 }, () => post('/Communication', msg, { 'If-None-Exist': `identifier=${SYS}|SM1` }))
  );
  const statuses = results.map((r) => r.status).sort();
  ok(statuses.filter((s) => s === 201).length === 1 && statuses.filter((s) => s === 200).length === 19, `race statuses ${statuses}`);
  ok(new Set(results.map((r) => r.json.id)).size === 1, 'race: one id');
  ok((await count(`/Communication?identifier=${SYS}|SM1`)) === 1, 'race: one resource');
  ok(results[0].json.partOf[0].reference === `Communication/${h.json.id}`, 'partOf resolved');
}

// --- conditional update / upsert, If-Match, update of missing id
{
  const body = { resourceType: 'Communication', status: 'in-progress', identifier: [{ system: SYS, value: 'UP1' }] };
  const u1 = await req('PUT', `/Communication?identifier=${SYS}|UP1`, body);
  const u2 = await req('PUT', `/Communication?identifier=${SYS}|UP1`, { ...body, status: 'completed' });
  ok(u1.status === 201 && u2.status === 200 && u1.json.id === u2.json.id, 'upsert 201 then 200');
  ok((await count(`/Communication?identifier=${SYS}|UP1`)) === 1, 'upsert one resource');
  const stale = await req('PUT', `/Communication/${u1.json.id}`, { ...u2.json, status: 'stopped' }, { 'If-Match': `W/"${u1.json.meta.versionId}"` });
  ok(stale.status === 412, 'stale If-Match -> 412');
  const fresh = await req('PUT', `/Communication/${u1.json.id}`, { ...u2.json, status: 'stopped' }, { 'If-Match': `W/"${u2.json.meta.versionId}"` });
  ok(fresh.status === 200 && fresh.json.status === 'stopped', 'fresh If-Match -> 200');
  const nowhere = await req('PUT', '/Communication/does-not-exist', { resourceType: 'Communication', id: 'does-not-exist', status: 'completed' });
  ok(nowhere.status === 404, 'PUT unknown id -> 404 (no update-as-create)');
  const read = await req('GET', `/Communication/${u1.json.id}`);
  ok(read.status === 200 && read.headers.get('etag') === `W/"${fresh.json.meta.versionId}"`, 'read 200 + ETag');
  ok((await req('GET', '/Communication/nope')).status === 404, 'read missing -> 404');
}

// --- Medplum's size limits: JSON bodies over 1 MiB refused, raw Binary uploads stored as bytes
{
  const big = 'x'.repeat(1024 * 1024 + 10);
  const tooBig = await post('/Communication', { resourceType: 'Communication', status: 'completed', payload: [{ contentString: big }] });
  ok(tooBig.status === 400 && text(tooBig.json) === 'File too large', 'JSON body over 1 MiB -> 400 File too large');
  const photo = Buffer.alloc(2 * 1024 * 1024);
  for (let i = 0; i < photo.length; i++) {
    photo[i] = (i * 7919) % 256;
  }
  const inJson = await post('/Binary', { resourceType: 'Binary', contentType: 'image/jpeg', data: photo.toString('base64') });
  ok(inJson.status === 400, 'base64 Binary of 2 MB -> 400');
  const up = await fetch(`${fhir}/Binary`, { method: 'POST', headers: { Authorization: `Bearer ${token}`, 'Content-Type': 'image/jpeg', Accept: 'application/fhir+json' }, body: photo });
  const created = await up.json();
  ok(up.status === 201 && created.resourceType === 'Binary' && created.contentType === 'image/jpeg' && created.data === undefined, 'raw Binary upload -> 201, no data in the resource');
  const back = await fetch(`${fhir}/Binary/${created.id}`, { headers: { Authorization: `Bearer ${token}`, Accept: 'image/jpeg' } });
  ok(back.status === 200 && back.headers.get('content-type') === 'image/jpeg', 'raw Binary read with its type in Accept');
  ok(Buffer.from(await back.arrayBuffer()).equals(photo), 'raw Binary reads back byte-identical');
  const asJson = await req('GET', `/Binary/${created.id}`, undefined, { Accept: 'application/fhir+json' });
  ok(asJson.status === 200 && asJson.json.id === created.id, 'the Binary reads as JSON with a FHIR Accept');
  const small = await post('/Binary', { resourceType: 'Binary', contentType: 'text/plain', data: Buffer.from('hi').toString('base64') });
  const smallBack = await fetch(`${fhir}/Binary/${small.json.id}`, { headers: { Authorization: `Bearer ${token}`, Accept: 'text/plain' } });
  ok((await smallBack.text()) === 'hi', 'a JSON-created Binary is served raw too');
}

// --- transaction
function txBundle(suffix, extra = []) {
  const hdr = 'urn:uuid:11111111-1111-4111-8111-' + suffix.padStart(12, '0');
  return {
    resourceType: 'Bundle',
    type: 'transaction',
    entry: [
      {
        fullUrl: hdr,
        resource: { resourceType: 'Communication', status: 'in-progress', identifier: [{ system: SYS, value: 'TX-H' + suffix }] },
        request: { method: 'POST', url: 'Communication', ifNoneExist: `identifier=${SYS}|TX-H${suffix}` },
      },
      {
        resource: {
          resourceType: 'Communication',
          status: 'completed',
          identifier: [{ system: SYS, value: 'TX-M' + suffix }],
          partOf: [{ reference: hdr }],
          sender: { reference: 'Patient?phone=%2B15551234567' },
        },
        request: { method: 'POST', url: 'Communication', ifNoneExist: `identifier=${SYS}|TX-M${suffix}` },
      },
      {
        resource: {
          resourceType: 'Communication',
          status: 'completed',
          partOf: [{ reference: `Communication?identifier=${SYS}|TX-H${suffix}` }],
        },
        request: { method: 'POST', url: 'Communication' },
      },
      ...extra,
    ],
  };
}
{
  const tx = await post('', txBundle('1'));
  ok(tx.status === 200 && tx.json.type === 'transaction-response', 'transaction 200');
  ok(tx.json.entry.map((e) => e.response.status).join() === '201,201,201', 'transaction entry statuses');
  const [h, m, c] = tx.json.entry.map((e) => e.resource);
  ok(m.partOf[0].reference === `Communication/${h.id}`, 'urn:uuid resolved');
  ok(c.partOf[0].reference === `Communication/${h.id}`, 'conditional reference to same-bundle resource');
  ok(m.sender.reference === `Patient/${pid}`, 'conditional reference in transaction');
  const again = await post('/', txBundle('1'));
  ok(again.json.entry.map((e) => e.response.status).join() === '200,200,201', 'ifNoneExist in transaction -> 200');
  ok(again.json.entry[1].resource.id === m.id, 'existing returned');
  const before = await count('/Communication');
  const bad = await post('/', txBundle('2', [{ resource: { resourceType: 'Communication', status: 'completed', bogus: true }, request: { method: 'POST', url: 'Communication' } }]));
  ok(bad.status === 400 && bad.json.resourceType === 'OperationOutcome', 'failing transaction -> 400');
  const bad2 = await post('/', txBundle('3', [{ resource: { resourceType: 'Communication', status: 'completed', sender: { reference: 'Patient?phone=%2B10000000000' } }, request: { method: 'POST', url: 'Communication' } }]));
  ok(bad2.status === 400, 'transaction with unresolvable conditional reference -> 400');
  ok((await count('/Communication')) === before, 'failed transactions wrote nothing');
}

// --- thread searches
{
  await ctl('POST', '/__reset');
  const p = (await post('/Patient', { resourceType: 'Patient' })).json.id;
  const mk = (status, extra = {}) => post('/Communication', { resourceType: 'Communication', status, subject: { reference: `Patient/${p}` }, ...extra });
  const a = (await mk('in-progress')).json.id;
  const b = (await mk('in-progress')).json.id;
  await mk('completed');
  await mk('in-progress', { partOf: [{ reference: `Communication/${a}` }] });
  const q1 = `/Communication?part-of:missing=true&subject=Patient/${p}&status:not=completed&status:not=entered-in-error&_sort=-_lastUpdated&_count=1`;
  const r1 = await req('GET', q1);
  ok(r1.json.type === 'searchset' && r1.json.entry.length === 1 && r1.json.entry[0].resource.id === b, 'repeated status:not + _sort + _count');
  const q2 = `/Communication?part-of:missing=true&subject=Patient/${p}&status:not=completed,entered-in-error,stopped,unknown&_sort=-_lastUpdated&_count=1`;
  const r2 = await req('GET', q2);
  ok(r2.json.entry?.[0]?.resource.id === b, `comma status:not form (got ${r2.json.total})`);
  ok((await count(`/Communication?part-of:missing=true&subject=Patient/${p}`)) === 3, 'part-of:missing=true');
  ok((await count(`/Communication?part-of:missing=false&subject=Patient/${p}`)) === 1, 'part-of:missing=false');
  const asc = await req('GET', `/Communication?part-of:missing=true&status=in-progress&_sort=_lastUpdated&_count=1`);
  ok(asc.json.entry[0].resource.id === a, '_sort ascending');
  // delete
  const del = await req('DELETE', `/Communication/${a}`);
  ok(del.status === 200, 'delete 200');
  ok((await req('GET', `/Communication/${a}`)).status === 404, 'read deleted -> 404');
}

// --- faults, stats
{
  await ctl('POST', '/__stats/reset');
  ok((await ctl('POST', '/__faults', { status: 503, count: 2 })).status === 200, 'fault queued');
  ok((await req('GET', '/Patient')).status === 503, 'fault 1');
  ok((await req('GET', '/Patient')).status === 503, 'fault 2');
  ok((await req('GET', '/Patient')).status === 200, 'after faults');
  await ctl('POST', '/__faults', { status: 429, count: 1, retry_after_seconds: 7 });
  const r429 = await req('GET', '/Patient');
  ok(r429.status === 429 && r429.json.issue[0].code === 'throttled', '429 throttled');
  ok(r429.headers.get('ratelimit') === '"requests";r=0;t=7, "fhirInteractions";r=0;t=7', 'RateLimit header');
  ok(r429.headers.get('retry-after') === null, 'no Retry-After');
  await ctl('POST', '/__faults', { status: 500, count: 1, method: 'POST', path_contains: 'Communication' });
  ok((await req('GET', '/Communication')).status === 200, 'filter: GET not faulted');
  ok((await post('/Patient', { resourceType: 'Patient' })).status === 201, 'filter: Patient not faulted');
  ok((await post('/Communication', { resourceType: 'Communication', status: 'completed' })).status === 500, 'filter: POST Communication faulted');
  await ctl('POST', '/__faults', { delay_ms: 300, count: 1 });
  const t1 = Date.now();
  ok((await req('GET', '/Patient')).status === 200 && Date.now() - t1 >= 290, 'delay_ms');
  await ctl('POST', '/__faults', { status: 502, count: 5 });
  await ctl('DELETE', '/__faults');
  ok((await req('GET', '/Patient')).status === 200, 'faults cleared');
  const stats = (await ctl('GET', '/__stats')).json;
  ok(stats.requests === 9 && stats.by_method.GET === 7 && stats.by_method.POST === 2, `stats ${JSON.stringify(stats)}`);
}

// --- rest-hook Subscriptions, delivered as Medplum does
{
  const { createHmac } = await import('node:crypto');
  const http = await import('node:http');
  const got = [];
  const answers = [503]; // the first delivery fails, so it is retried
  const hook = http.createServer((rq, rs) => {
    const chunks = [];
    rq.on('data', (c) => chunks.push(c));
    rq.on('end', () => {
      got.push({ headers: rq.headers, body: Buffer.concat(chunks).toString('utf8') });
      rs.writeHead(answers.shift() ?? 200).end();
    });
  });
  await new Promise((r) => hook.listen(0, '127.0.0.1', r));
  const endpoint = `http://127.0.0.1:${hook.address().port}/hook`;
  const subscribe = (interaction) =>
    post('/Subscription', {
      resourceType: 'Subscription', status: 'active', reason: 'selftest',
      criteria: 'Communication?part-of:missing=false&status=in-progress',
      channel: { type: 'rest-hook', endpoint, payload: 'application/fhir+json' },
      extension: [
        { url: 'https://www.medplum.com/fhir/StructureDefinition/subscription-secret', valueString: 'k' },
        { url: 'https://medplum.com/fhir/StructureDefinition/subscription-supported-interaction', valueCode: interaction },
      ],
    });
  const sub = (await subscribe('create')).json;
  const head = (await post('/Communication', { resourceType: 'Communication', status: 'in-progress' })).json;
  const child = (await post('/Communication', {
    resourceType: 'Communication', status: 'in-progress', partOf: [{ reference: `Communication/${head.id}` }],
  })).json;
  await req('PUT', `/Communication/${child.id}`, { ...child, status: 'completed' }); // update: not notified
  const waitFor = async (n) => {
    for (let i = 0; i < 100 && got.length < n; i++) {
      await new Promise((r) => setTimeout(r, 50));
    }
  };
  await waitFor(2);
  await new Promise((r) => setTimeout(r, 300));
  ok(got.length === 2, `create delivered, retried after a 503, update and header not: ${got.length}`);
  const [first] = got;
  ok(JSON.parse(first.body).id === child.id && first.body === got[1].body, 'bare resource body, same on retry');
  ok(first.headers['x-signature'] === createHmac('sha256', 'k').update(first.body).digest('hex'), 'X-Signature HMAC');
  ok(first.headers['x-medplum-interaction'] === 'create' && first.headers['x-medplum-subscription'] === sub.id, 'Medplum headers');
  ok(first.headers['content-type'] === 'application/fhir+json', 'fhir+json');
  const failed = await req('GET', `/AuditEvent?entity=Subscription/${sub.id}&outcome=4`);
  ok(failed.json.entry?.length === 1 && failed.json.entry[0].resource.outcomeDesc === 'Attempt 1 received status 503', 'failed attempt audited');
  await subscribe('delete');
  await req('DELETE', `/Communication/${child.id}`);
  await waitFor(3);
  const del = got[2];
  ok(del?.body === '{}' && del.headers['x-medplum-deleted-resource'] === `Communication/${child.id}`, 'delete notification');
  ok((await ctl('GET', '/__stats')).json.subscriptions.deliveries === 3, 'deliveries counted');
  hook.close();
}

// --- revoke, reset
{
  await ctl('POST', '/__revoke_tokens');
  ok((await req('GET', '/Patient')).status === 401, 'revoked -> 401');
  token = (await getToken()).json.access_token;
  ok((await req('GET', '/Patient')).status === 200, 'new token works');
  ok((await count('/Patient')) > 0, 'has data');
  ok((await ctl('POST', '/__reset')).status === 200, 'reset');
  ok((await count('/Patient')) === 0, 'reset cleared data');
  ok((await ctl('GET', '/__stats')).json.requests === 1, 'reset zeroed stats');
}

// --- token expiry (separate server, --token-ttl 1, no client env => any id accepted)
{
  const short = await startServer(['--token-ttl', '1'], { FHIR_SANDBOX_CLIENT_ID: '', FHIR_SANDBOX_CLIENT_SECRET: '' });
  const r = await fetch(`${short.base}/oauth2/token`, { method: 'POST', body: new URLSearchParams({ grant_type: 'client_credentials', client_id: 'anyone' }) });
  const j = await r.json();
  ok(r.status === 200 && j.expires_in === 1, 'ttl 1 token');
  const h = { Authorization: `Bearer ${j.access_token}` };
  ok((await fetch(`${short.base}/fhir/R4/Patient`, { headers: h })).status === 200, 'fresh token ok');
  await new Promise((res) => setTimeout(res, 1100));
  ok((await fetch(`${short.base}/fhir/R4/Patient`, { headers: h })).status === 401, 'expired token -> 401');
  short.child.kill('SIGTERM');
  const [code] = await once(short.child, 'exit');
  ok(code === 0, 'clean exit on SIGTERM');
}

child.kill('SIGTERM');
await once(child, 'exit');
console.log(`selftest OK: ${checks} checks`);
