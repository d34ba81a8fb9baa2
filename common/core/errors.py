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


class WeightIntegrityError(ValueError):
    """A stored weight record whose bytes, hash or signature cannot be trusted; never load it."""


class VersionConflictError(ValueError):
    """`publish` of a version not above the newest stored one; `newest` is that version."""

    def __init__(self, version: int, newest: int) -> None:
        super().__init__(f"weight version {version} is not newer than the latest published version {newest}")
        self.version = version
        self.newest = newest


class WeightNotFoundError(LookupError):
    """The requested weight version is not (or no longer) in the store."""
