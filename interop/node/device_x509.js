// Interop test: the official Node device SDK (azure-iot-provisioning-device over HTTP, MQTT or
// MQTT over WebSockets (transport.js), with azure-iot-security-x509) registers devices by X.509: one
// through an individual enrollment (a self-signed certificate), one through an enrollment
// group anchored at an intermediate (the PEM file holds the leaf and the intermediate, and
// Node's TLS sends both). A certificate nobody enrolled is refused.
// Run by softhsm-tests/tests/node_device_client.rs; exits non-zero on the first failed check.
'use strict';

const assert = require('node:assert/strict');
const fs = require('node:fs');
const { ProvisioningDeviceClient } = require('azure-iot-provisioning-device');
const transport = require('./transport');
const { X509Security } = require('azure-iot-security-x509');

const env = (name) => {
  const value = process.env[name];
  assert.ok(value, `${name} is not set`);
  return value;
};

let finished = false;
process.on('exit', (code) => {
  if (code === 0 && !finished) {
    console.error('node x509 interop FAILED: exited before finishing (a call never answered)');
    process.exitCode = 1;
  }
});

function register(registrationId, prefix) {
  const security = new X509Security(registrationId, {
    cert: fs.readFileSync(env(`${prefix}_CERT`), 'utf8'),
    key: fs.readFileSync(env(`${prefix}_KEY`), 'utf8'),
  });
  const client = ProvisioningDeviceClient.create(env('DPS_HOST'), env('DPS_ID_SCOPE'), transport(), security);
  return client.register();
}

(async () => {
  const hub = env('DPS_EXPECTED_HUB');

  const individual = await register(env('DPS_INDIVIDUAL_ID'), 'DPS_INDIVIDUAL');
  assert.equal(individual.assignedHub, hub);
  assert.equal(individual.deviceId, env('DPS_INDIVIDUAL_ID'));
  console.error(`individual: ${individual.registrationId} -> ${individual.assignedHub}/${individual.deviceId}`);

  const member = await register(env('DPS_MEMBER_ID'), 'DPS_MEMBER');
  assert.equal(member.assignedHub, hub);
  assert.equal(member.deviceId, env('DPS_MEMBER_ID'));
  console.error(`group member: ${member.registrationId} -> ${member.assignedHub}/${member.deviceId}`);

  await assert.rejects(register(env('DPS_STRANGER_ID'), 'DPS_STRANGER'));

  finished = true;
  console.log('node x509 interop: all checks passed');
})().catch((err) => {
  console.error('node x509 interop FAILED:', err && err.stack ? err.stack : String(err).slice(0, 2000));
  process.exit(1);
});
