# Checks keda-scaledobject.yaml against the fields of KEDA's v1alpha1
# ScaledObject CRD (KEDA 2.x; the spec part of its openAPIV3Schema, copied
# here), rejecting any field the CRD does not define. KEDA is not installed
# here, so this stands in for a server-side dry run.
# Run: python3 check_scaledobject.py keda-scaledobject.yaml
import sys, yaml, jsonschema
i32 = {"type": "integer"}
policy = {"type": "object", "additionalProperties": False, "required": ["periodSeconds", "type", "value"],
          "properties": {"periodSeconds": i32, "type": {"type": "string"}, "value": i32}}
rules = {"type": "object", "additionalProperties": False, "properties": {
    "policies": {"type": "array", "items": policy}, "selectPolicy": {"type": "string"},
    "stabilizationWindowSeconds": i32}}
spec = {"type": "object", "additionalProperties": False, "required": ["scaleTargetRef", "triggers"], "properties": {
    "advanced": {"type": "object", "additionalProperties": False, "properties": {
        "horizontalPodAutoscalerConfig": {"type": "object", "additionalProperties": False, "properties": {
            "behavior": {"type": "object", "additionalProperties": False,
                         "properties": {"scaleDown": rules, "scaleUp": rules}}}},
        "restoreToOriginalReplicaCount": {"type": "boolean"}}},
    "cooldownPeriod": i32, "idleReplicaCount": i32, "maxReplicaCount": i32, "minReplicaCount": i32,
    "pollingInterval": i32,
    "fallback": {"type": "object", "required": ["failureThreshold", "replicas"],
                 "properties": {"failureThreshold": i32, "replicas": i32}},
    "scaleTargetRef": {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
        "apiVersion": {"type": "string"}, "envSourceContainerName": {"type": "string"},
        "kind": {"type": "string"}, "name": {"type": "string"}}},
    "triggers": {"type": "array", "items": {"type": "object", "additionalProperties": False,
        "required": ["metadata", "type"], "properties": {
            "authenticationRef": {"type": "object", "required": ["name"]},
            "metadata": {"type": "object", "additionalProperties": {"type": "string"}},
            "metricType": {"enum": ["Value", "AverageValue", "Utilization"]},
            "name": {"type": "string"}, "type": {"type": "string"}}}}}}
schema = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
    "apiVersion": {"const": "keda.sh/v1alpha1"}, "kind": {"const": "ScaledObject"},
    "metadata": {"type": "object"}, "spec": spec}}
ok = True
for doc in yaml.safe_load_all(open(sys.argv[1])):
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(doc))
    for e in errors:
        ok = False
        print("ERROR", list(e.absolute_path), e.message)
    if not errors:
        print("passed", doc["kind"], doc["metadata"]["name"])
    for t in doc["spec"]["triggers"]:
        assert t["type"] == "prometheus" and {"serverAddress", "query", "threshold"} <= t["metadata"].keys()
sys.exit(0 if ok else 1)
