"""Devices the harness can bench on, all behind one small protocol (``devices.base.Device``).

``get_device("host" | "qemu-arm64" | "ssh://user@host[:port]" | "adb[:serial]" | "ios[:udid]")``.
"""

from __future__ import annotations

from cdcda_export.errors import UserError

from .base import Device

KINDS = ("host", "qemu-arm64", "ssh://user@host[:port]", "adb[:serial]", "ios[:udid]")


def get_device(spec: str, **options) -> Device:
    """Parse a ``--device`` value into a Device. ``options`` go to the device's constructor."""
    s = (spec or "").strip()
    if s == "host":
        from .host import HostDevice

        return HostDevice(**options)
    if s in ("qemu-arm64", "qemu", "emulator"):
        from .qemu import QemuArm64Device

        return QemuArm64Device(**options)
    if s.startswith("ssh://"):
        from .ssh import SshDevice

        return SshDevice.from_spec(s, **options)
    if s == "adb" or s.startswith("adb:"):
        from .adb import AdbDevice

        return AdbDevice(serial=s[4:] or None, **options)
    if s == "ios" or s.startswith("ios:"):
        from .ios import IosDevice

        return IosDevice(udid=s[4:] or None, **options)
    raise UserError(f"unknown device {spec!r}", field="--device", expected=", ".join(KINDS),
                    hint="cdcda bench ART --device host")


__all__ = ["Device", "get_device", "KINDS"]
