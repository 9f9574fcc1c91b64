"""Keys and credentials of a deployment: signing keys and key rotation (keys), the private CA
and TLS certificates (pki), device enrolment (enroll) and the broker configuration (brokerconf).
"""
