"""Deployments: what runs where, declared by operators (docs/orchestration.md)."""
