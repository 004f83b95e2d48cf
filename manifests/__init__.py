"""Kubernetes manifests generated from a plan (KubeRay RayJob, JobSet): reserved for the Kubernetes work.

May import: ``simulator.spec`` and ``simulator.contracts`` (a manifest is rendered from a plan file alone).
"""
