"""Derives fhir-profiles/summary-elements.json from the StructureDefinitions in
Bundle-resources.json of the npm package hl7.fhir.r4.examples@4.0.1 (CC0-1.0):

    npm pack hl7.fhir.r4.examples@4.0.1
    tar -xzf hl7.fhir.r4.examples-4.0.1.tgz package/Bundle-resources.json
    python3 fhir-profiles/derive_summary_elements.py package/Bundle-resources.json \
        > fhir-profiles/summary-elements.json

For every resource type: its top-level elements flagged isSummary (what `_summary=true`
keeps) and its top-level mandatory elements, min >= 1 (what `_summary=text` keeps beside
text, id and meta). Choice elements keep their `[x]` name.
"""
import json
import sys

bundle = json.load(open(sys.argv[1]))
out = {}
for entry in bundle["entry"]:
    sd = entry["resource"]
    if sd.get("resourceType") != "StructureDefinition" or sd.get("kind") != "resource":
        continue
    if sd.get("abstract"):
        continue
    summary, mandatory = [], []
    for e in sd["snapshot"]["element"]:
        path = e["path"]
        if path.count(".") != 1:
            continue
        name = path.split(".", 1)[1]
        if e.get("isSummary"):
            summary.append(name)
        if e.get("min", 0) >= 1:
            mandatory.append(name)
    out[sd["type"]] = {"summary": summary, "mandatory": mandatory}
json.dump(out, sys.stdout, indent=0, sort_keys=True)
sys.stdout.write("\n")
