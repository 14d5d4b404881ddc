"""The one error family: a user's mistake, told in one line the CLI prints."""


class VdeployError(Exception):
    """A problem the user can act on. The message is one line: what happened and what to do."""


class ManifestError(VdeployError):
    """The manifest (vdeploy.toml) is malformed or asks for something impossible."""


class LockError(VdeployError):
    """The lockfile is missing, stale, unreadable or from another vdeploy."""


class HubError(VdeployError):
    """The Hub (or a local source) could not give what the manifest asks for."""


class StoreError(VdeployError):
    """The store lacks, or holds wrong, bytes for the lock."""


class LaunchError(VdeployError):
    """The engine cannot be started from this lock."""
