"""Kubernetes manifests generated from a plan, and their offline validation.

Builders (pure: plan and ``target.K8sTarget`` in, plain dicts out): ``rayjob`` (KubeRay RayJob),
``jobset`` (JobSet), the pieces they share (``pods``), the deadline and restart arithmetic (``limits``) and
deterministic YAML with its header comment (``render``). Validation, layer by layer (``validation``):
strict CRD schemas (``schema_check``, converted by ``crd_schema`` into ``schemas/``), the CRDs' CEL rules
(``cel_check``), pod templates through kubernetes-validate (``pod_check``) and moeplan's policy
(``policy``). See docs/design/kubernetes.md.

May import: ``simulator.spec`` and ``simulator.contracts`` (a manifest is rendered from a plan file alone).
"""
