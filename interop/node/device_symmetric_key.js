// Interop test: the official Node device SDK (azure-iot-provisioning-device with the HTTP
// or MQTT transport and azure-iot-security-symmetric-key) registers devices with dps-server through
// an individual enrollment and through an enrollment group. The group member's key is derived
// here with Node's crypto, independently of the server.
// Run by softhsm-tests/tests/node_device_client.rs; exits non-zero on the first failed check.
'use strict';

const assert = require('node:assert/strict');
const crypto = require('node:crypto');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const transport = require('./transport');
const { SymmetricKeySecurityClient } = require('azure-iot-security-symmetric-key');

const env = (name) => {
  const value = process.env[name];
  assert.ok(value, `${name} is not set`);
  return value;
};

let finished = false;
process.on('exit', (code) => {
  if (code === 0 && !finished) {
    console.error('node device interop FAILED: exited before finishing (a call never answered)');
    process.exitCode = 1;
  }
});

async function register(registrationId, key, payload) {
  const security = new SymmetricKeySecurityClient(registrationId, key);
  const client = ProvisioningDeviceClient.create(env('DPS_HOST'), env('DPS_ID_SCOPE'), transport(), security);
  if (payload) {
    client.setProvisioningPayload(payload);
  }
  return client.register();
}

(async () => {
  const hub = env('DPS_EXPECTED_HUB');

  const individual = await register(env('DPS_INDIVIDUAL_ID'), env('DPS_INDIVIDUAL_KEY'), { modelId: 'dtmi:test;1' });
  assert.equal(individual.assignedHub, hub);
  assert.equal(individual.deviceId, env('DPS_INDIVIDUAL_DEVICE_ID'));
  console.error(`individual: ${individual.registrationId} -> ${individual.assignedHub}/${individual.deviceId}`);

  const memberId = 'node-group-member-1';
  const derived = crypto
    .createHmac('SHA256', Buffer.from(env('DPS_GROUP_KEY'), 'base64'))
    .update(memberId, 'utf8')
    .digest('base64');
  const member = await register(memberId, derived);
  assert.equal(member.assignedHub, hub);
  assert.equal(member.deviceId, memberId);
  console.error(`group member: ${member.registrationId} -> ${member.assignedHub}/${member.deviceId}`);

  // A wrong key is refused.
  await assert.rejects(register('node-group-member-2', crypto.randomBytes(32).toString('base64')));

  finished = true;
  console.log('node device interop: all checks passed');
})().catch((err) => {
  console.error('node device interop FAILED:', err && err.stack ? err.stack : err);
  process.exit(1);
});
