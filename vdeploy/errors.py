"""The one error family: a user's mistake, told in one line the CLI prints.

Each class names the step that failed, so a message and its handling never have to guess.
"""


class VdeployError(Exception):
    """A problem the user can act on. The message is one line: what happened and what to do."""


class ManifestError(VdeployError):
    """The manifest (vdeploy.toml) is malformed or asks for something impossible."""


class LockError(VdeployError):
    """The lockfile is missing, stale, unreadable, tampered with or from another vdeploy."""


class SourceError(VdeployError):
    """A source (a Hub repo or a local folder) cannot give what the manifest asks for."""


class PolicyError(VdeployError):
    """A source holds something the [policy] does not allow to run (remote code, pickles)."""


class StoreError(VdeployError):
    """The store lacks, or holds wrong, bytes for the lock."""


class EngineError(VdeployError):
    """The engine is missing, differs from the lock, or could not tell its flags."""


class LaunchError(VdeployError):
    """The engine cannot be started, or kept running, from this lock."""


class ExportError(VdeployError):
    """The locked deployment cannot be exported as asked (options, image, topology, names)."""


class DiffInputError(VdeployError):
    """A side of `vdeploy diff` (a file, a folder, a git revision, a run record) cannot be read."""


class RegistryError(VdeployError):
    """An OCI registry refused, or could not be reached for, a push or a pull; or a reference is malformed."""


class BundleError(VdeployError):
    """A bundle cannot be written or restored: a missing volume or blob, bytes that do not match
    their digest, a member that is not a plain file, or a bundle that disagrees with its lock."""


class UsageError(VdeployError):
    """A command-line option has a value no command could use (a port out of range, say)."""


class CheckError(VdeployError):
    """`vdeploy check` cannot ask or compare: no golden file, an unreachable server, a refused request."""
