"""Deployments: what should run where (selectors, specs; the resource and its merge rules)."""
