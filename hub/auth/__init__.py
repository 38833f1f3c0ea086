"""Who is asking: API tokens with roles, and the audit trail of every mutating request.

Modules: ``models`` (tables), ``store`` (data access), ``guard`` (the bearer-token
dependency, role checks, the audit middleware), ``routes`` (``/tokens``, ``/audit``).

Rules:
- A token is a 256-bit random secret shown once at creation; only its SHA-256
  is stored. ``Authorization: Bearer <token>`` on every request but ``/health``,
  the bundle file download (agents have no API token; bundles are verified on
  the device) and device enrollment (which has its own token).
- Roles are ordered: ``viewer`` (read) < ``operator`` (deploy: desired state,
  bundles, jobs) < ``admin`` (devices, keys, tokens). A route names the least
  role it needs; missing or unknown token -> 401, too little role -> 403.
- Every mutating request (POST, PUT, PATCH, DELETE) is written to the audit
  log after it finished, whatever its outcome, 401 and 403 included: who
  (token name, or ``anonymous``), what (method, path), when, and the result
  (HTTP status). The log is readable by admins through the API.
"""
