"""One base class for the errors a user can fix: each message is one line naming the bad value and the fix."""


class WorkbenchError(Exception):
    """An error caused by input the user can correct; the CLI prints it as one line and exits 2."""


class NotApplicableError(WorkbenchError):
    """A technique does not apply to this model, workload or device; the message says why not."""


class ModelLoadError(WorkbenchError):
    """A model could not be found or loaded; the message says where it looked and what to do."""


class WorkloadError(WorkbenchError):
    """A workload name or file is invalid; the message names the file, the line and the fix."""
