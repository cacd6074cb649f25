"""The Kubernetes example (docker/kubernetes/llamaproxy.yaml, shown in docs/kubernetes.md).

Parsed with PyYAML and checked against a JSON schema of the fields it uses, written from the
Kubernetes OpenAPI (io.k8s.api.*) field names and types: an unknown or misspelt field, a wrong type
or a missing required field fails, as ``kubectl apply --validate=strict`` would. Then what the
example promises: readiness on /readyz, liveness on the health port, a grace period that covers
preStop + DRAIN_TIMEOUT + STOP_TIMEOUT, the key file from the Secret, the image's non-root user, a
read-only root, and selectors that match the pods. No network, no cluster.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import jsonschema
import yaml
from twisted.trial.unittest import SynchronousTestCase

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "docker" / "kubernetes" / "llamaproxy.yaml"
DOC = ROOT / "docs" / "kubernetes.md"


def obj(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    """A closed object schema: only these properties."""
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


def array(items: dict[str, Any]) -> dict[str, Any]:
    return {"type": "array", "items": items}


STRING = {"type": "string"}
INT = {"type": "integer"}
BOOL = {"type": "boolean"}
INT_OR_STRING = {"type": ["integer", "string"]}
QUANTITY = {"type": ["string", "integer"], "pattern": r"^[0-9.]+(m|Ki|Mi|Gi|Ti|k|M|G|T)?$"}
LABELS = {"type": "object", "additionalProperties": STRING}
METADATA = obj({"name": STRING, "namespace": STRING, "labels": LABELS, "annotations": LABELS},
               ("name",))
LABEL_SELECTOR = obj({"matchLabels": LABELS})
HTTP_GET = obj({"path": STRING, "port": INT_OR_STRING, "scheme": STRING}, ("port",))
PROBE = obj({"httpGet": HTTP_GET, "initialDelaySeconds": INT, "periodSeconds": INT,
             "timeoutSeconds": INT, "failureThreshold": INT, "successThreshold": INT})
HANDLER = obj({"exec": obj({"command": array(STRING)}), "httpGet": HTTP_GET})
CONTAINER = obj({
    "name": STRING, "image": STRING,
    "imagePullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
    "args": array(STRING), "command": array(STRING),
    "ports": array(obj({"name": STRING, "containerPort": INT, "protocol": STRING},
                       ("containerPort",))),
    "env": array(obj({"name": STRING, "value": STRING}, ("name",))),
    "readinessProbe": PROBE, "livenessProbe": PROBE, "startupProbe": PROBE,
    "lifecycle": obj({"preStop": HANDLER, "postStart": HANDLER}),
    "resources": obj({"requests": {"type": "object", "additionalProperties": QUANTITY},
                      "limits": {"type": "object", "additionalProperties": QUANTITY}}),
    "securityContext": obj({
        "readOnlyRootFilesystem": BOOL, "allowPrivilegeEscalation": BOOL,
        "runAsNonRoot": BOOL, "runAsUser": INT, "runAsGroup": INT,
        "capabilities": obj({"drop": array(STRING), "add": array(STRING)}),
    }),
    "volumeMounts": array(obj({"name": STRING, "mountPath": STRING, "readOnly": BOOL,
                               "subPath": STRING}, ("name", "mountPath"))),
}, ("name", "image"))
VOLUME = obj({
    "name": STRING,
    "secret": obj({"secretName": STRING, "defaultMode": INT}),
    "persistentVolumeClaim": obj({"claimName": STRING, "readOnly": BOOL}, ("claimName",)),
    "emptyDir": obj({"medium": STRING, "sizeLimit": QUANTITY}),
}, ("name",))
POD_SPEC = obj({
    "terminationGracePeriodSeconds": INT,
    "securityContext": obj({"runAsNonRoot": BOOL, "runAsUser": INT, "runAsGroup": INT,
                            "fsGroup": INT}),
    "containers": {**array(CONTAINER), "minItems": 1},
    "volumes": array(VOLUME),
}, ("containers",))


def kind(api_version: str, name: str, spec: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    properties = {"apiVersion": {"const": api_version}, "kind": {"const": name},
                  "metadata": METADATA, **extra}
    if spec is not None:
        properties["spec"] = spec
    return obj(properties, ("apiVersion", "kind", "metadata"))


SCHEMAS = {
    "Secret": kind("v1", "Secret", None, type=STRING, stringData=LABELS, data=LABELS),
    "Deployment": kind("apps/v1", "Deployment", obj({
        "replicas": INT,
        "selector": LABEL_SELECTOR,
        "strategy": obj({"type": {"enum": ["RollingUpdate", "Recreate"]},
                         "rollingUpdate": obj({"maxUnavailable": INT_OR_STRING,
                                               "maxSurge": INT_OR_STRING})}),
        "template": obj({"metadata": obj({"labels": LABELS, "annotations": LABELS}),
                         "spec": POD_SPEC}, ("spec",)),
    }, ("selector", "template"))),
    "Service": kind("v1", "Service", obj({
        "selector": LABELS, "type": STRING,
        "ports": array(obj({"name": STRING, "port": INT, "targetPort": INT_OR_STRING,
                            "protocol": STRING}, ("port",))),
    })),
    "PodDisruptionBudget": kind("policy/v1", "PodDisruptionBudget", obj({
        "minAvailable": INT_OR_STRING, "maxUnavailable": INT_OR_STRING,
        "selector": LABEL_SELECTOR,
    }, ("selector",))),
}


def documents(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d is not None]


def validate(document: dict[str, Any]) -> None:
    schema = SCHEMAS.get(document.get("kind", ""))
    if schema is None:
        raise jsonschema.ValidationError(f"no schema for kind {document.get('kind')!r}")
    jsonschema.validate(document, schema)


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in docs}


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", [])}


class ManifestTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.docs = documents(MANIFEST.read_text())
        self.kinds = by_kind(self.docs)
        self.pod = self.kinds["Deployment"]["spec"]["template"]["spec"]
        (self.container,) = self.pod["containers"]
        self.env = env_of(self.container)

    def test_schema(self) -> None:
        self.assertEqual(sorted(self.kinds),
                         ["Deployment", "PodDisruptionBudget", "Secret", "Service"])
        for document in self.docs:
            validate(document)

    def test_schema_catches_mistakes(self) -> None:
        """The schema check itself fails on a misspelt field, a wrong type, a missing field."""
        deployment = self.kinds["Deployment"]
        bad_field = yaml.safe_load(yaml.safe_dump(deployment))
        bad_field["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
        bad_type = yaml.safe_load(yaml.safe_dump(deployment))
        bad_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "60"
        missing = yaml.safe_load(yaml.safe_dump(deployment))
        del missing["spec"]["template"]["spec"]["containers"][0]["image"]
        for broken in (bad_field, bad_type, missing):
            with self.assertRaises(jsonschema.ValidationError):
                validate(broken)

    def test_probes(self) -> None:
        ports = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        self.assertEqual(ports, {"http": 8000, "health": 8001})
        readiness = self.container["readinessProbe"]["httpGet"]
        self.assertEqual((readiness["path"], ports[readiness["port"]]), ("/readyz", 8000))
        liveness = self.container["livenessProbe"]["httpGet"]
        self.assertEqual(ports[liveness["port"]], 8001)

    def test_grace_period_covers_the_drain(self) -> None:
        command = self.container["lifecycle"]["preStop"]["exec"]["command"]
        self.assertEqual(command[0], "sleep")
        needed = int(command[1]) + int(self.env["DRAIN_TIMEOUT"]) + int(self.env["STOP_TIMEOUT"])
        self.assertGreaterEqual(self.pod["terminationGracePeriodSeconds"], needed)

    def test_key_file_comes_from_the_secret(self) -> None:
        secret = self.kinds["Secret"]
        volumes = {v["name"]: v for v in self.pod["volumes"]}
        mounts = {m["name"]: m for m in self.container["volumeMounts"]}
        (name,) = [n for n, v in volumes.items()
                   if v.get("secret", {}).get("secretName") == secret["metadata"]["name"]]
        key_file = Path(self.env["AUTH_KEYS_FILE"])
        self.assertEqual(str(key_file.parent), mounts[name]["mountPath"])
        self.assertIn(key_file.name, secret["stringData"])
        line = secret["stringData"][key_file.name].strip()
        self.assertRegex(line, r"^[A-Za-z0-9_-]+:[A-Za-z0-9_-]{16,128}$")

    def test_non_root_and_read_only_as_the_image(self) -> None:
        dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
        uid = int(re.search(r"^ARG UID=(\d+)$", dockerfile, re.M).group(1))  # type: ignore[union-attr]
        security = self.pod["securityContext"]
        self.assertTrue(security["runAsNonRoot"])
        self.assertEqual((security["runAsUser"], security["fsGroup"]), (uid, uid))
        self.assertTrue(self.container["securityContext"]["readOnlyRootFilesystem"])
        writable = {m["mountPath"] for m in self.container["volumeMounts"]
                    if not m.get("readOnly")}
        self.assertEqual(writable, {"/data", "/tmp"})

    def test_selectors_match_the_pods(self) -> None:
        labels = self.kinds["Deployment"]["spec"]["template"]["metadata"]["labels"]
        for selector in (self.kinds["Deployment"]["spec"]["selector"]["matchLabels"],
                         self.kinds["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
                         self.kinds["Service"]["spec"]["selector"]):
            self.assertLessEqual(selector.items(), labels.items())
        self.assertLess(self.kinds["PodDisruptionBudget"]["spec"]["minAvailable"],
                        self.kinds["Deployment"]["spec"]["replicas"])


class DocTests(SynchronousTestCase):
    def test_the_doc_shows_the_tested_manifest(self) -> None:
        """docs/kubernetes.md's YAML blocks, together, are the manifest this file checks."""
        blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), re.S)
        shown = [d for block in blocks for d in documents(block)]
        self.assertEqual(shown, documents(MANIFEST.read_text()))
