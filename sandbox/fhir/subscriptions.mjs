// FHIR Subscriptions (rest-hook) the way the Medplum server delivers them, for the sandbox.
//
// After every successful create, update or delete, each active rest-hook Subscription whose
// criteria match the resource (Medplum's own matchesSearchRequest) and whose interaction
// extension allows the interaction (none: create and update; delete only when asked for) gets
// a POST of the bare resource (`{}` for a delete), with Medplum's headers: Content-Type
// application/fhir+json, X-Medplum-Subscription, X-Medplum-Interaction,
// X-Medplum-Deleted-Resource (delete), the channel's own `header` lines, and X-Signature = hex
// HMAC-SHA256 of the exact body with the subscription-secret extension's value.
// A non-2xx answer or a network error is retried (subscription-max-attempts, default 3) with a
// growing pause; every attempt is recorded as an AuditEvent (outcome 0 success, 4 failure),
// as Medplum does, so `switchboard subscription status` can show failed deliveries.
import { createHmac } from 'node:crypto';
import { createReference, getStatus, matchesSearchRequest, parseSearchRequest } from '@medplum/core';

const SECRET_URLS = [
  'https://www.medplum.com/fhir/StructureDefinition/subscription-secret',
  'https://www.medplum.com/fhir/StructureDefinition-subscriptionSecret', // Medplum's old URL
];
const INTERACTION_URL = 'https://medplum.com/fhir/StructureDefinition/subscription-supported-interaction';
const MAX_ATTEMPTS_URL = 'https://medplum.com/fhir/StructureDefinition/subscription-max-attempts';
const DEFAULT_ATTEMPTS = 3;
const REQUEST_TIMEOUT_MS = 10_000;

function extensionValues(resource, url) {
  const out = [];
  for (const ext of resource.extension ?? []) {
    if (ext?.url === url) {
      const key = Object.keys(ext).find((k) => k.startsWith('value'));
      if (key) {
        out.push(ext[key]);
      }
    }
  }
  return out;
}

function allows(subscription, interaction) {
  const wanted = extensionValues(subscription, INTERACTION_URL);
  if (wanted.length === 0) {
    return interaction !== 'delete';
  }
  return wanted.includes(interaction);
}

/**
 * What a FHIR answer did, as Medplum names subscription interactions: [{interaction, resource}].
 * Transaction and batch Bundles contribute each entry that wrote something.
 */
export function writesOf(method, fhirUrl, outcome, resource) {
  const status = getStatus(outcome);
  if (status >= 300) {
    return [];
  }
  const path = fhirUrl.split('?', 1)[0].replace(/^\/+/, '');
  if (method === 'DELETE') {
    const [type, id] = path.split('/');
    return type && id ? [{ interaction: 'delete', resource: { resourceType: type, id } }] : [];
  }
  if (method === 'POST' && path === '' && resource?.resourceType === 'Bundle') {
    const writes = [];
    for (const entry of resource.entry ?? []) {
      // 201 is a create; a 200 entry may be an update or a conditional create that found the
      // resource (no version written): the sandbox notifies creates only from transactions.
      if (entry?.resource?.id && String(entry?.response?.status ?? '').startsWith('201')) {
        writes.push({ interaction: 'create', resource: entry.resource });
      }
    }
    return writes;
  }
  if ((method === 'POST' || method === 'PUT' || method === 'PATCH') && resource?.id && resource.resourceType !== 'Bundle') {
    if (status === 201) {
      return [{ interaction: 'create', resource }];
    }
    // A conditional create that found the resource (200 to a POST) writes nothing.
    return method === 'POST' ? [] : [{ interaction: 'update', resource }];
  }
  return [];
}

export class Notifier {
  /**
   * @param {() => any} repo - the current repository (replaced by /__reset)
   * @param {(fn: () => Promise<any>) => Promise<any>} serialised - the server's write queue
   * @param {{ retryMs: number }} options - first pause between attempts (doubles each time)
   */
  constructor(repo, serialised, options) {
    this.repo = repo;
    this.serialised = serialised;
    this.retryMs = options.retryMs;
    this.generation = 0; // bumped by reset(): deliveries of an earlier generation stop
    this.stats = { deliveries: 0, failures: 0 };
  }

  reset() {
    this.generation++;
    this.stats = { deliveries: 0, failures: 0 };
  }

