"""Store backends for kds: one module per database, one class each."""
