"""Drives a running fhirstore server with fhirpy, a FHIR client from PyPI.

Usage: fhirpy_check.py BASE_URL   (for example http://127.0.0.1:18080/fhir/client-test)
Exits non-zero, with the failing check named, when the client and the server disagree.
"""
import sys
import uuid

from fhirpy import SyncFHIRClient
from fhirpy.base.exceptions import ResourceNotFound

base = sys.argv[1]
client = SyncFHIRClient(base, extra_headers={"Content-Type": "application/fhir+json"})
tag = uuid.uuid4().hex


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


# create and read
p = client.resource(
    "Patient",
    identifier=[{"system": "urn:fhirpy-check", "value": tag}],
    name=[{"family": "Chalmers", "given": ["Peter"]}],
    gender="male",
)
p.save()
check(p.id and p["meta"]["versionId"] == "1", "create assigns an id and version 1")
got = client.reference("Patient", p.id).to_resource()
check(got["name"][0]["family"] == "Chalmers", "read returns what was created")

# update
got["gender"] = "other"
got.save()
again = client.resources("Patient").search(_id=p.id).first()
check(again["gender"] == "other" and again["meta"]["versionId"] == "2", "update makes version 2")

# search with paging: 23 patients, pages of 5, fhirpy follows the next links
family = f"Paging{tag[:8]}"
for i in range(23):
    client.resource("Patient", name=[{"family": family, "given": [f"n{i}"]}]).save()
pages = client.resources("Patient").search(family=family).limit(5)
seen = [r.id for r in pages]
check(len(seen) == 23 and len(set(seen)) == 23, "paging through next links yields all 23, once each")
check(client.resources("Patient").search(family=family).count() == 23, "count() agrees")

# a transaction Bundle with urn:uuid references
pid = f"urn:uuid:{uuid.uuid4()}"
bundle = {
    "resourceType": "Bundle",
    "type": "transaction",
    "entry": [
        {
            "fullUrl": pid,
            "resource": {"resourceType": "Patient", "name": [{"family": "Tx" + tag[:6]}]},
            "request": {"method": "POST", "url": "Patient"},
        },
        {
            "resource": {
                "resourceType": "Observation",
                "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": "8867-4"}]},
                "subject": {"reference": pid},
            },
            "request": {"method": "POST", "url": "Observation"},
        },
    ],
}
resp = client.execute("/", method="post", data=bundle)
check(resp["type"] == "transaction-response" and len(resp["entry"]) == 2, "transaction response")
check(all(e["response"]["status"].startswith("201") for e in resp["entry"]), "both entries created")
patient_ref = resp["entry"][0]["response"]["location"].split("/_history")[0]
obs = client.resources("Observation").search(subject=patient_ref).fetch()
check(len(obs) == 1 and obs[0]["subject"]["reference"] == patient_ref, "urn:uuid resolved to the new Patient")

# delete
client.reference("Patient", p.id).to_resource().delete()
try:
    client.reference("Patient", p.id).to_resource()
    check(False, "a deleted resource is gone")
except ResourceNotFound:
    check(True, "a deleted resource is gone")
check(client.resources("Patient").search(_id=p.id).count() == 0, "search no longer finds it")
print("fhirpy: all checks passed")
