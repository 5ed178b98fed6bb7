"""Validates OCSF records against the official OCSF JSON Schema of their class.

Reads JSON Lines on stdin, one record per line. For each record, generates the JSON Schema of
its class (`class_uid`) at its `metadata.version` with the profiles in `metadata.profiles`
(PyPI `ocsf-json-schema`) and checks the record with PyPI `jsonschema` (Draft 2020-12).
Prints one line per invalid record (`line N: <path>: <message>`) and exits 1 if any is
invalid, 0 if all are valid, 2 if the input or the tools are unusable.
"""

import json
import sys

try:
    import jsonschema
    from ocsf_json_schema import OcsfJsonSchemaEmbedded, get_ocsf_schema
except ImportError as e:
    print(f"cannot import the OCSF validator ({e}): run `cargo xtask setup`", file=sys.stderr)
    sys.exit(2)

schemas = {}
validators = {}


def validator(version, class_uid, profiles):
    key = (version, class_uid, tuple(sorted(profiles)))
    if key not in validators:
        if version not in schemas:
            schemas[version] = OcsfJsonSchemaEmbedded(get_ocsf_schema(version=version))
        ocsf = schemas[version]
        name = ocsf.lookup_class_name_from_uid(class_uid=class_uid)
        schema = ocsf.get_class_schema(class_name=name, profiles=list(profiles))
        validators[key] = jsonschema.Draft202012Validator(schema)
    return validators[key]


def main():
    invalid = 0
    count = 0
    for n, line in enumerate(sys.stdin, start=1):
        if not line.strip():
            continue
        count += 1
        try:
            record = json.loads(line)
            meta = record["metadata"]
            v = validator(meta["version"], record["class_uid"], meta.get("profiles", []))
        except Exception as e:  # noqa: BLE001 - any failure here makes the record invalid
            print(f"line {n}: not an OCSF record this validator can place: {e!r}")
            invalid += 1
            continue
        errors = sorted(v.iter_errors(record), key=lambda e: list(e.absolute_path))
        for e in errors:
            path = "/".join(str(p) for p in e.absolute_path) or "(record)"
            print(f"line {n}: {path}: {e.message}")
        invalid += bool(errors)
    if count == 0:
        print("no records on stdin", file=sys.stderr)
        sys.exit(2)
    sys.exit(1 if invalid else 0)


main()
