// The device transport the interop scripts use, chosen by DPS_TRANSPORT: http
// (https://{host}:443), mqtt (mqtts://{host}:8883) or mqtt-ws (wss://{host}:443/$iothub/websocket).
'use strict';

const assert = require('node:assert/strict');
const { Http } = require('azure-iot-provisioning-device-http');
const { Mqtt, MqttWs } = require('azure-iot-provisioning-device-mqtt');

module.exports = function transport() {
  const name = process.env.DPS_TRANSPORT || 'http';
  switch (name) {
    case 'http':
      return new Http();
    case 'mqtt':
      return new Mqtt();
    case 'mqtt-ws':
      return new MqttWs();
    default:
      assert.fail(`unknown DPS_TRANSPORT ${name}`);
  }
};
