// Interop test: the official Node service client (azure-iot-provisioning-service) manages
// enrollments and enrollment groups on dps-server with the printed connection string.
// Run by softhsm-tests/tests/node_service_client.rs with DPS_CONNECTION_STRING set and the
// server's CA in NODE_EXTRA_CA_CERTS. Exits non-zero on the first failed check.
'use strict';

const assert = require('node:assert/strict');
const { ProvisioningServiceClient } = require('azure-iot-provisioning-service');

const client = ProvisioningServiceClient.fromConnectionString(process.env.DPS_CONNECTION_STRING);

// Promise results are { responseBody, httpResponse } in this client.
const step = (name) => console.error(`step: ${name}`);

// An unsettled promise would let Node exit 0 with work left undone; refuse that.
let finished = false;
process.on('exit', (code) => {
  if (code === 0 && !finished) {
    console.error('node service client interop FAILED: exited before finishing (a call never answered)');
    process.exitCode = 1;
  }
});

const body = (result) => (result && result.responseBody !== undefined ? result.responseBody : result);

async function expectStatus(promise, status) {
  try {
    await promise;
  } catch (err) {
    const actual = err.response && err.response.statusCode;
    assert.equal(actual, status, `expected HTTP ${status}, got ${actual}: ${err.message}`);
    return err;
  }
  assert.fail(`expected HTTP ${status}, the call succeeded`);
}

async function drain(query) {
  const items = [];
  let pages = 0;
  while (query.hasMoreResults) {
    // next() without an argument forgets the continuation token (it overwrites it with
    // undefined), so hand the token back explicitly.
    items.push(...body(await query.next(query.continuationToken)));
    pages += 1;
    assert.ok(pages <= 20, 'paging does not end');
  }
  return { items, pages };
}

async function individualEnrollments() {
  step('client.createOrUpdateIndividualEnrollment');
  const created = body(await client.createOrUpdateIndividualEnrollment({
    registrationId: 'node-dev-1',
    attestation: { type: 'symmetricKey', symmetricKey: {} },
    initialTwin: { tags: { line: '7' }, properties: { desired: { rate: 5 } } },
    credentialPolicyName: 'default',
  }));
  assert.equal(created.registrationId, 'node-dev-1');
  // Azure's timestamps carry seven fractional digits.
  assert.match(created.createdDateTimeUtc, /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{7}Z$/);
  assert.ok(created.attestation.symmetricKey.primaryKey, 'generated keys are returned on create');
  assert.ok(created.etag);

  step('client.getIndividualEnrollment');
  const read = body(await client.getIndividualEnrollment('node-dev-1'));
  assert.equal(read.etag, created.etag);
  assert.equal(read.attestation.symmetricKey.primaryKey, undefined, 'keys are hidden on GET');
  // A device that never registered: Azure's unassigned state; newer fields kept.
  assert.deepEqual(read.registrationState, { registrationId: 'node-dev-1', status: 'unassigned' });
  assert.equal(read.credentialPolicyName, 'default');

  // Update with the etag the client read (the client sends it as If-Match).
  read.provisioningStatus = 'disabled';
  step('client.createOrUpdateIndividualEnrollment');
  const updated = body(await client.createOrUpdateIndividualEnrollment(read));
  assert.equal(updated.provisioningStatus, 'disabled');
  assert.notEqual(updated.etag, created.etag);
  assert.equal(updated.credentialPolicyName, 'default', 'a GET-then-PUT keeps the newer fields');

  // A stale etag is refused; so is a create over an existing id.
  step('client.createOrUpdateIndividualEnrollment');
  await expectStatus(client.createOrUpdateIndividualEnrollment(read), 412);
  step('client.createOrUpdateIndividualEnrollment');
  await expectStatus(client.createOrUpdateIndividualEnrollment({
    registrationId: 'node-dev-1', attestation: { type: 'symmetricKey' },
  }), 409);

  step('client.getIndividualEnrollmentAttestationMechanism');
  const mechanism = body(await client.getIndividualEnrollmentAttestationMechanism('node-dev-1'));
  assert.equal(mechanism.symmetricKey.primaryKey, created.attestation.symmetricKey.primaryKey);

  step('client.runBulkEnrollmentOperation');
  // azure-iot-provisioning-service 1.11.2 settles runBulkEnrollmentOperation only when given a
  // callback (its promise form never resolves), so call it the callback way.
  const bulk = await new Promise((resolve, reject) => client.runBulkEnrollmentOperation({
    mode: 'create',
    enrollments: [
      { registrationId: 'node-dev-2', attestation: { type: 'symmetricKey' } },
      { registrationId: 'node-dev-3', attestation: { type: 'symmetricKey' } },
    ],
  }, (err, result) => (err ? reject(err) : resolve(result))));
  assert.equal(bulk.isSuccessful, true, JSON.stringify(bulk));

  step('client.createIndividualEnrollmentQuery');
  const { items, pages } = await drain(client.createIndividualEnrollmentQuery({ query: 'SELECT * FROM enrollments' }, 2));
  assert.deepEqual(items.map((e) => e.registrationId), ['node-dev-1', 'node-dev-2', 'node-dev-3']);
  assert.equal(pages, 2, 'two pages of at most two');
  // A page larger than the server's limit is clamped, not refused (az --top 2000).
  const large = await drain(client.createIndividualEnrollmentQuery({ query: 'SELECT * FROM enrollments' }, 5000));
  assert.equal(large.items.length, 3);
  assert.equal(large.pages, 1);

  step('client.deleteIndividualEnrollment');
  await client.deleteIndividualEnrollment(updated);
  step('client.getIndividualEnrollment');
  await expectStatus(client.getIndividualEnrollment('node-dev-1'), 404);
  // A bulk delete names its items by id only.
  step('client.runBulkEnrollmentOperation');
  const deleted = await new Promise((resolve, reject) => client.runBulkEnrollmentOperation({
    mode: 'delete',
    enrollments: [{ registrationId: 'node-dev-2' }, { registrationId: 'node-dev-3' }],
  }, (err, result) => (err ? reject(err) : resolve(result))));
  assert.equal(deleted.isSuccessful, true, JSON.stringify(deleted));
  step('client.getIndividualEnrollment');
  await expectStatus(client.getIndividualEnrollment('node-dev-2'), 404);
  await expectStatus(client.getIndividualEnrollment('node-dev-3'), 404);
}

