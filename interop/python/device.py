"""Interop test: the official Python device SDK (azure-iot-device, ProvisioningDeviceClient),
which provisions only over MQTT (8883, TLS 1.2, host name checked), registers devices with
dps-server: by symmetric key (an individual enrollment and a group member whose key is derived
here) and by X.509 (an individual enrollment). A wrong key is refused.
Run by softhsm-tests/tests/python_device_client.rs; exits non-zero on the first failed check.
"""

import base64
import hashlib
import hmac
import os
import sys

from azure.iot.device import ProvisioningDeviceClient, X509


def env(name):
    value = os.environ.get(name)
    assert value, f"{name} is not set"
    return value


HOST = env("DPS_HOST")
SCOPE = env("DPS_ID_SCOPE")
CA = open(env("DPS_CA_CERT"), encoding="utf-8").read()
HUB = env("DPS_EXPECTED_HUB")
WEBSOCKETS = os.environ.get("DPS_WEBSOCKETS") == "1"


def by_key(registration_id, key):
    client = ProvisioningDeviceClient.create_from_symmetric_key(
        provisioning_host=HOST,
        registration_id=registration_id,
        id_scope=SCOPE,
        symmetric_key=key,
        server_verification_cert=CA,
        websockets=WEBSOCKETS,
    )
    return client.register()


def by_certificate(registration_id, cert_file, key_file):
    client = ProvisioningDeviceClient.create_from_x509_certificate(
        provisioning_host=HOST,
        registration_id=registration_id,
        id_scope=SCOPE,
        x509=X509(cert_file=cert_file, key_file=key_file),
        server_verification_cert=CA,
        websockets=WEBSOCKETS,
    )
    return client.register()


def expect_assigned(result, registration_id):
    assert result.status == "assigned", f"{registration_id}: {result}"
    state = result.registration_state
    assert state.assigned_hub == HUB, f"{registration_id}: {state}"
    assert state.device_id == registration_id, f"{registration_id}: {state}"
    print(f"{registration_id} -> {state.assigned_hub}/{state.device_id}", file=sys.stderr)


def main():
    individual = env("DPS_INDIVIDUAL_ID")
    expect_assigned(by_key(individual, env("DPS_INDIVIDUAL_KEY")), individual)

    member = "python-group-member-1"
    group_key = base64.b64decode(env("DPS_GROUP_KEY"))
    derived = base64.b64encode(
        hmac.new(group_key, member.encode("utf-8"), hashlib.sha256).digest()
    ).decode()
    expect_assigned(by_key(member, derived), member)

    x509 = env("DPS_X509_ID")
    expect_assigned(
        by_certificate(x509, env("DPS_X509_CERT"), env("DPS_X509_KEY")), x509
    )

    wrong = base64.b64encode(os.urandom(32)).decode()
    try:
        result = by_key("python-group-member-2", wrong)
    except Exception as refused:  # the SDK raises on a 401
        print(f"wrong key refused: {type(refused).__name__}", file=sys.stderr)
    else:
        raise AssertionError(f"a wrong key registered: {result}")

    print("python device interop: all checks passed")


if __name__ == "__main__":
    main()
