"""Test helpers that ship with meshq: a real daemon as a subprocess, and virtual time."""

from meshq.testing.clock import TrioClock
from meshq.testing.daemon import DaemonProcess

__all__ = ["DaemonProcess", "TrioClock"]
