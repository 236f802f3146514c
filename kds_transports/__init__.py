"""Transport backends for kds: one module per transport, one class each."""
