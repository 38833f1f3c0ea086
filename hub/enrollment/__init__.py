"""Provisioning: enrollment tokens, and redeeming one with a CSR for a device certificate.

Modules: ``models`` (tables), ``store`` (data access), ``renewal`` (certificates
renewed over MQTT), ``revocation`` (CRL and ACL to the broker), ``routes``
(``/enroll``, ``/enrollment-tokens``, ``/crl``).

Rules:
- A token is a 256-bit random secret shown once; only its SHA-256 is stored.
  (A fast hash is enough: the secret is not guessable, unlike a password.)
- A token is either for one named device (single use) or a claim token for
  manufacturing (any device id, a count limit); every token expires and may
  carry labels that the devices it enrolls get.
- Redeeming checks, in one write transaction: the token exists, has not
  expired, has uses left, and names this device (if it names one); then the
  CSR (signature, key type, common name = device id). Only when all hold is a
  use consumed, the device registered (if new) and the certificate recorded.
  A refused attempt consumes nothing.
- Every certificate issued is recorded with its serial, so it can be revoked.
"""