async function enrollmentGroups() {
  step('client.createOrUpdateEnrollmentGroup');
  const created = body(await client.createOrUpdateEnrollmentGroup({
    enrollmentGroupId: 'node-group',
    attestation: { type: 'symmetricKey', symmetricKey: {} },
    reprovisionPolicy: { updateHubAssignment: true, migrateDeviceData: false },
  }));
  assert.ok(created.attestation.symmetricKey.secondaryKey);

  step('client.getEnrollmentGroup');
  const read = body(await client.getEnrollmentGroup('node-group'));
  assert.equal(read.etag, created.etag);
  assert.equal(read.reprovisionPolicy.migrateDeviceData, false);

  read.provisioningStatus = 'disabled';
  step('client.createOrUpdateEnrollmentGroup');
  const updated = body(await client.createOrUpdateEnrollmentGroup(read));
  assert.equal(updated.provisioningStatus, 'disabled');
  step('client.createOrUpdateEnrollmentGroup');
  await expectStatus(client.createOrUpdateEnrollmentGroup(read), 412);

  // The client sends this one to /enrollmentgroups/... in lower case.
  step('client.getEnrollmentGroupAttestationMechanism');
  const mechanism = body(await client.getEnrollmentGroupAttestationMechanism('node-group'));
  assert.equal(mechanism.symmetricKey.primaryKey, created.attestation.symmetricKey.primaryKey);

  step('client.createEnrollmentGroupQuery');
  const { items } = await drain(client.createEnrollmentGroupQuery({ query: '*' }));
  assert.deepEqual(items.map((g) => g.enrollmentGroupId), ['node-group']);

  step('drain');
  const registrations = await drain(
    client.createEnrollmentGroupDeviceRegistrationStateQuery({ query: '*' }, 'node-group'));
  assert.deepEqual(registrations.items, []);

  step('client.deleteEnrollmentGroup');
  await client.deleteEnrollmentGroup(updated);
  step('client.getEnrollmentGroup');
  await expectStatus(client.getEnrollmentGroup('node-group'), 404);
}

(async () => {
  await individualEnrollments();
  await enrollmentGroups();
  finished = true;
  console.log('node service client interop: all checks passed');
})().catch((err) => {
  console.error('node service client interop FAILED:', err && err.stack ? err.stack : err);
  process.exit(1);
});
