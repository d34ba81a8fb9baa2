"""Observability and guards: named metrics (`metrics`) and the drift guard and AR fall-back
(`drift`). Imports `common.core` only."""
