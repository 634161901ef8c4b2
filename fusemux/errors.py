"""Domain errors of fusemux, each carrying the errno an engine replies with.

This module owns the single mapping from failures to errnos (:func:`errno_of`). Engines call
it at their edge and never pick an errno themselves. Where the choice is not obvious, the
class says why.
"""

from __future__ import annotations

import errno
import logging


class FusemuxError(Exception):
    """Base class: a failure that maps to one errno for the caller."""

    errno: int = errno.EIO

    def __init__(self, message: str, err: int | None = None) -> None:
        super().__init__(message)
        if err is not None:
            self.errno = err

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else ""


class NotFound(FusemuxError):
    errno = errno.ENOENT


class NamespaceReadOnly(FusemuxError):
    """create/unlink/rename/mkdir and friends: the storage side owns the namespace.

    EPERM rather than EROFS, because the volumes themselves stay writable; EROFS would tell
    qemu and admins that the whole filesystem is read-only.
    """

    errno = errno.EPERM


class ReadOnlyExport(FusemuxError):
    """A write open, a write or a size change on an export configured ``read_only``."""

    errno = errno.EROFS


class NoSuchAttribute(FusemuxError):
    """An xattr name fusemux does not answer (``ENODATA``, which is ``ENOATTR`` on Linux)."""

    errno = errno.ENODATA


class XattrReadOnly(FusemuxError):
    """setxattr/removexattr of a ``user.fusemux.*`` key: the keys are read-only views."""

    errno = errno.EPERM


class XattrNotSupported(FusemuxError):
    """Any xattr name outside ``user.fusemux.*``, for get, set and remove alike: fusemux
    stores no xattrs of its own, so it answers as a filesystem without xattr support does
    (``ENOTSUP``, which is ``EOPNOTSUPP`` on Linux). libvirt learns "not supported" from its
    probing get; ENODATA would make it go on and fail at the set."""

    errno = errno.ENOTSUP


class MountError(FusemuxError):
    """mount(8) failed; the errno is derived from its message (see mounter.mount_errno)."""

    errno = errno.EIO


class MountTimeout(MountError):
    errno = errno.ETIMEDOUT


class UnmountError(FusemuxError):
    errno = errno.EBUSY


class Busy(FusemuxError):
    """An admin request that would take something away from another holder."""

    errno = errno.EBUSY


class InvalidRequest(FusemuxError):
    """A control value fusemux does not understand."""

    errno = errno.EINVAL


class NotPermitted(FusemuxError):
    """A control request from a caller other than root."""

    errno = errno.EPERM


class IoTimeout(FusemuxError):
    """A backing-filesystem call of an export with ``io_timeout`` did not return in time.

    The caller gets ETIMEDOUT, as from a ``soft`` NFS mount; the call goes on in its thread.
    """

    errno = errno.ETIMEDOUT


class BadHandle(FusemuxError):
    errno = errno.EBADF


class ShuttingDown(FusemuxError):
    """The daemon is stopping; new opens are refused so that every export can be unmounted."""

    errno = errno.ESHUTDOWN


class MapNotPermitted(FusemuxError):
    """A map or unmap request from a caller other than root (FUSE request uid != 0)."""

    errno = errno.EPERM


class BadMapRequest(FusemuxError):
    """A ``user.fusemux.map``/``unmap`` value fusemux does not understand, or cannot serve."""

    errno = errno.EINVAL


class AlreadyMapped(FusemuxError):
    """A map request for a volume that is mapped (or being mapped) already."""

    errno = errno.EBUSY


class NotMapped(FusemuxError):
    """An unmap request for a volume that is not mapped.

    ENXIO ("No such device or address"), as ``losetup -d`` reports for a loop device that is
    not attached: the operator learns that nothing was there, and a script can ignore it.
    """

    errno = errno.ENXIO


class MappingInUse(FusemuxError):
    """An unmap of a device (or partition) that is mounted or held by another device."""

    errno = errno.EBUSY


class MappingFailed(FusemuxError):
    """Setting up a mapping failed (qemu-nbd did not start, an ioctl failed)."""

    errno = errno.EIO


def errno_of(exc: BaseException) -> int:
    """The errno to reply with for an expected failure, or EIO for anything else."""
    if isinstance(exc, FusemuxError):
        return exc.errno
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    return errno.EIO


def reply_errno(exc: BaseException, op: str, log: logging.Logger) -> int:
    """The errno an engine replies with when *op* raised *exc*, logged once here.

    Both engines call this at their edge, so the mapping and its logging are the same for
    every request: an expected failure (a :class:`FusemuxError`, an ``OSError`` from a
    backing syscall) at DEBUG, anything else with its traceback at ERROR and EIO.
    """
    err = errno_of(exc)
    extra = {"op": op.lower(), "errno": errno.errorcode.get(err, str(err))}
    if isinstance(exc, FusemuxError):
        log.debug("%s: %s (errno %d)", op, exc.message, exc.errno, extra=extra)
        return exc.errno
    if isinstance(exc, OSError):
        log.debug("%s: %s", op, exc, extra=extra)
        return err
    log.error("unexpected error in %s", op, exc_info=exc, extra=extra)
    return errno.EIO
