"""Receiving models: chunked download, signature and hash verification, install and rollback."""
