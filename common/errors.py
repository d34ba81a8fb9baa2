"""User-facing errors: anything raised as one of these is shown as a one-line message by the CLI."""


class DVIError(Exception):
    """Base class of errors the CLI reports as `error: <message>` with a non-zero exit and no traceback."""


class ModelLoadError(DVIError, ValueError):
    """The model id or path cannot be resolved or is not a supported decoder-only causal LM."""


class AdapterError(DVIError, ValueError):
    """An adapter checkpoint is missing, corrupt, or belongs to another model or exit layer."""


class ServiceError(DVIError, RuntimeError):
    """Redis or Ray is unreachable or misconfigured; the message says what to do."""


class RequestRejected(DVIError, ValueError):
    """One request cannot be served as given (empty, or too long for the model's context): the run
    skips it, counts it and goes on; only a workload in which every request is rejected fails."""
