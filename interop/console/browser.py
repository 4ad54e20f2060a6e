"""The admin console in a real browser: headless Chromium driven over WebDriver (selenium).

Signs in with a connection string, creates an enrollment, reads its keys, registers the device
over HTTPS with them, sees the registration appear in the live event table, disables the
enrollment, and finds both changes and the key read in the audit log. A screenshot of each page
is written to --shots. Prints a JSON summary; exits non-zero on the first failed expectation.

Run by softhsm-tests/tests/console_browser.rs; the browser accepts the test server's
self-signed development CA (acceptInsecureCerts), the device calls check it (--ca).
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import sys
import time
import urllib.parse

import requests
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.support.ui import WebDriverWait

DEVICE = "console-dev-1"
HUB = "hub-a.example.com"


def device_token(scope, registration_id, key_b64, lifetime=3600):
    resource = urllib.parse.quote(f"{scope}/registrations/{registration_id}", safe="")
    expiry = int(time.time()) + lifetime
    signed = hmac.new(base64.b64decode(key_b64), f"{resource}\n{expiry}".encode(), hashlib.sha256)
    sig = urllib.parse.quote(base64.b64encode(signed.digest()).decode(), safe="")
    return f"SharedAccessSignature sr={resource}&sig={sig}&se={expiry}&skn=registration"


def register(base, scope, registration_id, key, ca):
    auth = {"Authorization": device_token(scope, registration_id, key)}
    url = f"{base}/{scope}/registrations/{registration_id}"
    answer = requests.put(f"{url}/register?api-version=2021-06-01", json={"registrationId": registration_id},
                          headers=auth, verify=ca, timeout=30)
    answer.raise_for_status()
    operation = answer.json()
    for _ in range(100):
        if operation.get("status") not in ("assigning", None):
            return operation
        time.sleep(0.1)
        answer = requests.get(f"{url}/operations/{operation['operationId']}?api-version=2021-06-01",
                              headers=auth, verify=ca, timeout=30)
        answer.raise_for_status()
        operation = answer.json()
    raise AssertionError(f"the registration did not finish: {operation}")


def expect(condition, what):
    if not condition:
        raise AssertionError(what)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", required=True)
    parser.add_argument("--connection-string", required=True)
    parser.add_argument("--id-scope", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--shots", required=True)
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("--chromedriver", default="/usr/bin/chromedriver")
    args = parser.parse_args()
    os.makedirs(args.shots, exist_ok=True)

    options = Options()
    options.binary_location = args.chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000"):
        options.add_argument(flag)
    options.accept_insecure_certs = True
    driver = webdriver.Chrome(service=Service(args.chromedriver), options=options)
    # A click that submits a form loads a new page: an element found just before it is then
    # stale, and the next poll finds it again on the new page.
    wait = WebDriverWait(driver, 30, ignored_exceptions=(StaleElementReferenceException,))
    shots = []

    def shot(name):
        path = os.path.join(args.shots, f"{len(shots) + 1:02d}-{name}.png")
        driver.save_screenshot(path)
        shots.append(path)

    def go(path):
        driver.get(args.base + path)

    def page_text():
        return driver.find_element(By.TAG_NAME, "body").text

    try:
        go("/console")
        expect("Sign in" in driver.title, f"the sign-in page: {driver.title}")
        shot("sign-in")
        driver.find_element(By.NAME, "connectionString").send_keys(args.connection_string)
        driver.find_element(By.ID, "sign-in").click()
        wait.until(lambda d: "Overview" in d.title)
        expect(args.id_scope in page_text(), "the overview shows the ID scope")
        expect(HUB in page_text(), "the overview lists the hub")
        shot("overview")

        go("/console/enrollments")
        form = driver.find_element(By.ID, "create")
        form.find_element(By.NAME, "id").send_keys(DEVICE)
        form.find_element(By.NAME, "hubs").send_keys(HUB)
        form.submit()
        wait.until(lambda d: DEVICE in d.title)
        expect(driver.find_element(By.ID, "status").text == "enabled", "a new enrollment is enabled")
        shot("enrollment")
        driver.find_element(By.ID, "show-keys").click()
        wait.until(lambda d: d.find_elements(By.ID, "keys"))
        keys = json.loads(driver.find_element(By.ID, "keys").text)
        primary = keys["symmetricKey"]["primaryKey"]
        shot("keys")

        go("/console/enrollments?q=console-dev")
        expect(DEVICE in page_text(), "the search finds the enrollment")
        shot("enrollments")

        go("/console/events")
        wait.until(lambda d: d.find_element(By.ID, "events").get_attribute("data-state") == "open")
        operation = register(args.base, args.id_scope, DEVICE, primary, args.ca)
        expect(operation["status"] == "assigned", f"the device is assigned: {operation}")
        wait.until(lambda d: any(DEVICE in row.text and "registration.assigned" in row.text
                                 for row in d.find_elements(By.CSS_SELECTOR, "#events tr.live")))
        shot("events")

        go(f"/console/registrations?id={DEVICE}")
        expect("assigned" in page_text() and HUB in page_text(), "the registration state")
        shot("registrations")

        go(f"/console/enrollments/{DEVICE}")
        driver.find_element(By.ID, "disable").click()
        wait.until(lambda d: d.find_element(By.ID, "status").text == "disabled")
        shot("disabled")

        go(f"/console/audit?resourceKind=enrollment&resourceId={DEVICE}")
        rows = [row.text for row in driver.find_elements(By.CSS_SELECTOR, "#audit tr")[1:]]
        actions = [row.split()[1] for row in rows]
        expect(actions[:3] == ["create", "readKeys", "update"], f"the audit entries: {rows}")
        expect("provisioningStatus: enabled → disabled" in page_text(), "the change is shown")
        expect(primary not in driver.page_source, "no key in the audit log")
        shot("audit")

        for path, name in (("/console/hubs", "hubs"), ("/console/enrollmentGroups", "groups"),
                           ("/console/certificates", "certificates"), ("/console/simulate", "simulate")):
            go(path)
            expect("DPS console" in driver.title, f"{path} renders: {driver.title}")
            shot(name)
        driver.find_element(By.NAME, "registrationId").send_keys(DEVICE)
        driver.find_element(By.ID, "simulate").click()
        wait.until(lambda d: d.find_elements(By.ID, "result"))
        expect(HUB in driver.find_element(By.ID, "result").text, "the dry-run names the hub")
        shot("simulated")
    except Exception:
        shot("failure")
        print(json.dumps({"ok": False, "url": driver.current_url, "page": page_text()[:4000], "shots": shots}))
        raise
    finally:
        driver.quit()
    print(json.dumps({"ok": True, "shots": shots}))


if __name__ == "__main__":
    sys.exit(main())