  /** Schedule notifications for what a request wrote (never delays or fails the request). */
  async notify(writes) {
    const relevant = writes.filter((w) => w.resource.resourceType !== 'AuditEvent' && w.resource.resourceType !== 'Subscription');
    if (relevant.length === 0) {
      return;
    }
    const repo = this.repo();
    if (!repo.resources.get('Subscription')?.size) {
      return; // the common case in tests and benchmarks: no extra step in the write queue
    }
    const subscriptions = await this.serialised(() =>
      repo.searchResources(parseSearchRequest('Subscription?status=active&_count=1000'))
    );
    const generation = this.generation;
    for (const { interaction, resource } of relevant) {
      for (const subscription of subscriptions) {
        if (subscription.channel?.type !== 'rest-hook' || !subscription.channel?.endpoint || !allows(subscription, interaction)) {
          continue;
        }
        let matches = false;
        try {
          const search = parseSearchRequest(subscription.criteria ?? '');
          matches = search.resourceType === resource.resourceType && (interaction === 'delete' || matchesSearchRequest(resource, search));
        } catch {
          matches = false; // Medplum logs and skips criteria it cannot evaluate
        }
        if (matches) {
          setImmediate(() => this.deliver(generation, subscription, interaction, resource, 1));
        }
      }
    }
  }

  async deliver(generation, subscription, interaction, resource, attempt) {
    if (generation !== this.generation) {
      return;
    }
    const body = interaction === 'delete' ? '{}' : JSON.stringify(resource);
    const headers = {
      'Content-Type': 'application/fhir+json',
      'X-Medplum-Subscription': subscription.id,
      'X-Medplum-Interaction': interaction,
    };
    if (interaction === 'delete') {
      headers['X-Medplum-Deleted-Resource'] = `${resource.resourceType}/${resource.id}`;
    }
    for (const line of subscription.channel.header ?? []) {
      const colon = line.indexOf(':');
      if (colon > 0) {
        headers[line.slice(0, colon).trim()] = line.slice(colon + 1).trim();
      }
    }
    const secret = SECRET_URLS.map((url) => extensionValues(subscription, url)[0]).find((v) => typeof v === 'string' && v);
    if (secret) {
      headers['X-Signature'] = createHmac('sha256', secret).update(body).digest('hex');
    }
    const started = new Date().toISOString();
    let desc;
    let ok = false;
    try {
      const response = await fetch(subscription.channel.endpoint, {
        method: 'POST',
        headers,
        body,
        signal: AbortSignal.timeout(REQUEST_TIMEOUT_MS),
      });
      await response.arrayBuffer().catch(() => undefined);
      ok = response.status >= 200 && response.status < 300;
      desc = `Attempt ${attempt} received status ${response.status}`;
    } catch (err) {
      desc = `Attempt ${attempt} received error ${err?.name ?? 'Error'}`;
    }
    if (generation !== this.generation) {
      return;
    }
    this.stats.deliveries++;
    if (!ok) {
      this.stats.failures++;
    }
    await this.audit(subscription, resource, started, ok ? '0' : '4', desc).catch(() => undefined);
    const maxAttempts = extensionValues(subscription, MAX_ATTEMPTS_URL)[0] ?? DEFAULT_ATTEMPTS;
    if (!ok && attempt < maxAttempts) {
      const pause = this.retryMs * 2 ** (attempt - 1);
      setTimeout(() => this.deliver(generation, subscription, interaction, resource, attempt + 1), pause);
    }
  }

  audit(subscription, resource, started, outcome, outcomeDesc) {
    const repo = this.repo();
    const entity = [{ what: createReference(subscription), role: { code: '9', display: 'Subscriber' } }];
    if (resource.id) {
      entity.unshift({ what: { reference: `${resource.resourceType}/${resource.id}` }, role: { code: '4', display: 'Domain' } });
    }
    const now = new Date().toISOString();
    return this.serialised(() =>
      repo.createResource({
        resourceType: 'AuditEvent',
        type: { code: 'transmit' },
        period: { start: started, end: now },
        recorded: now,
        agent: [{ type: { text: 'Subscription' }, requestor: false }],
        source: { observer: createReference(subscription) },
        entity,
        outcome,
        outcomeDesc,
      })
    );
  }
}
